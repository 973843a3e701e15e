"""An HTTP front-end: the FastAPI app that parses, validates, tokenizes and answers, with every
model run by the engines (serving/engine/) it reaches through serving/client.py. It holds no
ONNX Runtime session. python -m serving runs several of these beside the engines.

Every client error is a 4xx with a JSON body {"error": "...", "request_id": "..."}.
"""
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import tracing
from serving.client import EngineClient
from serving.frontdoor import FrontDoor, refuse
from serving.logs import REQUEST_ID, configure_logging
from serving.routes import control, docs, lm, v1, v2
from serving.schemas import ErrorResponse
from serving.settings import Settings

log = logging.getLogger(__name__)
ENGINES_TIMEOUT_S = 900.0  # the longest a front-end waits for the engines' first word (their models load first)


def drain_on_sigterm(app: FastAPI, drain_s: float):
    """On SIGTERM readiness turns false, so readiness and every request for a model get 503 with
    Retry-After, and every answer closes its connection (serving/frontdoor.py); the port stays open
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
    """The FastAPI app behind its front door (serving/frontdoor.py); .app and .state reach inside."""
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
            from serving import grpc_v2  # grpcio only where it is asked for
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
                  docs_url=None, redoc_url=None)  # /docs from serving/routes/docs.py, with no CDN; no /redoc
    app.state.settings = settings
    app.state.ready = app.state.draining = False
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    for routes in (v1, v2, lm, control, docs):
        app.include_router(routes.router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        """Every process's metrics (front-ends and engines) when several share the machine."""
        registry = None
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry) if registry else generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return FrontDoor(app, settings)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return refuse(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
    return refuse(400, f"invalid request: {problems}")  # as frontdoor.invalid does for the direct routes


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: 500 with the request id to find the traceback in the log by."""
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return refuse(500, f"internal error: {type(exc).__name__}", {"X-Request-ID": REQUEST_ID.get()})
