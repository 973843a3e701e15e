"""NAIVE BASELINE, not rnnserve: the same minimal FastAPI app running ONNX Runtime once per
request with default session settings (what a user writes first after exporting).

    MODEL_DIR=model_repository/imdb-bilstm/1 [PROVIDER=cpu|cuda] uvicorn loadtest.baselines.ort_app:app --port 8002
"""
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

from core.codec import softmax
from core.repository import read_version

app = FastAPI(title="naive ONNX Runtime baseline")
version = read_version(Path(os.environ["MODEL_DIR"]))
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if os.environ.get("PROVIDER") == "cuda" else ["CPUExecutionProvider"]
session = ort.InferenceSession(version.graph_bytes(), providers=providers)


class Body(BaseModel):
    instances: list[str]


@app.post("/v1/models/{name}:predict")
def predict(name: str, body: Body) -> dict:
    out = []
    for text in body.instances:
        ids, _ = version.codec.encode(text)
        p = softmax(session.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0])
        out.append({"label": version.manifest.labels[int(p.argmax())], "score": float(p.max())})
    return {"predictions": out}
