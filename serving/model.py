"""A served model: a verified ONNX Runtime session, its tokenizer, and the verbs the routes use.

load (checksum, session, warm-up) -> encode texts into token ids -> predict a padded batch ->
respond with one prediction per row. No PyTorch: ONNX Runtime, numpy and the tokenizer only.
"""
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.codec import TextCodec, pad, softmax
from core.repository import Manifest, ManifestError, Version, read_version, versions
from serving.settings import Settings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


@dataclass
class Step:
    """LM work: advance `state` (S, layers, H) over `ids`."""
    ids: list[int]
    state: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    manifest: Manifest
    codec: TextCodec
    session: ort.InferenceSession
    provider: str
    output_names: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, model_dir: Path, version: int | None, settings: Settings) -> "ServedModel":
        """Load a version (the latest by default) through the repository contract, its graph
        checked against the manifest's sha256, and warm it up. Raises ModelLoadError with the
        reason for anything that fails."""
        found = versions(model_dir)
        if not found or (version and version not in found):
            raise ModelLoadError(f"{model_dir}: no version {version or ''} folder (found {found})")
        path = model_dir / str(version or found[-1])
        try:
            read: Version = read_version(path)
            onnx_bytes = read.graph_bytes("fp32")
        except ManifestError as e:
            raise ModelLoadError(f"unreadable model version: {e}") from e
        version, manifest = read.number, read.manifest
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin_wait else "0")
        available = ort.get_available_providers()
        providers = [p for p in settings.providers if p in available] or ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(onnx_bytes, options, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own exception types
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the graph: {e}") from e
        provider = session.get_providers()[0]
        if settings.providers[0] != provider:
            log.warning("%s is not available here (ONNX Runtime offers %s): %s runs on %s",
                        settings.providers[0], available, model_dir.name, provider)
        log.info("loaded %s version %s on %s", model_dir.name, version, provider)
        model = cls(model_dir.name, version, path, manifest, read.codec, session, provider,
                    [o.name for o in session.get_outputs()])
        try:
            model.warm_up(settings.max_batch_size)
        except Exception as e:  # a graph that loads but does not run on its own inputs
            raise ModelLoadError(f"{path}: the graph fails on warm-up: {type(e).__name__}: {e}") from e
        return model

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def vocab_size(self) -> int:
        return len(self.codec.vocab)

    def warm_up(self, max_batch_size: int):
        """Run every length bucket once (powers of two up to max_len) at batch 1 and full batch."""
        started = time.perf_counter()
        lengths = sorted({min(2 ** i, self.max_len) for i in range(12)} | {self.max_len})
        for n in lengths:
            for batch in (1, max_batch_size):
                self.predict(np.ones((batch, n), dtype=np.int64), np.full(batch, n, dtype=np.int64))
        log.info("warmed up %s over lengths %s in %.2fs", self.name, lengths, time.perf_counter() - started)

    def run_rows(self, rows: list[list[int]]) -> list[np.ndarray]:
        """One call over unpadded rows: classifier logits (C,) per row; LMs (T_i, V) from the zero state."""
        ids, lengths = pad(rows)
        out = self.predict(ids, lengths)
        return list(out) if out.ndim == 2 else [out[i, :n] for i, n in enumerate(lengths)]

    def advance(self, steps: list["Step"]) -> list[tuple[np.ndarray, np.ndarray]]:
        """LMs: run each step's tokens from its state in one call -> (next-token logits (V,),
        state (S, layers, H) at its last token) per step. Steps of any length share the call."""
        ids, lengths = pad([s.ids for s in steps])
        state = self.manifest.state
        feeds = {"input_ids": ids, "lengths": lengths}
        for k, name in enumerate(state.inputs):
            feeds[name] = np.ascontiguousarray(np.stack([s.state[k] for s in steps], axis=1))  # (layers, B, H)
        logits, *states = self.session.run(["logits", *state.outputs], feeds)
        return [(logits[i, n - 1], np.stack([st[:, i] for st in states])) for i, n in enumerate(lengths)]

    def zero_state(self) -> np.ndarray:
        """(S, layers, H): S = 2 for LSTM (h, c), else 1."""
        state = self.manifest.state
        return np.zeros((len(state.inputs), state.layers, state.hidden_size), np.float32)

    def predict(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(B, T) int64 right-padded ids and (B,) lengths -> (B, num_labels) logits; LMs: zero state."""
        feeds = {"input_ids": input_ids, "lengths": lengths}
        if state := self.manifest.state:
            for name in state.inputs:
                feeds[name] = np.zeros((state.layers, len(lengths), state.hidden_size), dtype=np.float32)
        if self.provider != "CUDAExecutionProvider":
            return self.session.run(self.output_names[:1], feeds)[0]
        binding = self.session.io_binding()  # on CUDA: one copy in, one copy of the logits out
        for feed_name, value in feeds.items():
            binding.bind_cpu_input(feed_name, value)
        binding.bind_output(self.output_names[0], "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def respond(self, logits: np.ndarray, truncated: bool) -> dict:
        """One classifier prediction: label, its probability, all probabilities."""
        p = softmax(logits)
        best = int(p.argmax())
        return {"label": self.labels[best], "score": float(p[best]),
                "probabilities": dict(zip(self.labels, map(float, p))), "truncated": truncated}

    def metadata(self) -> dict:
        m = self.manifest
        return {"name": self.name, "version": str(self.version), "task": self.task, "arch": m.arch,
                "labels": self.labels, "max_len": self.max_len, "vocab_size": self.vocab_size, "provider": self.provider,
                "inputs": [t.model_dump() for t in m.inputs], "outputs": [t.model_dump() for t in m.outputs]}
