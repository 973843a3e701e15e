"""The FastAPI app: models loaded in the lifespan, KServe V1 text API, Open Inference Protocol (V2)
REST, health and Prometheus metrics. Run it with python -m serving.

Every client error is a 4xx with a JSON body {"error": "..."}; the routes only parse, queue and
answer, and inference runs in each model's batcher (serving/batcher.py).
"""
import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import lm_routes, v2
from serving.batcher import Batcher
from serving.generation import Sessions
from serving.inference import infer, measured, served
from serving.model import ServedModel
from serving.schemas import PredictRequest, PredictResponse
from serving.settings import Settings

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def load_models(settings: Settings) -> dict[str, ServedModel]:
    folders = sorted(p for p in settings.repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise RuntimeError(f"no models in {settings.repository}: run `make models` or python -m export")
    return {p.name: ServedModel.load(p, settings.model_versions.get(p.name), settings) for p in folders}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # each worker process logs too
        app.state.models = await asyncio.to_thread(load_models, settings)
        limits = dict(max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                      max_queue_delay_ms=settings.max_queue_delay_ms, max_queue_size=settings.max_queue_size)
        models = app.state.models.items()
        app.state.batchers = {name: Batcher(name, model.run_rows, **limits) for name, model in models}
        lms = {name: model for name, model in models if model.task == "lm"}
        app.state.steppers = {name: Batcher(f"{name}:step", model.advance, **limits) for name, model in lms.items()}
        app.state.sessions = {name: Sessions(model, settings.max_sessions, settings.session_idle_s)
                              for name, model in lms.items()}
        app.state.generations = dict.fromkeys(lms, 0)
        for batcher in [*app.state.batchers.values(), *app.state.steppers.values()]:
            batcher.start()
        app.state.ready = True
        log.info("ready: %s", ", ".join(f"{m.name} v{m.version} ({m.provider})" for m in app.state.models.values()))
        yield
        app.state.ready = False
        for batcher in [*app.state.batchers.values(), *app.state.steppers.values()]:
            await batcher.stop()

    app = FastAPI(title="rnnserve", version="0.1.0", lifespan=lifespan, strict_content_type=False,
                  description="RNN-family text models on ONNX Runtime with dynamic batching.")
    app.state.settings = settings
    app.state.ready = False
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.include_router(v2.router)
    app.include_router(lm_routes.router)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        """Every loaded model with its version, task, labels and execution provider."""
        return {"models": [m.metadata() for m in request.app.state.models.values()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request) -> dict:
        """One model's metadata."""
        return served(request, name).metadata()

    @app.post("/v1/models/{name}:predict", response_model=PredictResponse)
    async def predict(name: str, body: PredictRequest, request: Request) -> dict:
        """Classify texts: {"instances": ["a review", ...]} -> one prediction per text."""
        model = served(request, name, task="classifier")
        with measured(name, "v1_predict"):
            limit = request.app.state.settings.max_instances
            if len(body.instances) > limit:
                raise HTTPException(413, f"{len(body.instances)} instances; at most {limit} per request")
            encoded = [model.encode(text) for text in body.instances]
            logits = await infer(request, name, [ids for ids, _ in encoded])
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
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
    return JSONResponse({"error": f"invalid request: {problems}"}, 400)


class BodyLimit:
    """413 for a body whose Content-Length is over max_bytes, before it is read."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                response = JSONResponse({"error": f"body over {self.max_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
