"""NAIVE BASELINE, not rnnserve: a minimal FastAPI app running the PyTorch model once per request,
as the tutorials this project grew from do.

    RUN=runs/imdb-bilstm [DEVICE=cpu|cuda] uvicorn loadtest.baselines.torch_app:app --port 8001
"""
import os
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel

from core.codec import TextCodec
from models.checkpoint import load_run

app = FastAPI(title="naive PyTorch baseline")
model, config, tokenizer, vocab = load_run(Path(os.environ["RUN"]))
device = torch.device(os.environ.get("DEVICE", "cpu"))
model = model.to(device)
codec = TextCodec(tokenizer, vocab, config["max_len"])


class Body(BaseModel):
    instances: list[str]


@app.post("/v1/models/{name}:predict")
def predict(name: str, body: Body) -> dict:
    out = []
    for text in body.instances:
        ids, _ = codec.encode(text)
        with torch.no_grad():
            p = model(torch.tensor([ids], device=device), torch.tensor([len(ids)])).softmax(-1)[0].cpu()
        out.append({"label": config["labels"][int(p.argmax())], "score": float(p.max())})
    return {"predictions": out}
