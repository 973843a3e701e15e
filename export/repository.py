"""Write a trained run into the model repository as a new version, verified.

    python -m export runs/imdb-bilstm --repository model_repository [--name imdb-bilstm]

The layout and the manifest are core/repository.py's contract. A version is written into a
hidden folder and renamed into place only once every check has passed, so a failed export
leaves nothing behind and earlier versions are never touched.
"""
import datetime
import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from core.codec import TextCodec
from core.repository import FORMAT_VERSION, VOCAB, Manifest, read_version, sha256, versions, write_manifest
from export.graph import export_onnx, io_spec, state_spec
from export.quality import held_out_quality
from export.verify import ParityError, session, verify
from models.checkpoint import load_run
from models.rnn import ModelConfig

MAX_INT8_LOSS = 0.01  # accuracy (fraction) a quantized variant may lose; perplexity: 1%


def export_run(run: Path, repository: Path, name: str | None = None, opset: int = 17,
               quantize: str | None = None, fp16: bool = False, cases: int = 100) -> Path:
    """Export, verify and publish `run` as the next version of `name`; returns the version folder."""
    run, repository = Path(run), Path(repository)
    model, config, tokenizer, vocab = load_run(run)
    cfg = ModelConfig(**config["model"])
    name = name or run.name
    version = (versions(repository / name) or [0])[-1] + 1
    staging = repository / name / f".{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        onnx_path = export_onnx(model, cfg, staging / "model.onnx", opset)
        parity = verify(model, cfg, onnx_path, config["max_len"], cases)
        print(f"parity: {json.dumps(parity['max_abs_diff'])} over {parity['cases']} batches in {parity['seconds']}s")
        graphs = {"fp32": {"file": onnx_path.name, "sha256": sha256(onnx_path), "parity": parity}}
        if quantize:
            codec = TextCodec(tokenizer, vocab, config["max_len"])
            graphs["int8"] = int8_variant(onnx_path, staging / "model.int8.onnx", model, cfg, config, codec)
        if fp16:
            graphs["fp16"] = fp16_variant(onnx_path, staging / "model.fp16.onnx", model, cfg, config["max_len"])
        shutil.copy(run / config["vocab_file"], staging / VOCAB)
        if tokenizer.file:  # the encoder's tokenizer.json: the server tokenizes with it
            shutil.copy(run / tokenizer.file, staging / tokenizer.file)
        write_manifest(staging, build_manifest(cfg, config, graphs, run, opset))
        target = repository / name / str(version)
        staging.rename(target)
        read_version(target)  # what was written reads back through the contract
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {target}")
    return target


def build_manifest(cfg: ModelConfig, config: dict, graphs: dict, run: Path, opset: int) -> Manifest:
    inputs, outputs = io_spec(cfg)
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    return Manifest(
        format_version=FORMAT_VERSION, task=cfg.task, arch=cfg.arch, labels=config["labels"], tokenizer=config["tokenizer"],
        max_len=config["max_len"], inputs=inputs, outputs=outputs,
        state=state_spec(cfg) if cfg.task == "lm" else None, graphs=graphs, model=cfg.to_dict(),
        metrics={k: v for k, v in metrics.items() if k != "history"}, opset=opset,
        versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        source_run=str(run), exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def int8_variant(fp32_path: Path, path: Path, model, cfg, config: dict, codec: TextCodec) -> dict:
    """ONNX Runtime dynamic quantization, kept only if held-out quality stays within bounds.

    Dynamic quantization scales activations over the whole batch, so a row's output then depends
    on its batch-mates: the variant records the differences it keeps instead of the fp32 guarantee.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8)
    fp32 = held_out_quality(session(fp32_path), config, codec)
    int8 = held_out_quality(session(path), config, codec)
    key = next(iter(fp32))
    loss = fp32[key] - int8[key] if key.endswith("accuracy") else (int8[key] - fp32[key]) / fp32[key]
    print(f"int8: {key} {int8[key]:.4f} vs fp32 {fp32[key]:.4f}")
    if loss > MAX_INT8_LOSS:
        path.unlink()
        raise ParityError(f"int8 variant refused: {key} {int8[key]:.4f} vs fp32 {fp32[key]:.4f} "
                          f"loses more than {MAX_INT8_LOSS:.0%}")
    parity = verify(model, cfg, path, config["max_len"], cases=20, enforce=False)  # measured, not enforced
    return {"file": path.name, "sha256": sha256(path), "quality": {"int8": int8, "fp32": fp32}, "parity": parity,
            "guarantee": "approximate: a row's output depends slightly on its batch-mates"}


def fp16_variant(fp32_path: Path, path: Path, model, cfg, max_len: int) -> dict:
    """float16 weights and compute for the CUDA execution provider (float32 inputs and outputs).

    Here it is checked on the CPU execution provider only, measured and not enforced."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(path))
    try:
        cpu = verify(model, cfg, path, max_len, cases=20, enforce=False)
    except Exception as e:  # e.g. no float16 kernel for a node on the CPU execution provider
        cpu = {"error": str(e).splitlines()[0][:300]}
    return {"file": path.name, "sha256": sha256(path), "parity": cpu,
            "guarantee": "approximate: float16 arithmetic; parity measured on the CPU execution provider only"}
