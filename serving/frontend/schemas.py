"""Request and response models of the APIs (they are the OpenAPI schema at /docs)."""
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.frontend.core.sessions import MAX_TOP_K, TOP_K


class Request(BaseModel):
    """What a client sends: a field this API does not have is a 400, never ignored, and so is a
    value of the wrong JSON type, never coerced ("5" or true for an integer, "yes" for a boolean;
    an integer where a number is asked is a number)."""
    model_config = ConfigDict(extra="forbid", strict=True)


class PredictRequest(Request):
    instances: list[str] = Field(min_length=1, description="texts to classify")

    @field_validator("instances")
    @classmethod
    def no_empty_texts(cls, texts: list[str]) -> list[str]:
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise ValueError(f"instances {empty[:10]} are empty")
        return texts


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
    data: list[float] | None = Field(None, description="absent when the bytes follow the JSON (binary_data_size)")
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


PRESENCE = "subtracted from the logit of every token generated so far (-2 to 2, as OpenAI's)"
FREQUENCY = "times the number of times a token was generated so far, subtracted from its logit (-2 to 2)"
REPETITION = ("vLLM's: the logit of a token in the prompt or the text so far is divided by it where positive, "
              "multiplied where not (1: off)")
MIN_TOKENS = "no stop string ends the text before this many tokens (at most the tokens asked)"
LOGPROBS = ("each generated token's log-probability and that many most likely alternatives (0 to 20), "
            "from the logits it was sampled from: after the penalties, before the temperature")
PROMPT_LOGPROBS = "each prompt token's log-probability given the ones before it (the first has none: null)"
MAX_LOGPROBS = 20


class GenerateRequest(Request):
    """:generate's body, and what every other front's generation request is read as
    (serving/frontend/core/generation.py's from_triton): one reading of the sampling settings."""
    prompt: str = Field(min_length=1, description="an empty prompt is refused: the model needs a first token")
    max_new_tokens: int = Field(100, ge=0, description="0 only with prompt_logprobs: score the prompt, no text")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_k: int = Field(0, ge=0, description="0: no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="the same seed gives the same text")
    stop: list[str] = Field([], description="stop at the first of these; it is not part of the text")
    stream: bool = Field(False, description="answer text/event-stream, one event per token")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description=PRESENCE)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description=FREQUENCY)
    repetition_penalty: float = Field(1.0, gt=0, description=REPETITION)
    min_tokens: int = Field(0, ge=0, description=MIN_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=LOGPROBS)
    prompt_logprobs: bool = Field(False, description=PROMPT_LOGPROBS)


class Alternative(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token: str = Field(description="the generated token's text")
    logprob: float
    top: list[Alternative] = Field(description="the most likely tokens there, most likely first (ties: lower id)")


class GenerateResponse(BaseModel):
    text: str
    tokens: int
    finish_reason: str = Field(description="length | stop")
    prompt_tokens: int
    unknown_prompt_tokens: int = Field(description="prompt tokens outside the vocabulary, read as <unk>")
    logprobs: list[TokenLogprob] | None = Field(None, description="only when asked: one per generated token")
    prompt_logprobs: list[float | None] | None = Field(None, description="only when asked: one per prompt token")


class TritonParameters(Request):
    """Sampling as Triton's LLM backends name it (vLLM's sampling_parameters)."""
    max_tokens: int = Field(100, ge=0, description="tokens to generate (:generate's max_new_tokens; 0 only with "
                                                   "prompt_logprobs)")
    temperature: float = Field(1.0, ge=0, description="0 is greedy")
    top_k: int = Field(0, ge=-1, description="0 or -1 (vLLM's): no top-k filter")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="the same seed gives the same text, as :generate's does")
    stop: list[str] | str = Field([], description="stop at the first of these; it is not part of the text")
    stream: bool | None = Field(None, description="true only on generate_stream (unset: the endpoint decides); "
                                                  "false there: one event with the whole answer")
    exclude_input_in_output: bool = Field(False, description="a whole answer's text_output without the prompt "
                                                             "(a stream's events never repeat it)")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description=PRESENCE)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description=FREQUENCY)
    repetition_penalty: float = Field(1.0, gt=0, description=REPETITION)
    min_tokens: int = Field(0, ge=0, description=MIN_TOKENS)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=LOGPROBS + "; answered in `logprobs`")
    prompt_logprobs: bool = Field(False, description=PROMPT_LOGPROBS + "; answered in `prompt_logprobs`")


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
    logprobs: list[TokenLogprob] | None = Field(None, description="only when asked: one per generated token")
    prompt_logprobs: list[float | None] | None = Field(None, description="only when asked: one per prompt token")


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
