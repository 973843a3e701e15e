"""The core's one error: a refusal with the status it is answered with (HTTP's numbers; gRPC maps
them to its codes in one table, serving/frontend/grpc/status.py) and, for a 503, when to retry."""
import logging

from pydantic import ValidationError

from serving.common.messages import Failed

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # what every 503 tells its client


class Refused(Exception):
    """A request answered with `status` and `message`; retry_after_s: when to try again; param: the
    request field at fault, where one is (OpenAI's error shape names it)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after_s, self.param = status, message, retry_after_s, param


def busy(message: str) -> Refused:
    """A 503 that says when to retry."""
    return Refused(503, message, RETRY_AFTER_S)


def refusal(reply: Failed) -> Refused:
    """An engine's refusal as the core's; a model that failed is logged here too, with the request
    id (the engine's own log line has the traceback)."""
    if reply.status == 500:
        log.error("the engine failed this request: %s", reply.error)
    return busy(reply.error) if reply.status == 503 else Refused(reply.status, reply.error)


def unexpected(error: Exception) -> Refused:
    """What anything unexpected becomes, on every route and transport: a 500 (the traceback in the
    log, the request id in the answer). Cancellation is never one: it propagates."""
    log.error("unhandled %s", type(error).__name__, exc_info=error)
    return Refused(500, f"internal error: {type(error).__name__}: {error}")


def invalid(error: ValidationError, where: tuple = ("body",)) -> Refused:
    """A 400 naming the first five fields wrong, each with where it is and what is wrong with it
    (FastAPI's validation would answer 422); its param: the first one's top-level field."""
    errors = error.errors()
    first = [part for part in (*where, *errors[0]["loc"]) if part not in ("body", "query", "path")] if errors else []
    return Refused(400, "invalid request: " + "; ".join(
        f"{'.'.join(map(str, (*where, *e['loc'])))}: {e['msg']}" for e in errors[:5]),
        param=str(first[0]) if first else None)
