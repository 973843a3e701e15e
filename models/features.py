"""A frozen encoder's hidden states, computed once per data split and kept on disk, so that every
epoch and every head trained on the same data (python -m models.train ... --freeze-encoder) reads
them instead of running the encoder again.

    <cache>/<key>/vectors.npy   (sum of lengths, hidden) float16: each text's vectors, one after another
    <cache>/<key>/offsets.npy   (texts + 1,) int64: text i is vectors[offsets[i]: offsets[i + 1]]

The key is a hash of the encoder (its config and weights), its tokenizer and the split's token ids
(which carry the data, --limit, --max-len and the split itself). Written under a temporary name
and renamed, so a run cut off leaves no half cache. Read with np.load (no pickle), memory-mapped.
"""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.codec import pad, right_padded
from models.data import CACHE
from models.encoder import encode

DEFAULT_CACHE = CACHE / "features"


def key_of(encoder_config: dict, weights: Path, tokenizer_file: Path, examples: list) -> str:
    """A hash of what the vectors depend on. examples: (token ids, label) pairs."""
    h = hashlib.sha256(json.dumps(encoder_config, sort_keys=True).encode())
    for path in (weights, tokenizer_file):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    for ids, _ in examples:
        h.update(np.asarray(ids, np.int64).tobytes() + b"|")
    return h.hexdigest()[:24]


class Features:
    """The cached vectors of one split: .vectors (memory-mapped), .offsets, .lengths."""

    def __init__(self, folder: Path):
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.lengths = np.diff(self.offsets)

    def batch(self, indices: list[int], crop: int | None = None) -> torch.Tensor:
        """(B, T, hidden) float32, right-padded with zeros: each text's first `crop` vectors (all if None)."""
        spans = [(self.offsets[i], self.offsets[i] + min(self.lengths[i], crop or self.lengths[i])) for i in indices]
        lengths = np.array([b - a for a, b in spans], np.int64)
        vectors = np.concatenate([self.vectors[a:b] for a, b in spans])  # (sum of lengths, hidden)
        return torch.from_numpy(right_padded(vectors, lengths, np.float32))


@torch.no_grad()
def compute(encoder, examples: list, folder: Path, batch_size: int, device, name: str):
    """Run the encoder (eval mode) over every text, longest first, and write the cache folder."""
    encoder.eval()
    lengths = np.array([len(ids) for ids, _ in examples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hidden = encoder.config.hidden_size
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    vectors = np.lib.format.open_memmap(partial / "vectors.npy", "w+", np.float16, (int(offsets[-1]), hidden))
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: little padding
    started = time.time()
    for start in tqdm(range(0, len(order), batch_size), desc=f"encoding {name}", mininterval=5):
        batch = order[start: start + batch_size]
        ids, batch_lengths = pad([examples[i][0] for i in batch])
        out = encode(encoder, torch.from_numpy(ids).to(device), torch.from_numpy(batch_lengths)).float().cpu().numpy()
        for row, i in enumerate(batch):
            vectors[offsets[i]: offsets[i + 1]] = out[row, : lengths[i]]
    vectors.flush()
    del vectors
    np.save(partial / "offsets.npy", offsets)
    partial.rename(folder)
    size = (folder / "vectors.npy").stat().st_size
    print(f"features {name}: {len(examples)} texts, {offsets[-1]:,} vectors, {size / 1e9:.2f} GB, "
          f"{time.time() - started:.0f}s -> {folder}")


def cached(encoder, encoder_config: dict, weights: Path, tokenizer_file: Path, examples: list, cache: Path,
           batch_size: int, device, name: str) -> Features:
    """The split's features from the cache, computed first if they are not there."""
    folder = cache / key_of(encoder_config, weights, tokenizer_file, examples)
    if not (folder / "offsets.npy").exists():
        compute(encoder, examples, folder, batch_size, device, name)
    else:
        print(f"features {name}: from the cache {folder}")
    return Features(folder)
