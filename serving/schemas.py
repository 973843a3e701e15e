"""Request and response models of the APIs (they are the OpenAPI schema at /docs)."""
from typing import Any

from pydantic import BaseModel, Field, field_validator


class PredictRequest(BaseModel):
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


class TensorInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] = Field(description="row-major, flat or nested")
    parameters: dict[str, Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


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


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]
