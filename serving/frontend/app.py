"""An HTTP front-end: the FastAPI app that parses, validates, tokenizes and answers, with every
model run by the engines (serving/engine/) it reaches through serving/frontend/client.py. It holds no
ONNX Runtime session. python -m serving runs several of these beside the engines.

Every client error is a 4xx with a JSON body {"error": "...", "request_id": "..."} (under /openai/,
OpenAI's error shape: serving/frontend/responses.py).
"""
import logging
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.common import tracing
from serving.common.heap import freeze_startup_heap
from serving.common.logs import configure_logging
from serving.common.settings import Settings
from serving.frontend import routes
from serving.frontend.client import EngineClient
from serving.frontend.core.front import Front
from serving.frontend.core.refused import Refused, invalid, unexpected
from serving.frontend.frontdoor import FrontDoor
from serving.frontend.responses import refuse, refused
from serving.frontend.schemas import ErrorResponse

log = logging.getLogger(__name__)
ENGINES_TIMEOUT_S = 900.0  # the longest a front-end waits for the engines' first word (their models load first)


def drain_on_sigterm(front: Front, serve_s: float, drain_s: float):
    """On SIGTERM readiness turns false (a load balancer's health check, or Kubernetes, takes the
    replica out) and every answer closes its connection (serving/frontend/frontdoor.py), but for
    serve_s every request is still served: a balancer that has not yet seen the replica unready
    sends it requests, and most do not retry a POST. Then for drain_s every request for a model
    gets 503 with Retry-After, the port still open. Then uvicorn's own handler: it closes the port
    and the idle connections, waits for the requests in flight (at most shutdown_grace_s) and runs
    the lifespan's shutdown. Chained in front of uvicorn's handler (main thread only). A second
    SIGTERM (a process-group stop signals a front-end, then the supervisor does) changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    uvicorn_handler = signal.getsignal(signal.SIGTERM)

    def refusing():
        front.ready = False
        log.info("drain: answering 503 for %gs, then closing the port", drain_s)

    def draining(sig, frame):
        if front.draining:  # checked first: a second handler runs whole before the first takes any lock, or not at all
            return
        front.draining = True
        log.info("SIGTERM: not ready; serving on for %gs, then answering 503 for %gs, then closing the port",
                 serve_s, drain_s)
        later(serve_s, refusing)
        if callable(uvicorn_handler):
            later(serve_s + drain_s, uvicorn_handler, sig, frame)

    signal.signal(signal.SIGTERM, draining)


def later(delay_s: float, then, *args):
    """then(*args) after delay_s on a timer thread; at once (on this thread) for 0."""
    if delay_s == 0:
        return then(*args)
    timer = threading.Timer(delay_s, then, args)
    timer.daemon = True  # a process that stops sooner (SIGINT) does not wait for it
    timer.start()


def create_app(settings: Settings | None = None) -> FrontDoor:
    """The FastAPI app, its routes from the table (serving/frontend/routes/__init__.py), behind its
    front door (serving/frontend/frontdoor.py); .app and .state reach inside."""
    settings = settings or Settings()
    front = Front(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging()  # each front-end process logs too
        tracing.configure(settings.tracing, "frontend")
        front.engines = EngineClient(settings.engine_addresses, settings.repository)
        await front.engines.start()
        await front.engines.wait_for_engines(ENGINES_TIMEOUT_S)
        grpc_server = None
        if settings.grpc_port:
            from serving.frontend.grpc import v2  # grpcio only where it is asked for
            grpc_server = await v2.start(front)
        front.ready = True
        freeze_startup_heap()
        drain_on_sigterm(front, settings.drain_serve_s, settings.drain_s)
        yield
        front.ready = False
        if grpc_server:
            await grpc_server.stop(settings.shutdown_grace_s)  # calls in flight are answered first
        await front.engines.close()
        tracing.shutdown()

    errors = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}  # 400, not FastAPI's 422
    app = FastAPI(title="rnnserve", version="0.2.0", lifespan=lifespan, strict_content_type=False,
                  description="RNN-family text models on ONNX Runtime with dynamic batching.", responses=errors,
                  docs_url=None, redoc_url=None)  # /docs from serving/frontend/routes/docs.py, with no CDN; no /redoc
    app.state.settings, app.state.front = settings, front
    app.add_exception_handler(Refused, core_refusal)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    routes.install(app)
    return FrontDoor(app, front)


async def core_refusal(request: Request, e: Refused):
    return refused(e, path=request.url.path)


async def http_error(request: Request, e: StarletteHTTPException):  # FastAPI's own: 404 for no route, 405...
    return refuse(e.status_code, e.detail, getattr(e, "headers", None), request.url.path)


async def validation_error(request: Request, e: RequestValidationError):
    return refused(invalid(e, where=()), path=request.url.path)  # FastAPI's locations already start with "body", "path"...


async def internal_error(request: Request, e: Exception):
    return refused(unexpected(e), path=request.url.path)
