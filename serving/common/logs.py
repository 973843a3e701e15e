"""Logging for every server process: one format, with the request id on every line (a client's
sane X-Request-ID, else a new one; it is also in the answer's header and every error body)."""
import itertools
import logging
import os
import re
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")  # set by start_request
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's X-Request-ID is kept if it is this
NEW_IDS = map(f"{os.urandom(8).hex()}{{:016x}}".format, itertools.count())  # 32 hex digits: random per process, then a count
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s [%(request_id)s]: %(message)s"


def start_request(given: str) -> str:
    """The request's id (the client's if sane, else a new one), set for every log line it causes."""
    request_id = given if SANE_REQUEST_ID.fullmatch(given) else next(NEW_IDS)
    REQUEST_ID.set(request_id)
    return request_id


class RequestIdFilter(logging.Filter):
    """Adds record.request_id (the current request's, or "-") so LOG_FORMAT can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging():
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
