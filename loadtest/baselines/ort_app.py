"""NAIVE BASELINE, not rnnserve: the same minimal FastAPI app running ONNX Runtime once per
request with default session settings (what a user writes first after exporting).

    MODEL_DIR=model_repository/imdb-bilstm/1 uvicorn loadtest.baselines.ort_app:app --port 8002
"""
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

from models.tokenize import Tokenizer, Vocab

app = FastAPI(title="naive ONNX Runtime baseline")
folder = Path(os.environ["MODEL_DIR"])
manifest = json.loads((folder / "manifest.json").read_text())
tokenizer, vocab = Tokenizer(**manifest["tokenizer"], folder=str(folder)), Vocab.load(folder / manifest["vocab_file"])
session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


class Body(BaseModel):
    instances: list[str]


@app.post("/v1/models/{name}:predict")
def predict(name: str, body: Body) -> dict:
    out = []
    for text in body.instances:
        ids = vocab.encode(tokenizer(text))[: manifest["max_len"]] or [1]
        logits = session.run(None, {"input_ids": np.array([ids]), "lengths": np.array([len(ids)])})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out.append({"label": manifest["labels"][int(p.argmax())], "score": float(p.max())})
    return {"predictions": out}
