"""How the REST front-end writes its answers: JSON bodies (msgspec: fast), and every refusal as
{"error": "...", "request_id": "..."} with its status (and Retry-After where it says when), the
one place the core's Refused becomes an HTTP answer. Under /openai/ a refusal takes OpenAI's
error shape instead, {"error": {"message", "type", "param", "code"}}, as its clients read it."""
import msgspec
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from serving.common.logs import REQUEST_ID
from serving.frontend.core.refused import Refused

json_encode = msgspec.json.Encoder().encode
OPENAI = "/openai/"
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}  # else invalid_request_error or server_error


def json_response(body) -> Response:
    return Response(json_encode(body), media_type="application/json")


def refuse(status: int, error: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    return refused(Refused(status, error), headers, path)


def refused(e: Refused, headers: dict | None = None, path: str = "") -> JSONResponse:
    """The core's refusal as an HTTP answer to a request for `path`: a 503 says when to retry, a
    401 how to authenticate."""
    headers = dict(headers or {})
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if e.retry_after_s is not None:
        headers["Retry-After"] = str(e.retry_after_s)
    body = openai_error(e) if path.startswith(OPENAI) else {"error": e.message, "request_id": REQUEST_ID.get()}
    return JSONResponse(body, e.status, headers=headers or None)


def openai_error(e: Refused) -> dict:
    """OpenAI's error body: an unknown model's code is model_not_found (its param, "model")."""
    kind = OPENAI_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "server_error")
    code = "model_not_found" if e.status == 404 and e.param == "model" else None
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": code},
            "request_id": REQUEST_ID.get()}


def left(request: Request):
    """The core's `left` for an HTTP request: returns once its client has gone (http.disconnect)."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    return disconnected
