"""How the REST front-end writes its answers: JSON bodies (msgspec: fast), and every refusal as
{"error": "...", "request_id": "..."} with its status (and Retry-After where it says when), the
one place the core's Refused becomes an HTTP answer."""
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from serving.common.logs import REQUEST_ID
from serving.frontend.core.refused import Refused

json_encode = msgspec.json.Encoder().encode


def json_response(body) -> Response:
    return Response(json_encode(body), media_type="application/json")


def refuse(status: int, error: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "request_id": REQUEST_ID.get()}, status, headers=headers)


def refused(e: Refused) -> JSONResponse:
    """The core's refusal as an HTTP answer: a 503 says when to retry, a 401 how to authenticate."""
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(e.retry_after_s)
    return refuse(e.status, e.message, headers or None)


def left(request: Request):
    """The core's `left` for an HTTP request: returns once its client has gone (http.disconnect)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return disconnected
