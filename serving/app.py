"""The FastAPI app: models loaded in the lifespan, KServe V1 text API, Open Inference Protocol (V2)
REST, health and Prometheus metrics. Run it with python -m serving.

Every client error is a 4xx with a JSON body {"error": "..."}; the routes only parse, queue and
answer, and inference runs in each model's batcher (serving/batcher.py).
"""
import asyncio
import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import control, lm_routes, v2
from serving.guards import BearerToken, BodyGuard, ShedLoad, refuse
from serving.inference import answered, check_text, deployed, infer
from serving.metrics import CountRequests
from serving.repository import ModelRepository
from serving.request_ids import REQUEST_ID, RequestIdFilter, RequestIds
from serving.schemas import ErrorResponse, PredictRequest, PredictResponse
from serving.settings import Settings

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s [%(request_id)s]: %(message)s"


def configure_logging():
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def drain_on_sigterm(app: FastAPI):
    """On SIGTERM readiness turns false at once and new requests get 503; uvicorn then stops
    accepting connections, waits for the requests in flight (at most shutdown_grace_s) and runs
    the lifespan's shutdown. Chained in front of uvicorn's own handler (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    uvicorn_handler = signal.getsignal(signal.SIGTERM)

    def draining(sig, frame):
        app.state.ready = False
        log.info("SIGTERM: not ready, answering the requests in flight")
        if callable(uvicorn_handler):
            uvicorn_handler(sig, frame)

    signal.signal(signal.SIGTERM, draining)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging()  # each worker process logs too
        repository = app.state.repository = ModelRepository(settings)
        await repository.start()
        watcher = asyncio.create_task(repository.watch(), name="repository-watch")
        app.state.ready = True
        drain_on_sigterm(app)
        log.info("ready: %s", ", ".join(f"{name} v{d.model.version} ({d.model.provider})"
                                          for name, d in repository.deployed.items()))
        yield
        app.state.ready = False
        watcher.cancel()
        await repository.close()

    errors = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}  # 400, not FastAPI's 422
    app = FastAPI(title="rnnserve", version="0.1.0", lifespan=lifespan, strict_content_type=False,
                  description="RNN-family text models on ONNX Runtime with dynamic batching.", responses=errors)
    app.state.settings = settings
    app.state.ready = False
    if settings.control_token:  # innermost middleware first: RequestIds wraps them all
        prefixes = ("/v2/repository", "/v1/models", "/v2/models") if settings.token_for_inference else ("/v2/repository",)
        app.add_middleware(BearerToken, token=settings.control_token.get_secret_value(), prefixes=prefixes)
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(ShedLoad)
    app.add_middleware(CountRequests)  # sees every answer of the middleware inside it too
    app.add_middleware(RequestIds)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(v2.router)
    app.include_router(control.router)
    app.include_router(lm_routes.router)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        """Every loaded model with its version, task, labels and execution provider."""
        return {"models": [d.model.metadata() for d in request.app.state.repository.deployed.values()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request) -> dict:
        """One model's metadata."""
        return deployed(request, name).model.metadata()

    @app.post("/v1/models/{name}:predict", response_model=PredictResponse)
    async def predict(name: str, body: PredictRequest, request: Request) -> dict:
        """Classify texts: {"instances": ["a review", ...]} -> one prediction per text."""
        deployment = deployed(request, name, task="classifier")
        model = deployment.model
        with answered(name, "v1_predict"), deployment.hold():
            limit = request.app.state.settings.max_instances
            if len(body.instances) > limit:
                raise HTTPException(413, f"{len(body.instances)} instances; at most {limit} per request")
            for i, text in enumerate(body.instances):
                check_text(request, text, f"instance {i}")
            encoded = [model.codec.encode(text) for text in body.instances]
            logits = await infer(request, deployment.batcher, [ids for ids, _ in encoded])
            return {"predictions": [model.respond(row, cut) for row, (_, cut) in zip(logits, encoded)]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        registry = None
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers: sum what they all wrote
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry) if registry else generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return refuse(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
    return refuse(400, f"invalid request: {problems}")


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: 500 with the request id to find the traceback in the log by."""
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return refuse(500, f"internal error: {type(exc).__name__}", {"X-Request-ID": REQUEST_ID.get()})
