"""KServe V1 text API: classify texts; list the models."""
from fastapi import Request

from core.codec import softmax
from serving.frontend.core import front as fronts, inference, metadata
from serving.frontend.responses import json_response, left
from serving.frontend.schemas import PredictRequest


async def list_models(request: Request) -> dict:
    """Every loaded model with its version, task, labels, execution provider and device."""
    front = request.app.state.front
    return {"models": [metadata.v1_metadata(front, name) for name in metadata.served_names(front)]}


async def model_info(name: str, request: Request) -> dict:
    """One model's metadata."""
    return metadata.v1_metadata(request.app.state.front, name)


async def predict(name: str, body: PredictRequest, request: Request):
    """Classify texts: {"instances": ["a review", ...]} -> one prediction per text."""
    front = request.app.state.front
    fronts.check_texts(front, body.instances, "instances")
    version, cuts, logits = await inference.infer(front, name, lambda v: inference.encoded(v.codec, body.instances),
                                                  task="classifier", left=left(request))
    labels = version.manifest.labels
    return json_response({"predictions": [
        {"label": labels[best := max(range(len(p)), key=p.__getitem__)], "score": p[best],
         "probabilities": dict(zip(labels, p)), "truncated": cut}
        for p, cut in zip(softmax(logits, axis=1).tolist(), cuts)]})
