"""NOT A MODEL SERVER: the least a text API does per request without a model: parse the body,
tokenize and encode every text with a model's codec, answer JSON (fixed scores). What rnnserve's
whole stack is held against when its model's compute is negligible (python -m loadtest engine).

    MODEL_DIR=model_repository/imdb-gru/1 uvicorn loadtest.baselines.minimal_app:app --workers 2 --port 8003
"""
import os
from pathlib import Path

from fastapi import FastAPI
from pydantic import BaseModel

from core.repository import read_version

app = FastAPI(title="minimal text API, no model")
version = read_version(Path(os.environ["MODEL_DIR"]))
labels = version.manifest.labels


class Body(BaseModel):
    instances: list[str]


@app.post("/v1/models/{name}:predict")
async def predict(name: str, body: Body) -> dict:
    encoded = [version.codec.encode(text) for text in body.instances]
    return {"predictions": [{"label": labels[0], "score": 0.5, "probabilities": dict.fromkeys(labels, 0.5),
                             "truncated": cut} for _, cut in encoded]}
