"""Model control (Triton's model-repository extension): list what is on disk, load a version
beside the one serving and swap, unload. Every engine follows every call.

Closed by default, like Triton's --model-control-mode=none: every route answers 403 unless
RNNSERVE_CONTROL_TOKEN is set (then callers need it as a bearer token, checked in
serving/frontdoor.py) or RNNSERVE_CONTROL=open (anyone who reaches the port: a trusted network only)."""
import asyncio

from fastapi import APIRouter, Depends, HTTPException, Request

from core.repository import MODEL_NAME
from serving.inference import engines, json_response, refusal
from serving.messages import Control, Failed
from serving.schemas import ControlResponse, IndexRequest, LoadRequest, ModelVersionState

LOAD_TIMEOUT_S = 600.0  # a version's load and warm-up


def control_enabled(request: Request):
    settings = request.app.state.settings
    if settings.control_token is None and settings.control != "open":
        raise HTTPException(403, "model control is closed: set RNNSERVE_CONTROL_TOKEN (bearer token) "
                                 "or RNNSERVE_CONTROL=open (trusted networks only)")


router = APIRouter(prefix="/v2/repository", tags=["model control"], dependencies=[Depends(control_enabled)])


async def every_engine(request: Request, verb: str, name: str = "", version: int | None = None) -> list:
    """The verb on every engine; the first refusal, if any, is the answer."""
    client = engines(request)
    replies = await asyncio.gather(*(client.request(link, Control(client.next_id(), verb, name, version), LOAD_TIMEOUT_S)
                                     for link in client.links))
    if failed := next((r for r in replies if isinstance(r, Failed)), None):
        raise refusal(failed)
    return [r.body for r in replies]


@router.post("/index", response_model=list[ModelVersionState])
async def index(request: Request, body: IndexRequest | None = None):
    """Every model version in the repository and its state (READY, UNLOADING, UNAVAILABLE); with
    several engines, a version's state is READY only where every engine serves it."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in await every_engine(request, "index"):
        for row in rows:
            seen = merged.setdefault((row["name"], row["version"]), row)
            if seen["state"] != row["state"]:
                seen.update(state="UNLOADING", reason="engines differ: a load or unload is under way")
    rows = list(merged.values())
    return json_response([r for r in rows if r["state"] == "READY"] if body and body.ready else rows)


@router.post("/models/{name}/load", response_model=ControlResponse)
async def load(name: str, request: Request, body: LoadRequest | None = None):
    """Load the latest version (or parameters.version), warm it up beside the one serving, then
    swap: requests already taken finish on the old version. On any error the old one stays."""
    version = (body.parameters if body else {}).get("version")
    if version is not None and not (str(version).isdigit() and int(version) > 0):
        raise HTTPException(400, f"parameters.version must be a positive integer, not {version!r}")
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return json_response((await every_engine(request, "load", name, version and int(version)))[0])


@router.post("/models/{name}/unload", response_model=ControlResponse)
async def unload(name: str, request: Request):
    """Stop serving the model: new requests get 404; those already taken are answered first."""
    if not MODEL_NAME.fullmatch(name):
        raise HTTPException(404, f"no model {name!r} in the repository")
    return json_response((await every_engine(request, "unload", name))[0])
