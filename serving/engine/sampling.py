"""The next token of every generation in a step, sampled in one vectorized pass over the batch,
and the k most likely next tokens of every session step in another.

Greedy rows take the argmax; the others divide by their temperature, keep their top k and their
nucleus (top p), and draw with their own seeded generator: each generation draws its uniforms
from numpy's default_rng(seed), one per token, exactly as rng.choice(V, p=p) would. So a seed
gives the same text whatever else shares the step, and the same text as the server did when it
sampled each stream on its own (tests/fixtures/generation_a2e04d7.json).
"""
import numpy as np

from core.codec import softmax


def next_tokens(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray,
                uniform: np.ndarray) -> np.ndarray:
    """(B, V) logits, and per row its temperature (0: greedy), top_k (0: off), top_p (1: off)
    and uniform draw in [0, 1) -> (B,) token ids."""
    tokens = logits.argmax(axis=1)
    sampled = np.flatnonzero(temperature > 0)
    if not len(sampled):
        return tokens
    rows = logits[sampled].astype(np.float64)
    z = (rows - rows.max(axis=1, keepdims=True)) / temperature[sampled, None]  # max 0: no overflow at tiny temperatures
    k = top_k[sampled].astype(np.int64)
    vocab = z.shape[1]
    cut = (k > 0) & (k < vocab)  # rows whose top-k keeps less than the vocabulary
    if cut.any():
        kth = -np.sort(-z, axis=1)[np.arange(len(z)), np.clip(k, 1, vocab) - 1]  # each row's k-th largest
        z[cut[:, None] & (z < kth[:, None])] = -np.inf
    p = np.exp(z)  # z's max is 0 already (the largest survives any top-k)
    p /= p.sum(axis=1, keepdims=True)
    nucleus = np.flatnonzero(top_p[sampled] < 1)
    if len(nucleus):
        q = p[nucleus]
        order = np.argsort(-q, axis=1)
        ranked = np.take_along_axis(q, order, axis=1)
        outside = np.cumsum(ranked, axis=1) - ranked >= top_p[sampled][nucleus, None]  # past the nucleus
        np.put_along_axis(q, order, np.where(outside, 0.0, ranked), axis=1)
        q /= q.sum(axis=1, keepdims=True)
        p[nucleus] = q
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    tokens[sampled] = (cdf <= uniform[sampled, None]).sum(axis=1)  # = searchsorted(cdf, u, side="right")
    return tokens


def most_likely(logits: np.ndarray, k: np.ndarray) -> list[tuple[list[int], list[float]]]:
    """(B, V) logits and (B,) k -> each row's k most likely token ids and their probabilities
    (softmax over the whole vocabulary, in float32), most likely first (ties: the lower id first)."""
    p = softmax(logits.astype(np.float32, copy=False))  # (B, V)
    vocab, most = p.shape[1], min(int(k.max(initial=1)), p.shape[1])
    top = np.argpartition(-p, most - 1, axis=1)[:, :most] if most < vocab else np.tile(np.arange(vocab), (len(p), 1))
    q = np.take_along_axis(p, top, axis=1)  # (B, most), unordered
    order = np.lexsort((top, -q))  # (B, most): by probability, then id
    top, q = np.take_along_axis(top, order, axis=1), np.take_along_axis(q, order, axis=1)
    return [(t[:n].tolist(), r[:n].tolist()) for t, r, n in zip(top, q, k.tolist())]
