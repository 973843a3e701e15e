"""Every route of the HTTP front-end, declared once, in TABLE: the FastAPI app and its OpenAPI
schema at /docs (install), the front door's dispatch (inference, matched to a raw request) and
each request span's name are all made from it. One module per API holds the handlers.

A route with an `endpoint` is an inference request: counted in /metrics under that name, traced,
with a model in its path. One with a `body` is direct: the front door validates the body and calls
the handler itself (FastAPI's routing and dependency solving cost more than these routes do).
"""
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI

from serving.frontend.openai_schemas import (ChatCompletion, ChatRequest, Completion, CompletionRequest, ModelCard,
                                             ModelList, OpenAIErrorResponse)
from serving.frontend.routes import control, docs, lm, metrics, openai, v1, v2, v2_generate
from serving.frontend.schemas import (CarriedStepRequest, CarriedStepResponse, ControlResponse, GenerateRequest,
                                      GenerateResponse, InferRequest, InferResponse,
                                      ModelMetadata, ModelVersionState, PredictRequest, PredictResponse,
                                      ServerMetadata, SessionCreated, StepRequest, StepResponse,
                                      TritonGenerateRequest, TritonGenerateResponse)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable
    endpoint: str = ""  # an inference endpoint's name in /metrics ("" for the rest)
    body: type | None = None  # a direct route's request schema
    queued: bool = False  # its requests wait in the model's queue: shed at the door when it is full
    binary: bool = False  # a JSON header, then raw tensor bytes (serving/frontend/core/tensors.py)
    model_in_body: bool = False  # its model is named in its body ("model"), not its path: OpenAI's
    options: dict = field(default_factory=dict)  # FastAPI's: response_model, responses, ...

    @property
    def span(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def pattern(self) -> re.Pattern:
        """The path, its {parameters} as named groups (none holds a / or a :)."""
        return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", re.escape(self.path)))


EVENTS = {"responses": {200: {"content": {"text/event-stream": {}}}}}
OPENAI_ERRORS = {"4XX": {"model": OpenAIErrorResponse}, "5XX": {"model": OpenAIErrorResponse}}  # not rnnserve's
TABLE = [
    Route("POST", "/v1/models/{name}:predict", v1.predict, "v1_predict", PredictRequest, queued=True,
          options={"response_model": PredictResponse}),
    Route("GET", "/v1/models", v1.list_models),
    Route("GET", "/v1/models/{name}", v1.model_info),
    Route("POST", "/v1/models/{name}:generate", lm.generate, "generate", GenerateRequest,
          options={"response_model": GenerateResponse} | EVENTS),
    Route("POST", "/v1/models/{name}/sessions", lm.create_session, "session_create",
          options={"response_model": SessionCreated, "response_model_exclude_none": True}),
    Route("POST", "/v1/models/{name}/sessions/{sid}:step", lm.step_session, "session_step", StepRequest,
          options={"response_model": StepResponse}),
    Route("DELETE", "/v1/models/{name}/sessions/{sid}", lm.end_session, "session_end"),
    Route("POST", "/v1/models/{name}:step", lm.step, "state_step", CarriedStepRequest,
          options={"response_model": CarriedStepResponse}),
    Route("GET", "/v2/health/live", v2.live),
    Route("GET", "/v2/health/ready", v2.ready),
    Route("GET", "/v2", v2.server_metadata, options={"response_model": ServerMetadata}),
    Route("GET", "/v2/models/stats", v2.all_stats),  # before /v2/models/{name}, which it would match
    Route("GET", "/v2/models/{name}", v2.model_metadata, options={"response_model": ModelMetadata}),
    Route("GET", "/v2/models/{name}/versions/{version}", v2.model_version_metadata,
          options={"response_model": ModelMetadata}),
    Route("GET", "/v2/models/{name}/config", v2.model_config),
    Route("GET", "/v2/models/{name}/versions/{version}/config", v2.model_version_config),
    Route("GET", "/v2/models/{name}/stats", v2.model_stats),
    Route("GET", "/v2/models/{name}/versions/{version}/stats", v2.model_version_stats),
    Route("GET", "/v2/models/{name}/ready", v2.model_ready),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", v2.model_version_ready),
    Route("POST", "/v2/models/{name}/infer", v2.model_infer, "v2_infer", InferRequest, queued=True, binary=True,
          options={"response_model": InferResponse, "response_model_exclude_none": True}),
    Route("POST", "/v2/models/{name}/versions/{version}/infer", v2.model_version_infer, "v2_infer", InferRequest,
          queued=True, binary=True, options={"response_model": InferResponse, "response_model_exclude_none": True}),
    Route("POST", "/v2/models/{name}/generate", v2_generate.generate, "v2_generate", TritonGenerateRequest,
          options={"response_model": TritonGenerateResponse}),
    Route("POST", "/v2/models/{name}/versions/{version}/generate", v2_generate.generate_version, "v2_generate",
          TritonGenerateRequest, options={"response_model": TritonGenerateResponse}),
    Route("POST", "/v2/models/{name}/generate_stream", v2_generate.generate_stream, "v2_generate_stream",
          TritonGenerateRequest, options=EVENTS),
    Route("POST", "/v2/models/{name}/versions/{version}/generate_stream", v2_generate.generate_stream_version,
          "v2_generate_stream", TritonGenerateRequest, options=EVENTS),
    Route("GET", "/openai/v1/models", openai.list_models,
          options={"response_model": ModelList, "responses": OPENAI_ERRORS}),
    Route("GET", "/openai/v1/models/{model}", openai.model_card,
          options={"response_model": ModelCard, "responses": OPENAI_ERRORS}),
    Route("POST", "/openai/v1/completions", openai.completions, "openai_completions", CompletionRequest,
          model_in_body=True, options={"response_model": Completion, "responses": EVENTS["responses"] | OPENAI_ERRORS}),
    Route("POST", "/openai/v1/chat/completions", openai.chat_completions, "openai_chat", ChatRequest,
          model_in_body=True, options={"response_model": ChatCompletion, "responses": EVENTS["responses"] | OPENAI_ERRORS}),
    Route("POST", "/v2/repository/index", control.index, options={"response_model": list[ModelVersionState]}),
    Route("POST", "/v2/repository/models/{name}/load", control.load, options={"response_model": ControlResponse}),
    Route("POST", "/v2/repository/models/{name}/unload", control.unload, options={"response_model": ControlResponse}),
    Route("GET", "/metrics", metrics.prometheus, options={"include_in_schema": False}),
    Route("GET", "/docs", docs.page, options={"include_in_schema": False}),
    Route("GET", "/docs/{asset}", docs.asset, options={"include_in_schema": False}),
]
TAGS = {"v1": "v1", "v2": "v2", "v2_generate": "v2 generate (Triton)", "lm": "language models",
        "control": "model control", "metrics": "metrics", "docs": "docs", "openai": "OpenAI-compatible"}
INFERENCE = [(route, route.pattern) for route in TABLE if route.endpoint]


def install(app: FastAPI):
    """Every route of the table in the FastAPI app, tagged by its API."""
    for route in TABLE:
        app.add_api_route(route.path, route.handler, methods=[route.method],
                          tags=[TAGS[route.handler.__module__.rsplit(".", 1)[1]]], **route.options)


def inference_route(method: str, path: str) -> tuple[Route, dict] | None:
    """The inference route a raw request is for and its path parameters, else None."""
    if not path.startswith(("/v1/models/", "/v2/models/", "/openai/")):
        return None
    for route, pattern in INFERENCE:
        if route.method == method and (match := pattern.fullmatch(path)):
            return route, match.groupdict()
    return None
