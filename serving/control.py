"""Model control (Triton's model-repository extension): list what is on disk, load a version
beside the one serving and swap, unload.

Closed by default, like Triton's --model-control-mode=none: every route answers 403 unless
RNNSERVE_CONTROL_TOKEN is set (then callers need it as a bearer token, checked in
serving/guards.py) or RNNSERVE_CONTROL=open (anyone who reaches the port: a trusted network only)."""
from fastapi import APIRouter, Depends, HTTPException, Request

from core.repository import UnknownModel
from serving.model import ModelLoadError
from serving.schemas import ControlResponse, IndexRequest, LoadRequest, ModelVersionState


def control_enabled(request: Request):
    settings = request.app.state.settings
    if settings.control_token is None and settings.control != "open":
        raise HTTPException(403, "model control is closed: set RNNSERVE_CONTROL_TOKEN (bearer token) "
                                 "or RNNSERVE_CONTROL=open (trusted networks only)")


router = APIRouter(prefix="/v2/repository", tags=["model control"], dependencies=[Depends(control_enabled)])


@router.post("/index", response_model=list[ModelVersionState])
async def index(request: Request, body: IndexRequest | None = None) -> list[dict]:
    """Every model version in the repository and its state (READY, UNLOADING, UNAVAILABLE)."""
    rows = request.app.state.repository.index()
    return [r for r in rows if r["state"] == "READY"] if body and body.ready else rows


@router.post("/models/{name}/load", response_model=ControlResponse)
async def load(name: str, request: Request, body: LoadRequest | None = None) -> dict:
    """Load the latest version (or parameters.version), warm it up beside the one serving, then
    swap: requests already taken finish on the old version. On any error the old one stays."""
    version = (body.parameters if body else {}).get("version")
    if version is not None and not (str(version).isdigit() and int(version) > 0):
        raise HTTPException(400, f"parameters.version must be a positive integer, not {version!r}")
    try:
        deployment = await request.app.state.repository.load(name, version and int(version), pin=version is not None)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    except ModelLoadError as e:
        raise HTTPException(400, f"load refused, the version serving before stays: {e}") from None
    return {"name": name, "version": str(deployment.model.version), "state": "READY"}


@router.post("/models/{name}/unload", response_model=ControlResponse)
async def unload(name: str, request: Request) -> dict:
    """Stop serving the model: new requests get 404; those already taken are answered first."""
    try:
        await request.app.state.repository.unload(name)
    except UnknownModel as e:
        raise HTTPException(404, str(e)) from None
    return {"name": name, "version": None, "state": "UNAVAILABLE"}
