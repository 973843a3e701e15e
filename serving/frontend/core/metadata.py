"""What the front-end says about the models it serves: V1's and V2's metadata, and their names."""
from core.repository import Tensor
from serving.frontend.core.front import Front, engines, served

DATATYPES = {"int64": "INT64", "float32": "FP32"}


def tensor_metadata(tensor: Tensor) -> dict:
    return {"name": tensor.name, "datatype": DATATYPES[tensor.dtype],
            "shape": [d if isinstance(d, int) else -1 for d in tensor.shape]}


def v2_metadata(front: Front, name: str, version: str | None = None) -> dict:
    """A model's V2 metadata: versions, platform, tensors, and where it runs."""
    link, served_version = served(front, name, version)
    manifest, deployed = served_version.manifest, link.catalog[name]
    return {"name": name, "versions": [str(served_version.number)], "platform": "onnxruntime_onnx",
            "inputs": [tensor_metadata(t) for t in manifest.inputs[:2]],
            "outputs": [tensor_metadata(t) for t in manifest.outputs[:1]],
            "parameters": {"provider": deployed.provider, "device": deployed.device}}


def v1_metadata(front: Front, name: str) -> dict:
    """A model's V1 metadata: task, labels, vocabulary, where it runs, tensors."""
    link, version = served(front, name)
    m, deployed = version.manifest, link.catalog[name]
    return {"name": name, "version": str(version.number), "task": m.task, "arch": m.arch, "labels": m.labels,
            "max_len": m.max_len, "vocab_size": len(version.codec.vocab), "provider": deployed.provider,
            "device": deployed.device, "variant": deployed.variant, "inputs": [t.model_dump() for t in m.inputs],
            "outputs": [t.model_dump() for t in m.outputs]}


def served_names(front: Front) -> list[str]:
    return sorted({name for link in engines(front).links for name in link.catalog or {}})
