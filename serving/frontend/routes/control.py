"""Model control (Triton's model-repository extension): list what is on disk, load a version
beside the one serving and swap, unload. Every engine follows every call (serving/frontend/core/control.py).

Closed by default, like Triton's --model-control-mode=none: the front door answers 403 unless
RNNSERVE_CONTROL_TOKEN is set (then callers need it as a bearer token) or RNNSERVE_CONTROL=open
(anyone who reaches the port: a trusted network only)."""
from fastapi import Request

from serving.frontend.core import control
from serving.frontend.responses import json_response
from serving.frontend.schemas import IndexRequest, LoadRequest


async def index(request: Request, body: IndexRequest | None = None):
    """Every model version in the repository and its state (READY, UNLOADING, UNAVAILABLE); with
    several engines, a version's state is READY only where every engine serves it."""
    return json_response(await control.index(request.app.state.front, bool(body and body.ready)))


async def load(name: str, request: Request, body: LoadRequest | None = None):
    """Load the latest version (or parameters.version), warm it up beside the one serving, then
    swap: requests already taken finish on the old version. On any error the old one stays."""
    return json_response(await control.load(request.app.state.front, name, (body.parameters if body else {}).get("version")))


async def unload(name: str, request: Request):
    """Stop serving the model: new requests get 404; those already taken are answered first."""
    return json_response(await control.unload(request.app.state.front, name))
