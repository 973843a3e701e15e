"""KServe V1 text API: classify texts; list the models."""
from fastapi import HTTPException, Request

from core.codec import TextCodec, softmax
from serving.common.messages import Rows
from serving.frontend import service
from serving.frontend.responses import json_response
from serving.frontend.schemas import PredictRequest


async def list_models(request: Request) -> dict:
    """Every loaded model with its version, task, labels, execution provider and device."""
    state = request.app.state
    return {"models": [service.v1_metadata(state, name) for name in service.served_names(state)]}


async def model_info(name: str, request: Request) -> dict:
    """One model's metadata."""
    return service.v1_metadata(request.app.state, name)


async def predict(name: str, body: PredictRequest, request: Request):
    """Classify texts: {"instances": ["a review", ...]} -> one prediction per text."""
    with service.answered():
        settings = request.app.state.settings
        if len(body.instances) > settings.max_instances:
            raise HTTPException(413, f"{len(body.instances)} instances; at most {settings.max_instances} per request")
        for i, text in enumerate(body.instances):
            service.check_text(settings, text, f"instance {i}")
        version, cuts, logits = await service.infer(request.app.state, name, lambda v: encoded(v.codec, body.instances),
                                                    task="classifier", receive=request.receive)
        labels = version.manifest.labels
        return json_response({"predictions": [
            {"label": labels[best := max(range(len(p)), key=p.__getitem__)], "score": p[best],
             "probabilities": dict(zip(labels, p)), "truncated": cut}
            for p, cut in zip(softmax(logits, axis=1).tolist(), cuts)]})


def encoded(codec: TextCodec, texts: list[str]) -> tuple[Rows, list[bool]]:
    """The texts' rows, and which were cut at max_len."""
    each = [codec.encode(text) for text in texts]
    return Rows.of([ids for ids, _ in each]), [cut for _, cut in each]
