"""A language model's state kept between requests, for every transport: REST's sessions (an id the
client holds) and Triton's sequences on gRPC (an id the client chose), each stepped over more
text and answering the next token's most likely k. The state lives on the engine that runs the
model's generations; its bounds and its "no session" answers are written here once.

A step may also carry its state as a signed token (state_token.py) and ask for the new one, so
that it goes on on whichever replica receives it: REST's stateless step, a session's step (the
replica that does not hold the session opens it under the same id) and a Triton sequence's."""

from core.codec import TextCodec
from core.repository import Version
from serving.common.messages import CloseSession, Failed, OpenSession, SessionOpened, Step, Stepped
from serving.frontend.client import Link
from serving.frontend.core import state_token
from serving.frontend.core.front import Front, answered_by, check_text, engines, served
from serving.frontend.core.inference import Left, reply_of
from serving.frontend.core.refused import Refused, refusal
from serving.frontend.core.state_token import Carried

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


def parts(name: str, sid: str) -> tuple[int, int, str]:
    """A client's session id as (engine, version, the engine's name for it); 404 if it is not one."""
    engine, _, rest = sid.partition(".")
    version, _, session = rest.partition(".")
    if not (engine.isdigit() and version.isdigit() and session):
        raise no_session(sid, name)
    return int(engine), int(version), session


def session_of(front: Front, name: str, sid: str) -> tuple[Link, TextCodec, str]:
    """The engine, codec and engine-side name of the session a client's id names (404 if none)."""
    client = engines(front)
    engine, version, session = parts(name, sid)
    if engine >= len(client.links):
        raise no_session(sid, name)
    served(front, name, task="lm")
    answered_by(version)  # the session's own version, whichever is deployed now
    try:
        codec = client.version(name, int(version)).codec
    except (OSError, ValueError):
        raise no_session(sid, name) from None
    return client.links[engine], codec, session


def state_key(front: Front) -> bytes:
    """The key state tokens are signed with; 409 where none is set: state stays on its replica."""
    if front.settings.state_key is None:
        raise Refused(409, state_token.LOCAL_ONLY)
    return front.settings.state_key.get_secret_value().encode()


def state_bytes(version: Version) -> int:
    """A language model version's state as a token carries it: each state input's (layers, H) float32."""
    spec = version.manifest.state
    return 4 * spec.layers * spec.hidden_size * len(spec.inputs)


def carried(front: Front, name: str, token: str | None, version: str | None = None) -> tuple[Link, Version, Carried]:
    """The engine and version a state goes on in, and the state: the token's (400 if it is not
    this server's key's or this model's, 410 for a version not served here), or with no token the
    zero state of the version served. The engine is the one of the model's generations and
    sequences, for every front-end: its steps share one call (with two engines on 2 cores,
    spreading the steps alone over both ran at 0.53-0.64x the steps/s: docs/benchmarks.md)."""
    link, served_version = served(front, name, version, task="lm", together=True)
    key, size = state_key(front), state_bytes(served_version)
    if token is None:
        return link, served_version, Carried(name, served_version.number, 0, bytes(size))
    got = state_token.unseal(key, token, name)
    if got.version != served_version.number:
        raise Refused(410, f"state: the token is for model {name!r} version {got.version}, which is not served "
                           f"here (serving {served_version.number}): begin again from a new state")
    if len(got.state) != size:
        raise Refused(400, f"state: malformed token ({len(got.state)} bytes of state; version {got.version} "
                           f"keeps {size})")
    return link, served_version, got


def token_of(front: Front, name: str, version: int, stepped: Stepped) -> str:
    """The token of the state after a step (one that asked for it)."""
    return state_token.seal(state_key(front), Carried(name, version, stepped.total_tokens, stepped.state))


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


async def open_session(front: Front, name: str, left: Left | None = None) -> tuple[str, str | None]:
    """A new session at the model's zero state: the id the client holds and, where tokens are
    signed, the zero state's token (so that its first step, too, may reach any replica)."""
    link, _ = served(front, name, task="lm")
    opened = await ask(front, link, OpenSession(engines(front).next_id(), name), left=left)
    if front.settings.state_key is None:
        return session_id(link, opened), None
    zero = Carried(name, opened.version, 0, bytes(state_bytes(engines(front).version(name, opened.version))))
    return session_id(link, opened), state_token.seal(state_key(front), zero)


