"""A language model's state kept between requests, for every transport: REST's sessions (an id the
client holds) and Triton's sequences on gRPC (an id the client chose), each stepped over more
text and answering the next token's most likely k. The state lives on the engine that runs the
model's generations; its bounds and its "no session" answers are written here once."""

from core.codec import TextCodec
from serving.common.messages import CloseSession, Failed, OpenSession, SessionOpened, Step, Stepped
from serving.frontend.client import Link
from serving.frontend.core.front import Front, check_text, engines, served
from serving.frontend.core.inference import Left, reply_of
from serving.frontend.core.refused import Refused, refusal

TOP_K, MAX_TOP_K = 5, 100  # a step's next tokens: by default, and at most
ENDED = "ended, expired, or its version was replaced"


def no_session(sid: str, name: str) -> Refused:
    return Refused(404, f"no session {sid!r} of model {name!r} ({ENDED})")


def no_sequence(sid: str, name: str) -> Refused:
    return Refused(404, f"no sequence {sid!r} of model {name!r}: begin it with sequence_start (it {ENDED})")


def top_k_within(top_k) -> int:
    """A step's top_k, an integer from 1 to MAX_TOP_K (REST's schema says the same: StepRequest)."""
    if type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K:
        raise Refused(400, f"top_k must be an integer from 1 to {MAX_TOP_K}, not {top_k!r}")
    return top_k


def session_id(link: Link, opened: SessionOpened) -> str:
    """What the client holds: the engine, the version (whose codec encodes its text) and the id."""
    return f"{link.index}.{opened.version}.{opened.session}"


def session_of(front: Front, name: str, sid: str) -> tuple[Link, TextCodec, str]:
    """The engine, codec and engine-side name of the session a client's id names (404 if none)."""
    client = engines(front)
    engine, _, rest = sid.partition(".")
    version, _, session = rest.partition(".")
    if not (engine.isdigit() and version.isdigit() and int(engine) < len(client.links) and session):
        raise no_session(sid, name)
    served(front, name, task="lm")
    try:
        codec = client.version(name, int(version)).codec
    except (OSError, ValueError):
        raise no_session(sid, name) from None
    return client.links[int(engine)], codec, session


async def ask(front: Front, link: Link, message, missing: Refused | None = None, left: Left | None = None) -> object:
    """A session message's reply within the request deadline; a refusal raises its status (a
    session the engine does not have: `missing`, which names it as the client does)."""
    client = front.engines
    future = client.request(link, message, front.settings.request_timeout_s)
    reply = await reply_of(client, link, future, message.id, left)
    if isinstance(reply, Failed) and reply.status == 404 and missing:
        raise missing
    if isinstance(reply, Failed):
        raise refusal(reply)
    return reply


def token_ids(front: Front, codec: TextCodec, text: str, what: str) -> list[int]:
    """A step's text as token ids: within max_text_chars, and at least one."""
    check_text(front, text, what)
    if not (ids := codec.ids(text)):
        raise Refused(400, f"{what} has no tokens")
    return ids


async def open_session(front: Front, name: str, left: Left | None = None) -> str:
    """A new session at the model's zero state: the id the client holds."""
    link, _ = served(front, name, task="lm")
    opened = await ask(front, link, OpenSession(engines(front).next_id(), name), left=left)
    return session_id(link, opened)


async def step(front: Front, link: Link, session: str, ids: list[int], top_k: int, missing: Refused,
               left: Left | None = None) -> Stepped:
    """Advance a session's state over ids, within the request deadline; the engine answers the next
    token's top_k."""
    client = engines(front)
    deadline = client.deadline(front.settings.request_timeout_s)
    return await ask(front, link, Step(client.next_id(), session, ids, deadline, top_k), missing, left)


async def close(front: Front, link: Link, session: str, missing: Refused, left: Left | None = None):
    """End a session and free its state."""
    return await ask(front, link, CloseSession(engines(front).next_id(), session), missing, left)


async def step_sequence(front: Front, name: str, sid: str, version: str | None, text: str, top_k: int, start: bool,
                        end: bool) -> tuple[TextCodec, int, list[int], Stepped]:
    """A step of Triton's sequence `sid` (opened first, ended after, as the request says): the
    codec and version that read it, its ids, and the engine's answer."""
    link, served_version = served(front, name, version, task="lm", together=True)
    ids = token_ids(front, served_version.codec, text, "text_input")
    session, missing = f"triton {name} {sid}", no_sequence(sid, name)  # the engine's name for it
    if start:
        await ask(front, link, OpenSession(engines(front).next_id(), name, session))
    stepped = await step(front, link, session, ids, top_k, missing)
    if end:
        await close(front, link, session, missing)
    return served_version.codec, served_version.number, ids, stepped


def most_likely(codec: TextCodec, stepped: Stepped) -> list[tuple[str, float]]:
    """The step's top_k most likely next tokens (the engine's), with their probabilities, most likely first."""
    return [(codec.vocab.itos[i], p) for i, p in zip(stepped.tokens, stepped.probabilities)]
