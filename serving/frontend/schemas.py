"""Request and response models of the APIs (they are the OpenAPI schema at /docs)."""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.frontend.core.sessions import MAX_TOP_K, TOP_K


class Request(BaseModel):
    """What a client sends: a field this API does not have is a 400, never ignored, and so is a
    value of the wrong JSON type, never coerced ("5" or true for an integer, "yes" for a boolean;
    an integer where a number is asked is a number)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(Request):
    instances: list[str] = Field(min_length=1, description="texts to classify, none empty")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="probability of the label")
    probabilities: dict[str, float]
    truncated: bool = Field(description="the text was longer than the model's max_len tokens and was cut")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class TensorInput(Request):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, description="row-major, flat or nested; absent when the tensor's bytes "
                                                     "follow the JSON (parameters.binary_data_size)")
    parameters: dict[str, Any] | None = None


class RequestedOutput(Request):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(Request):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float | str] | None = Field(None, description="FP32 numbers or BYTES strings; absent when the bytes "
                                                            "follow the JSON (binary_data_size)")
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str] = Field(description='where it runs: {"provider": "CUDAExecutionProvider", '
                                                   '"device": "cuda:0"} (or CPUExecutionProvider, cpu)')


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class GenerateRequest(Request):
    prompt: str = Field(min_length=1, description="an empty prompt is refused: the model needs a first token")
    max_new_tokens: int = Field(100, ge=1)
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_k: int = Field(0, ge=0, description="0: no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="the same seed gives the same text")
    stop: list[str] = Field([], description="stop at the first of these; it is not part of the text")
    stream: bool = Field(False, description="answer text/event-stream, one event per token")


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    finish_reason: str = Field(description="length | stop")
    prompt_tokens: int
    unknown_prompt_tokens: int = Field(description="prompt tokens outside the vocabulary, read as <unk>")


class TritonParameters(Request):
    """Sampling as Triton's LLM backends name it (vLLM's sampling_parameters)."""
    max_tokens: int = Field(100, ge=1, description="tokens to generate (:generate's max_new_tokens)")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_k: int = Field(0, ge=-1, description="0 or -1 (vLLM's): no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="the same seed gives the same text, as :generate's does")
    stop: list[str] | str = Field([], description="stop at the first of these; it is not part of the text")
    stream: bool | None = Field(None, description="true only on generate_stream (unset: the endpoint decides); "
                                                  "false there: one event with the whole answer")
    exclude_input_in_output: bool = Field(False, description="a whole answer's text_output without the prompt "
                                                             "(a stream's events never repeat it)")


class TritonGenerateRequest(Request):
    """Triton's generate extension: the text and its parameters, which may also stand at the top
    level of the body (as Triton passes a body's other keys on)."""
    text_input: str = Field(min_length=1)
    parameters: TritonParameters = Field(default_factory=TritonParameters)

    @model_validator(mode="before")
    @classmethod
    def parameters_at_the_top(cls, data):
        if not isinstance(data, dict) or not isinstance(data.get("parameters", {}), dict):
            return data
        loose = {k: v for k, v in data.items() if k in TritonParameters.model_fields}
        if twice := sorted(set(loose) & set(data.get("parameters", {}))):
            raise ValueError(f"{twice} given both at the top level and in parameters")
        return {k: v for k, v in data.items() if k not in loose} | {"parameters": data.get("parameters", {}) | loose}


class TritonGenerateResponse(BaseModel):
    model_name: str
    model_version: str
    text_output: str


class SessionCreated(BaseModel):
    session_id: str
    idle_expiry_s: float


class StepRequest(Request):
    text: str = Field(min_length=1)
    top_k: int = Field(TOP_K, ge=1, le=MAX_TOP_K)


class TokenProbability(BaseModel):
    token: str
    probability: float


class StepResponse(BaseModel):
    session_id: str
    tokens: int = Field(description="tokens consumed by this step")
    total_tokens: int = Field(description="tokens consumed by the session so far")
    unknown_tokens: int
    next: list[TokenProbability] = Field(description="the next-token distribution's top k")


class ErrorResponse(BaseModel):
    error: str
    request_id: str = Field(description="also in the X-Request-ID header and the server's log lines")


class IndexRequest(Request):
    ready: bool = Field(False, description="only the versions that are serving")


class ModelVersionState(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY | UNLOADING | UNAVAILABLE")
    reason: str


class LoadRequest(Request):
    parameters: dict[str, Any] = Field({}, description='{"version": "2"} loads (and pins) that version; '
                                                       "without it, the latest, which polling then follows")


class ControlResponse(BaseModel):
    name: str
    version: str | None = Field(description="the version now serving; null after an unload")
    state: str
