"""What the front-end says about the models it serves: V1's and V2's metadata, Triton's model
configuration, and their names. A classifier's V2 tensors are the graph's (input_ids, lengths ->
logits) and the text's (text_input -> probabilities, label): either input form, so each input is
optional in its configuration."""
from core.repository import Manifest, Tensor
from serving.frontend.core.front import Front, engines, served
from serving.frontend.core.tensors import TEXT

DATATYPES = {"int64": "INT64", "float32": "FP32"}
CONFIG_TYPES = {"INT64": "TYPE_INT64", "FP32": "TYPE_FP32", "BYTES": "TYPE_STRING"}  # model_config.proto's names


def row_dims(tensor: Tensor) -> list[int]:
    """A tensor's dims past the batch dimension (-1 for a variable one); one of a single value per
    row (lengths, [B]) has dims [1], so that Triton's clients (perf_analyzer) can shape it: it is
    read as [B, 1] or [B] (serving/frontend/core/tensors.py)."""
    dims = [d if isinstance(d, int) else -1 for d in tensor.shape[1:]]
    return dims if dims else [1]


def v2_tensors(manifest: Manifest) -> tuple[list[tuple], list[tuple]]:
    """A model's V2 inputs and outputs, each (name, datatype, dims past the batch dimension)."""
    inputs = [(t.name, DATATYPES[t.dtype], row_dims(t)) for t in manifest.inputs[:2]]
    outputs = [(t.name, DATATYPES[t.dtype], row_dims(t)) for t in manifest.outputs[:1]]
    if manifest.task != "classifier":
        return inputs, outputs
    return [*inputs, (TEXT, "BYTES", [1])], [*outputs, ("probabilities", "FP32", [len(manifest.labels)]),
                                             ("label", "BYTES", [1])]


def v2_metadata(front: Front, name: str, version: str | None = None) -> dict:
    """A model's V2 metadata: versions, platform, tensors, and where it runs."""
    link, served_version = served(front, name, version)
    deployed = link.catalog[name]
    inputs, outputs = v2_tensors(served_version.manifest)
    return {"name": name, "versions": [str(served_version.number)], "platform": "onnxruntime_onnx",
            "inputs": [{"name": n, "datatype": datatype, "shape": [-1, *dims]} for n, datatype, dims in inputs],
            "outputs": [{"name": n, "datatype": datatype, "shape": [-1, *dims]} for n, datatype, dims in outputs],
            "parameters": {"provider": deployed.provider, "device": deployed.device}}


def model_config(front: Front, name: str, version: str | None = None) -> dict:
    """A model's configuration as Triton's model configuration extension gives it (model_config.proto
    in its JSON form): how it is batched, on what and by how many engines, and, for a language
    model, that its streams are decoupled (any number of responses per request). A classifier's
    inputs are optional: a request sends text_input or input_ids and lengths."""
    link, served_version = served(front, name, version)
    manifest, deployed = served_version.manifest, link.catalog[name]
    inputs, outputs = v2_tensors(manifest)
    engines_serving = sum(name in (other.catalog or {}) for other in engines(front).links)
    gpu = deployed.device.startswith("cuda")
    return {"name": name, "platform": "onnxruntime_onnx", "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": [served_version.number]}},
            "max_batch_size": deployed.max_batch_size,
            "input": [{"name": n, "data_type": CONFIG_TYPES[datatype], "dims": dims,
                       "optional": manifest.task == "classifier"} for n, datatype, dims in inputs],
            "output": [{"name": n, "data_type": CONFIG_TYPES[datatype], "dims": dims} for n, datatype, dims in outputs],
            "dynamic_batching": {"max_queue_delay_microseconds": round(deployed.max_queue_delay_s * 1e6),
                                 "default_queue_policy": {"max_queue_size": deployed.max_queue_size}},
            "instance_group": [{"name": name, "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": engines_serving,
                                "gpus": [int(deployed.device.split(":")[1])] if gpu else []}],
            "model_transaction_policy": {"decoupled": manifest.task == "lm"},
            "parameters": {"provider": {"string_value": deployed.provider},
                           "variant": {"string_value": deployed.variant}}}


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
