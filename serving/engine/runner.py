"""One model version in ONNX Runtime, inside an engine: the session on its device, warmed up,
and the calls the engine makes. No PyTorch, no tokenizing: rows of token ids in, arrays out.

Every call goes through I/O binding: inputs bound from host memory, each output copied back
once. On the CPU provider this measured the same as session.run (2,831 against 2,929 sequences/s
at batch 8, 2,246 against 2,181 at batch 64, imdb-gru), so both providers take one path.
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.repository import Manifest, ManifestError, ServingConfig, read_version
from serving.common.settings import Settings
from serving.engine import devices
from serving.engine.devices import CPU, CUDA

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


DEVICE_BATCH = {"CPU": (16, 4096), "CUDA": (1024, 262144)}  # (rows, padded tokens) per call by default
# TF32 breaks the 1e-5 contract: with ONNX Runtime's default (1) a row's logits moved by up to 3.9e-3 on an H100
DEFAULT_PROVIDER_OPTIONS = {CUDA: {"use_tf32": "0"}}


def provider_options(provider: str, *overrides: dict[str, dict[str, str]]) -> dict[str, str]:
    """A provider's options: the defaults, then each override in turn (the server's settings, a
    model's config.json), option by option, so that setting one keeps the others."""
    merged = dict(DEFAULT_PROVIDER_OPTIONS.get(provider, {}))
    for options in overrides:
        merged |= options.get(provider, {})
    return merged


@dataclass(frozen=True)
class Limits:
    """How one model is batched: its config.json over the server's settings over its device's
    defaults (on the CPU, calls of 8-32 rows ran fastest per row: docs/benchmarks.md)."""
    max_batch_size: int
    max_batch_tokens: int
    max_queue_delay_s: float
    max_queue_size: int

    @classmethod
    def of(cls, settings: Settings, config: ServingConfig, provider: str) -> "Limits":
        def pick(name, default=None):
            for source in (config, settings):
                if getattr(source, name) is not None:
                    return getattr(source, name)
            return default
        rows, tokens = DEVICE_BATCH["CUDA" if provider == CUDA else "CPU"]
        return cls(pick("max_batch_size", rows), pick("max_batch_tokens", tokens), pick("max_queue_delay_ms") / 1000,
                   pick("max_queue_size"))


