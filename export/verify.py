"""Parity of an exported graph with its PyTorch model, run at export time (python -m export).

Checks, on random batches of mixed lengths (1 and max_len always among them):
- PyTorch vs ONNX Runtime (CPU EP), batch sizes 1 to 64;
- batched vs one-by-one: each row in a padded batch equals that row run alone;
- LMs: one token at a time with the state carried through the graph equals the whole run;
- lengths beyond the export example (1, 3, 2 x max_len) run and match.
Any failure raises ParityError with the worst case; the report goes into the manifest.
"""
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from core.codec import pad
from export.graph import LanguageModelGraph, io_spec
from models.rnn import ModelConfig

TOLERANCE = {"pytorch_vs_onnxruntime": 1e-4, "batched_vs_alone": 1e-5, "stepwise_vs_whole": 1e-5,
             "long_sequences": 1e-4}


class ParityError(AssertionError):
    pass


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def random_batch(rng: np.random.Generator, cfg: ModelConfig, batch: int, max_len: int, lengths=None) -> dict:
    """Feeds for one batch: right-padded ids, lengths and (LMs) a random initial state."""
    lengths = rng.integers(1, max_len + 1, batch) if lengths is None else np.asarray(lengths)
    ids, lengths = pad([rng.integers(2, cfg.vocab_size, n) for n in lengths])
    feeds = {"input_ids": ids, "lengths": lengths}
    if cfg.task == "lm":
        for spec in io_spec(cfg)[0][2:]:
            shape = [batch if d == "batch" else d for d in spec["shape"]]
            feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def rows(feeds: dict, i: int) -> dict:
    """Row i of a batch, alone and without padding."""
    n = int(feeds["lengths"][i])
    one = {"input_ids": feeds["input_ids"][i:i + 1, :n], "lengths": feeds["lengths"][i:i + 1]}
    return one | {k: v[:, i:i + 1] for k, v in feeds.items() if k not in one}


def real(outputs: list[np.ndarray], feeds: dict, cfg: ModelConfig) -> list[np.ndarray]:
    """The outputs that are defined: LM logits past a row's length are zeroed (they are padding)."""
    if cfg.task == "classifier":
        return outputs
    mask = np.arange(outputs[0].shape[1])[None, :, None] < feeds["lengths"][:, None, None]
    return [outputs[0] * mask] + outputs[1:]


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def verify(model: nn.Module, cfg: ModelConfig, path: Path, max_len: int, cases: int = 100, seed: int = 0,
           enforce: bool = True) -> dict:
    """The parity report; raises ParityError past a tolerance unless enforce=False (measure only)."""
    started = time.time()
    sess = session(path)
    expected = [s["name"] for s in io_spec(cfg)[0]]
    if [i.name for i in sess.get_inputs()] != expected:
        raise ParityError(f"graph inputs are {[i.name for i in sess.get_inputs()]}, expected {expected}")
    graph = (LanguageModelGraph(model) if cfg.task == "lm" else model).eval()
    names = [o.name for o in sess.get_outputs()]

    def torch_run(feeds):
        with torch.no_grad():
            out = graph(*(torch.from_numpy(feeds[n]) for n in expected))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    def ort_run(feeds):
        return sess.run(names, feeds)

    rng = np.random.default_rng(seed)
    worst = dict.fromkeys(TOLERANCE, 0.0)
    for case in range(cases):
        batch = int(rng.integers(1, 65)) if case > 1 else (1, 64)[case]
        lengths = rng.integers(1, max_len + 1, batch)
        lengths[0], lengths[-1] = 1, max_len
        feeds = random_batch(rng, cfg, batch, max_len, lengths)
        got = real(ort_run(feeds), feeds, cfg)
        worst["pytorch_vs_onnxruntime"] = max(worst["pytorch_vs_onnxruntime"],
                                              max_diff(real(torch_run(feeds), feeds, cfg), got))
        if case % 10 == 0:  # every row alone, for a tenth of the batches
            for i in range(batch):
                alone = real(ort_run(rows(feeds, i)), rows(feeds, i), cfg)
                n = int(feeds["lengths"][i])
                mine = [got[0][i:i + 1, :n] if cfg.task == "lm" else got[0][i:i + 1]] + [s[:, i:i + 1] for s in got[1:]]
                worst["batched_vs_alone"] = max(worst["batched_vs_alone"], max_diff(mine, alone))
    if cfg.task == "lm":
        worst["stepwise_vs_whole"] = stepwise_diff(ort_run, cfg, rng, max_len)
    longest = min(2 * max_len, cfg.encoder["max_position_embeddings"]) if cfg.encoder else 2 * max_len
    for length in (1, 3, longest):
        feeds = random_batch(rng, cfg, 4, length, [length, 1, length, max(1, length // 2)])
        worst["long_sequences"] = max(worst["long_sequences"],
                                      max_diff(real(torch_run(feeds), feeds, cfg), real(ort_run(feeds), feeds, cfg)))
    failed = {k: v for k, v in worst.items() if v > TOLERANCE[k]}
    if failed and enforce:
        raise ParityError(f"{path}: parity failed: {failed} (tolerances {TOLERANCE})")
    return {"cases": cases, "max_abs_diff": worst, "tolerance": TOLERANCE, "within_tolerance": not failed,
            "seconds": round(time.time() - started, 2)}


def stepwise_diff(ort_run, cfg: ModelConfig, rng: np.random.Generator, max_len: int, rows_: int = 4) -> float:
    """Whole-sequence run vs one token at a time with the state fed back through the graph."""
    feeds = random_batch(rng, cfg, rows_, max_len, [max_len] * rows_)
    whole = ort_run(feeds)
    state = {k: v for k, v in feeds.items() if k not in ("input_ids", "lengths")}
    worst = 0.0
    for t in range(max_len):
        step = {"input_ids": feeds["input_ids"][:, t:t + 1], "lengths": np.ones(rows_, dtype=np.int64)} | state
        out = ort_run(step)
        worst = max(worst, float(np.abs(out[0][:, 0] - whole[0][:, t]).max()))
        state = dict(zip(state, out[1:]))
    return max(worst, max_diff(list(state.values()), whole[1:]))
