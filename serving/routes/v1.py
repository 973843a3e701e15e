"""KServe V1 text API: classify texts; list the models."""
from fastapi import APIRouter, HTTPException, Request

from core.codec import softmax
from serving.inference import answered, check_text, engines, infer, json_response, served
from serving.schemas import PredictRequest, PredictResponse

router = APIRouter(prefix="/v1/models", tags=["v1"])


def metadata(request: Request, name: str) -> dict:
    link, version = served(request.app.state, name)
    m, deployed = version.manifest, link.catalog[name]
    return {"name": name, "version": str(version.number), "task": m.task, "arch": m.arch, "labels": m.labels,
            "max_len": m.max_len, "vocab_size": len(version.codec.vocab), "provider": deployed.provider,
            "device": deployed.device, "variant": deployed.variant, "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs]}


@router.get("")
async def list_models(request: Request) -> dict:
    """Every loaded model with its version, task, labels and execution provider."""
    names = sorted({name for link in engines(request.app.state).links for name in link.catalog or {}})
    return {"models": [metadata(request, name) for name in names]}


@router.get("/{name}")
async def model_info(name: str, request: Request) -> dict:
    """One model's metadata."""
    return metadata(request, name)


@router.post("/{name}:predict", response_model=PredictResponse)
async def predict(name: str, body: PredictRequest, request: Request):
    """Classify texts: {"instances": ["a review", ...]} -> one prediction per text."""
    with answered(name, "v1_predict"):
        limit = request.app.state.settings.max_instances
        if len(body.instances) > limit:
            raise HTTPException(413, f"{len(body.instances)} instances; at most {limit} per request")
        for i, text in enumerate(body.instances):
            check_text(request.app.state.settings, text, f"instance {i}")
        version, encoded, logits = await infer(request.app.state, name, lambda v: [v.codec.encode(t) for t in body.instances],
                                               task="classifier", receive=request.receive)
        labels = version.manifest.labels
        return json_response({"predictions": [
            {"label": labels[best := max(range(len(p)), key=p.__getitem__)], "score": p[best],
             "probabilities": dict(zip(labels, p)), "truncated": cut}
            for p, (_, cut) in zip(softmax(logits, axis=1).tolist(), encoded)]})
