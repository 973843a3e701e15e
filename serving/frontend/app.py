"""An HTTP front-end: the FastAPI app that parses, validates, tokenizes and answers, with every
model run by the engines (serving/engine/) it reaches through serving/frontend/client.py. It holds no
ONNX Runtime session. python -m serving runs several of these beside the engines.

Every client error is a 4xx with a JSON body {"error": "...", "request_id": "..."}.
"""
import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.common import tracing
from serving.common.logs import configure_logging
from serving.common.settings import Settings
from serving.frontend import routes, service
from serving.frontend.client import EngineClient
from serving.frontend.frontdoor import FrontDoor
from serving.frontend.responses import invalid, refused
from serving.frontend.schemas import ErrorResponse

log = logging.getLogger(__name__)
ENGINES_TIMEOUT_S = 900.0  # the longest a front-end waits for the engines' first word (their models load first)


def drain_on_sigterm(app: FastAPI, drain_s: float):
    """On SIGTERM readiness turns false, so readiness and every request for a model get 503 with
    Retry-After, and every answer closes its connection (serving/frontend/frontdoor.py); the port stays open
    for drain_s. Then uvicorn's own handler: it closes the port and the idle connections, waits for
    the requests in flight (at most shutdown_grace_s) and runs the lifespan's shutdown. Chained in
    front of uvicorn's handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    uvicorn_handler = signal.getsignal(signal.SIGTERM)

    def draining(sig, frame):
        app.state.ready, app.state.draining = False, True
        log.info("SIGTERM: not ready; answering 503 for %gs, then closing the port", drain_s)
        if callable(uvicorn_handler):
            closing = threading.Timer(drain_s, uvicorn_handler, (sig, frame))
            closing.daemon = True  # a process that stops sooner (SIGINT) does not wait for it
            closing.start()

    signal.signal(signal.SIGTERM, draining)


def create_app(settings: Settings | None = None) -> FrontDoor:
    """The FastAPI app, its routes from the table (serving/frontend/routes/__init__.py), behind its
    front door (serving/frontend/frontdoor.py); .app and .state reach inside."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging()  # each front-end process logs too
        tracing.configure(settings.tracing, "frontend")
        app.state.engines = EngineClient(settings.engine_addresses, settings.repository)
        await app.state.engines.start()
        await app.state.engines.wait_for_engines(ENGINES_TIMEOUT_S)
        grpc_server = None
        if settings.grpc_port:
            from serving.frontend import grpc_v2  # grpcio only where it is asked for
            grpc_server = await grpc_v2.start(app.state)
        app.state.ready = True
        drain_on_sigterm(app, settings.drain_s)
        yield
        app.state.ready = False
        if grpc_server:
            await grpc_server.stop(settings.shutdown_grace_s)  # calls in flight are answered first
        await app.state.engines.close()
        tracing.shutdown()

    errors = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}  # 400, not FastAPI's 422
    app = FastAPI(title="rnnserve", version="0.2.0", lifespan=lifespan, strict_content_type=False,
                  description="RNN-family text models on ONNX Runtime with dynamic batching.", responses=errors,
                  docs_url=None, redoc_url=None)  # /docs from serving/frontend/routes/docs.py, with no CDN; no /redoc
    app.state.settings = settings
    app.state.ready = app.state.draining = False
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    routes.install(app)
    return FrontDoor(app, settings)


async def http_error(request: Request, e: StarletteHTTPException):
    return refused(e)


async def validation_error(request: Request, e: RequestValidationError):
    return invalid(e, where=())  # FastAPI's locations already start with "body", "path"...


async def internal_error(request: Request, e: Exception):
    return refused(service.unexpected(e))
