"""Model control (Triton's model-repository extension): list what is on disk, load a version
beside the one serving and swap, unload. Every engine follows every call.

Closed by default, like Triton's --model-control-mode=none: every route answers 403 unless
RNNSERVE_CONTROL_TOKEN is set (then callers need it as a bearer token, checked in
serving/frontdoor.py) or RNNSERVE_CONTROL=open (anyone who reaches the port: a trusted network only)."""
import asyncio

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.datastructures import State

from core.repository import MODEL_NAME, VERSION
from serving.access import control_closed
from serving.inference import engines, json_response, refusal
from serving.messages import Control, Failed
from serving.schemas import ControlResponse, IndexRequest, LoadRequest, ModelVersionState

LOAD_TIMEOUT_S = 600.0  # a version's load and warm-up


def control_enabled(request: Request):
    if closed := control_closed(request.app.state.settings):
        raise HTTPException(403, closed)


router = APIRouter(prefix="/v2/repository", tags=["model control"], dependencies=[Depends(control_enabled)])


async def every_engine(state: State, verb: str, name: str = "", version: int | None = None) -> list:
    """The verb on every engine; the first refusal, if any, is the answer."""
    client = engines(state, every=True)
    replies = await asyncio.gather(*(client.request(link, Control(client.next_id(), verb, name, version), LOAD_TIMEOUT_S)
                                     for link in client.links))
    if failed := next((r for r in replies if isinstance(r, Failed)), None):
        raise refusal(failed)
    return [r.body for r in replies]


async def index_of(state: State, ready_only: bool = False) -> list[dict]:
    """Every model version in the repository and its state; with several engines, a version is
    READY only where every engine serves it."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in await every_engine(state, "index"):
        for row in rows:
            seen = merged.setdefault((row["name"], row["version"]), row)
            if seen["state"] != row["state"]:
                seen.update(state="UNLOADING", reason="engines differ: a load or unload is under way")
    return [r for r in merged.values() if r["state"] == "READY" or not ready_only]


async def load_model(state: State, name: str, version=None) -> dict:
    """Load `version` (pinned) or the latest on every engine."""
    if version is not None and not VERSION.fullmatch(str(version)):  # the repository's rule: 1, 2, ... (no "01")
        raise HTTPException(400, f"parameters.version must be a version folder's name (1, 2, ...), not {version!r}")
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return (await every_engine(state, "load", name, version and int(version)))[0]


async def unload_model(state: State, name: str) -> dict:
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return (await every_engine(state, "unload", name))[0]


@router.post("/index", response_model=list[ModelVersionState])
async def index(request: Request, body: IndexRequest | None = None):
    """Every model version in the repository and its state (READY, UNLOADING, UNAVAILABLE); with
    several engines, a version's state is READY only where every engine serves it."""
    return json_response(await index_of(request.app.state, bool(body and body.ready)))


@router.post("/models/{name}/load", response_model=ControlResponse)
async def load(name: str, request: Request, body: LoadRequest | None = None):
    """Load the latest version (or parameters.version), warm it up beside the one serving, then
    swap: requests already taken finish on the old version. On any error the old one stays."""
    return json_response(await load_model(request.app.state, name, (body.parameters if body else {}).get("version")))


@router.post("/models/{name}/unload", response_model=ControlResponse)
async def unload(name: str, request: Request):
    """Stop serving the model: new requests get 404; those already taken are answered first."""
    return json_response(await unload_model(request.app.state, name))
