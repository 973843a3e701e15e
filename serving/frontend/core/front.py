"""A front-end as every transport sees it (Front), whether it is ready, and the engine and version
that serve a model: the first step of every request, where it learns the version that answers it."""
from contextvars import ContextVar
from dataclasses import dataclass

from core.repository import Version
from serving.common.settings import Settings
from serving.frontend.client import EngineClient, Link
from serving.frontend.core.refused import Refused, busy

SERVER = {"name": "rnnserve", "version": "0.2.0", "extensions": ["model_repository", "binary_tensor_data", "generate",
                                                                  "model_configuration", "statistics"]}
ANSWERING: ContextVar = ContextVar("answering", default=None)  # the counted request's Outcome (envelope.counted)


@dataclass(eq=False)
class Front:
    """One front-end process: its settings, its engines (once its lifespan has started them),
    whether it takes requests (ready) and whether it is shutting down (draining: from SIGTERM on,
    readiness false while requests are still taken for a while)."""
    settings: Settings
    engines: EngineClient | None = None
    ready: bool = False
    draining: bool = False
    in_flight: int = 0  # requests taken and not yet answered, on every transport


def ready(front: Front) -> bool:
    """The server is ready: this front-end is not starting or draining, and every engine has said
    what it serves and serves something."""
    return bool(front.ready and not front.draining and front.engines and front.engines.ready)


def engines(front: Front, every: bool = False) -> EngineClient:
    """The front-end's engines, or 503 while it starts or drains; every: also while an engine has
    not said what it serves (starting or restarting)."""
    if not front.ready or front.engines is None or (every and not front.engines.connected):
        raise busy("the server is not ready (starting, shutting down, or an engine is restarting)")
    return front.engines


def served(front: Front, name: str, version: str | None = None, task: str | None = None,
           together: bool = False) -> tuple[Link, Version]:
    """The engine that will serve `name` and the version it serves (404 if none, or if `version` is
    given and is not the one deployed; 400 for the wrong task; 503 while starting or draining).
    together: the one engine every front-end sends this model's generations to."""
    client = engines(front)
    picked = client.pick(name, together)
    if picked is None and not client.connected:  # it may be served by the engine that is (re)starting
        raise busy(f"model {name!r} is not served now: an engine is starting or restarting")
    if picked is None:
        raise Refused(404, f"unknown model {name!r}")
    link, deployed = picked
    if version is not None and version != str(deployed.version):
        raise Refused(404, f"model {name!r} has no loaded version {version!r} (serving {deployed.version})")
    if task and deployed.task != task:
        raise Refused(400, f"model {name!r} is a {deployed.task}: " + (
            "only language models generate or keep sessions" if task == "lm" else f"this route is for a {task}"))
    answered_by(deployed.version)
    return link, client.version(name, deployed.version)


def answered_by(version: int):
    """The version that answers the request being counted, if one is: its version label in /metrics."""
    if (outcome := ANSWERING.get()) is not None:
        outcome.version = str(version)


def stateless(sequence_id):
    """Triton's sequence_id on a call that keeps no state: a 400, not an answer that ignores it."""
    if sequence_id not in (None, 0, ""):
        raise Refused(400, "sequence_id: this call keeps no state; a language model's sequences are stepped on "
                           "ModelStreamInfer with text_input, or as sessions at /v1/models/{name}/sessions")


def check_text(front: Front, text: str, what: str = "text"):
    """413 for a text past max_text_chars."""
    limit = front.settings.max_text_chars
    if len(text) > limit:
        raise Refused(413, f"{what} has {len(text)} characters; at most {limit}")


def check_texts(front: Front, texts: list[str], what: str):
    """A classifier's texts (V1's instances, V2's text_input): at most max_instances of them (413),
    none empty or blank (400), each within max_text_chars (413)."""
    if len(texts) > front.settings.max_instances:
        raise Refused(413, f"{what}: {len(texts)} texts; at most {front.settings.max_instances} per request")
    if empty := [i for i, text in enumerate(texts) if not text.strip()]:
        raise Refused(400, f"{what} {empty[:10]} are empty")
    for i, text in enumerate(texts):
        check_text(front, text, f"{what}[{i}]")


def unready(front: Front, name: str, version: str | None = None) -> str | None:
    """Why `name` (that version, if given) is not ready to serve, or None when it is: one answer
    for REST and gRPC, as Triton gives it (HTTP 400, gRPC ready: false) for a model it does not
    serve, a version it has not loaded, or a server that is not ready (draining included, while it
    still serves)."""
    if front.draining:
        return "the server is shutting down"
    try:
        served(front, name, version)
    except Refused as e:
        return e.message
    return None
