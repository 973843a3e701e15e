"""Request and response models of the OpenAI-compatible API (serving/frontend/routes/openai.py),
the OpenAPI schema of its routes at /docs.

As vLLM takes them, and unlike the rest of the server: a field a client sends that rnnserve does
not have (user, metadata, store, parallel_tool_calls, ...) is ignored, so that the clients written
for OpenAI work unchanged; a known field of the wrong JSON type, or with a value out of its range,
is a 400 naming it, and so is a known field asking for what rnnserve cannot do (suffix, best_of,
logit_bias, tools, a response_format other than text, content that is not text)."""
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_CHOICES = 16  # prompts x n in one request: each choice is a generation of its own


class OpenAIRequest(BaseModel):
    """Unknown keys ignored; known ones strict (no "5" for an integer)."""
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(OpenAIRequest):
    include_usage: bool | None = Field(None, description="a last chunk with the usage and no choices")


class Sampling(OpenAIRequest):
    """What completions and chat completions share: the model, how much and how to sample."""
    model: str
    max_tokens: int | None = Field(16, ge=0, description="tokens to generate (16 by default, as OpenAI; null: "
                                                         "the server's most); 0 only to score a prompt (echo)")
    temperature: float | None = Field(None, ge=0, le=2, description="1 by default, as OpenAI; 0 is greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="choice i of n uses seed + i")
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt, each its own generation")
    stream: bool | None = Field(False, description="server-sent events, then data: [DONE]")
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="not served: only null or {}")
    top_k: int | None = Field(None, ge=-1, description="vLLM's: 0 or -1 is no top-k filter")
    min_tokens: int | None = Field(None, ge=0, description="vLLM's")
    repetition_penalty: float | None = Field(None, gt=0, description="vLLM's")


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text or a list of texts (token ids are refused: send text)")
    echo: bool | None = Field(False, description="the prompt before each choice's text")
    logprobs: int | None = Field(None, ge=0, le=20, description="each token's log-probability and this many "
                                                                "alternatives")
    suffix: str | None = Field(None, description="not served: only null")
    best_of: int | None = Field(None, ge=1, description="not served past n")


class ContentPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ResponseFormat(OpenAIRequest):
    type: Literal["text"]


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate (null, the default: the server's most)")
    max_completion_tokens: int | None = Field(None, ge=1, description="max_tokens' newer name; it wins")
    logprobs: bool | None = Field(False, description="each token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: this many alternatives")
    tools: list[Any] | None = Field(None, description="not served: only null or []")
    response_format: ResponseFormat | None = Field(None, description='only {"type": "text"}')


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None
    finish_reason: str | None = Field(description="stop | length")


class Completion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict = Field(description='{"role": "assistant", "content": "..."}')
    logprobs: dict | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError
    request_id: str