async def step(front: Front, link: Link, session: str, ids: list[int], top_k: int, missing: Refused,
               left: Left | None = None, state: Carried | None = None, return_state: bool = False) -> Stepped:
    """Advance a session's state (or the state carried, in the session named or, naming none, alone)
    over ids, within the request deadline; the engine answers the next token's top_k, and the new
    state when asked."""
    client = engines(front)
    deadline = client.deadline(front.settings.request_timeout_s)
    message = Step(client.next_id(), session, ids, deadline, top_k, return_state=return_state)
    if state is not None:
        message.state, message.tokens, message.model, message.version = (state.state, state.tokens, state.model,
                                                                          state.version)
    return await ask(front, link, message, missing, left)


async def step_session(front: Front, name: str, sid: str | None, text: str, top_k: int, token: str | None = None,
                       return_state: bool = False, left: Left | None = None
                       ) -> tuple[TextCodec, list[int], Stepped, str | None]:
    """A REST step: of session `sid`, or with none, of the state carried, alone. With a token (or
    with no session) it starts from the token's state on this replica, which opens the session
    under its id if it does not hold it. Answers the codec, the text's ids, the engine's answer
    and, if it carried or asked for one, the new state's token."""
    if token is None and sid is not None:
        link, codec, session = session_of(front, name, sid)
        state, number = None, None
        if return_state:
            state_key(front)  # 409 before the step where tokens are not signed
            number = parts(name, sid)[1]  # the session's version
    else:
        link, version, state = carried(front, name, token)
        codec, number, session = version.codec, version.number, ""
        if sid is not None:  # the session's own engine if it is here, else the one a carried state goes to
            engine, _, session = parts(name, sid)
            link = next((mine for mine, _ in engines(front).deployed(name) if mine.index == engine), link)
    ids = token_ids(front, codec, text, "text")
    missing = no_session(sid, name) if sid is not None else Refused(404, f"unknown model {name!r}")
    tokened = return_state or state is not None
    stepped = await step(front, link, session, ids, top_k, missing, left, state, tokened)
    return codec, ids, stepped, token_of(front, name, number, stepped) if tokened else None


async def close(front: Front, link: Link, session: str, missing: Refused, left: Left | None = None):
    """End a session and free its state."""
    return await ask(front, link, CloseSession(engines(front).next_id(), session), missing, left)


async def step_sequence(front: Front, name: str, sid: str, version: str | None, text: str, top_k: int, start: bool,
                        end: bool, token: str | None = None, return_state: bool = False
                        ) -> tuple[TextCodec, int, list[int], Stepped, str | None]:
    """A step of Triton's sequence `sid` (opened first, ended after, as the request says; with a
    token, from its state, opened here if this replica does not hold it): the codec and version
    that read it, its ids, the engine's answer and, if it carried or asked for one, the new state's
    token."""
    if token is None:
        link, served_version = served(front, name, version, task="lm", together=True)
        state = None
        if return_state:
            state_key(front)  # 409 before the step where tokens are not signed
    else:
        link, served_version, state = carried(front, name, token, version)
    ids = token_ids(front, served_version.codec, text, "text_input")
    session, missing = f"triton {name} {sid}", no_sequence(sid, name)  # the engine's name for it
    if start and state is None:
        await ask(front, link, OpenSession(engines(front).next_id(), name, session))
    tokened = return_state or state is not None
    stepped = await step(front, link, session, ids, top_k, missing, state=state, return_state=tokened)
    if end:
        await close(front, link, session, missing)
    token = token_of(front, name, served_version.number, stepped) if tokened else None
    return served_version.codec, served_version.number, ids, stepped, token


def most_likely(codec: TextCodec, stepped: Stepped) -> list[tuple[str, float]]:
    """The step's top_k most likely next tokens (the engine's), with their probabilities, most likely first."""
    return [(codec.vocab.itos[i], p) for i, p in zip(stepped.tokens, stepped.probabilities)]
