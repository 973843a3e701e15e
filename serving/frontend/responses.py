"""How the REST front-end writes its answers: JSON bodies (msgspec: fast), and every refusal as
{"error": "...", "request_id": "..."} with its status."""
import msgspec
from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from serving.common.logs import REQUEST_ID

json_encode = msgspec.json.Encoder().encode


def json_response(body) -> Response:
    return Response(json_encode(body), media_type="application/json")


def refuse(status: int, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "request_id": REQUEST_ID.get()}, status, headers=headers)


def refused(e: HTTPException) -> JSONResponse:
    return refuse(e.status_code, e.detail, getattr(e, "headers", None))


def invalid(error: ValidationError, where: tuple = ("body",)) -> JSONResponse:
    """A 400 naming the first fields wrong, as FastAPI's validation would (not its 422)."""
    return refuse(400, f"invalid request: {problems(error, where)}")


def problems(error: ValidationError, where: tuple) -> str:
    """The first five fields wrong, each with where it is and what is wrong with it."""
    return "; ".join(f"{'.'.join(map(str, (*where, *e['loc'])))}: {e['msg']}" for e in error.errors()[:5])