def open_session(graph: bytes, settings: Settings, config: ServingConfig, device: int) -> ort.InferenceSession:
    """An ONNX Runtime session on the first available provider of the model's (else the server's)
    list, with its options merged: the defaults, the server's, the model's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.intra_op_threads or settings.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin_wait else "0")
    wanted = config.providers or settings.providers
    available = ort.get_available_providers()
    providers = [p for p in wanted if p in available] or [CPU]
    chosen = []
    for provider in providers:
        given = provider_options(provider, settings.provider_options, config.provider_options)
        chosen.append((provider, given | {"device_id": str(device)} if provider == CUDA else given))
    return ort.InferenceSession(graph, options, providers=chosen)


def check_placement(session: ort.InferenceSession, wanted: list[str], where: str) -> str:
    """The device the session runs on ("cuda:N" or "cpu"). Asked for CUDA first, a session that
    landed on the CPU is refused where a GPU is visible (never served there as if nothing had
    happened) and allowed, with a warning, where none is."""
    provider = session.get_providers()[0]
    if provider == CUDA:
        return f"cuda:{session.get_provider_options()[CUDA].get('device_id', '0')}"
    if wanted[0] == CUDA:
        why, gpus = devices.why_not_cuda(), devices.visible_gpus()
        if gpus:
            raise ModelLoadError(f"{where}: asked to run on CUDA with {gpus} GPU(s) visible, but {why}; not served "
                                 f"on the CPU instead (RNNSERVE_PROVIDERS='[\"{CPU}\"]' asks for the CPU)")
        log.warning("%s: no GPU visible (%s): running on the CPU", where, why)
    return "cpu"


@dataclass(eq=False)
class Runner:
    name: str
    version: int
    manifest: Manifest
    variant: str
    session: ort.InferenceSession
    limits: Limits
    device: str  # "cuda:N" or "cpu"

    @classmethod
    def load(cls, version_dir: Path, settings: Settings, config: ServingConfig, device: int = 0) -> "Runner":
        """Read a version through the repository contract (its graph checked against the
        manifest's sha256), open it and warm it up. ModelLoadError says why anything failed."""
        try:
            version = read_version(version_dir)
            graph = version.graph_bytes(config.variant)
        except ManifestError as e:
            raise ModelLoadError(f"unreadable model version: {e}") from e
        try:
            session = open_session(graph, settings, config, device)
        except Exception as e:  # ONNX Runtime raises its own exception types
            raise ModelLoadError(f"{version_dir}: ONNX Runtime cannot load the graph: {e}") from e
        placed = check_placement(session, config.providers or settings.providers, str(version_dir))
        runner = cls(version.name, version.number, version.manifest, config.variant, session,
                     Limits.of(settings, config, session.get_providers()[0]), placed)
        try:
            runner.warm_up()
        except Exception as e:  # a graph that loads but does not run on its own inputs
            raise ModelLoadError(f"{version_dir}: the graph fails on warm-up: {type(e).__name__}: {e}") from e
        log.info("loaded %s version %s (%s) on %s, %s", runner.name, runner.version, runner.variant, runner.provider,
                 runner.device)
        return runner

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def task(self) -> str:
        return self.manifest.task

    def warm_up(self):
        """Every length bucket once (powers of two up to max_len) at batch 1 and a full batch."""
        started = time.perf_counter()
        max_len = self.manifest.max_len
        lengths = sorted({min(2 ** i, max_len) for i in range(12)} | {max_len})
        for n in lengths:
            for batch in {1, max(1, min(self.limits.max_batch_size, self.limits.max_batch_tokens // n))}:
                self.run(np.ones((batch, n), dtype=np.int64), np.full(batch, n, dtype=np.int64))
        log.info("warmed up %s over lengths %s in %.2fs", self.name, lengths, time.perf_counter() - started)

    def run(self, ids: np.ndarray, lengths: np.ndarray, state: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """(B, T) right-padded ids, (B,) lengths and (LMs) the state tensors, each (layers, B, H),
        -> every output of the graph: logits first, then (LMs) the new state."""
        feeds = {"input_ids": ids, "lengths": lengths}
        if spec := self.manifest.state:
            feeds |= dict(zip(spec.inputs, state or self.zero_state(len(lengths))))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for output in self.session.get_outputs():
            binding.bind_output(output.name, "cpu")  # one copy back of each
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run_call(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One call over (B, T) right-padded ids and (B,) lengths: a classifier's (B, C) logits, a
        language model's (B, T, V) from the zero state."""
        return self.run(ids, lengths)[0]

    def advance(self, ids: np.ndarray, lengths: np.ndarray, state: list[np.ndarray],
                every: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """LMs: each row's tokens, (B, T) right-padded with (B,) lengths, from its state (one
        (layers, B, H) array per state input, as the graph takes them) -> the next-token logits
        (B, V) at each row's last token (every: (B, T, V) at every token, to score a prompt) and the
        state there, in the same layout."""
        logits, *states = self.run(ids, lengths, state)  # (B, T, V), then (layers, B, H) each
        return logits if every else logits[np.arange(len(lengths)), lengths - 1], states

    def zero_state(self, rows: int) -> list[np.ndarray]:
        """The zero state of `rows` rows: one (layers, rows, H) array per state input of the graph
        (h; and c for an LSTM)."""
        spec = self.manifest.state
        return [np.zeros((spec.layers, rows, spec.hidden_size), np.float32) for _ in spec.inputs]
