"""Logging for every server process: one format, with the request id on every line (a client's
sane X-Request-ID, else a new one; it is also in the answer's header and every error body)."""
import logging
import re
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")  # set by serving/frontdoor.py
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # a client's X-Request-ID is kept if it is this
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s [%(request_id)s]: %(message)s"


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
