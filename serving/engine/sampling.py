"""The next token of every generation in a step, sampled in one vectorized pass over the batch,
and the k most likely next tokens of every session step in another.

Penalties come first, on the rows that have any, greedy rows included (a penalty moves the
argmax too), as vLLM and OpenAI define them: the logit of a token already in the prompt or the
text is divided by repetition_penalty where positive and multiplied where not, then
logits[t] -= presence_penalty * (t generated) + frequency_penalty * (times t generated).

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
    sampled = np.flatnonzero(temperature > 0)
    every = len(sampled) == len(logits)  # no greedy row: the settings are used as they are, uncopied
    tokens = np.empty(len(logits), np.int64) if every else logits.argmax(axis=1)
    if not len(sampled):
        return tokens
    if not every:
        logits, temperature, top_k, top_p, uniform = (a[sampled] for a in (logits, temperature, top_k, top_p, uniform))
    z = logits.astype(np.float64)  # (S, V)
    z -= z.max(axis=1, keepdims=True)  # max 0: no overflow at tiny temperatures
    z /= temperature[:, None]
    vocab = z.shape[1]
    cut = (top_k > 0) & (top_k < vocab)  # rows whose top-k keeps less than the vocabulary
    if cut.any():
        kth = -np.sort(-z, axis=1)[np.arange(len(z)), np.clip(top_k, 1, vocab) - 1]  # each row's k-th largest
        z[cut[:, None] & (z < kth[:, None])] = -np.inf
    p = np.exp(z, out=z)  # z's max is 0 already (the largest survives any top-k)
    p /= p.sum(axis=1, keepdims=True)
    nucleus = np.flatnonzero(top_p < 1)
    if len(nucleus):
        q = p[nucleus]
        order = np.argsort(-q, axis=1)
        ranked = np.take_along_axis(q, order, axis=1)
        outside = np.cumsum(ranked, axis=1) - ranked >= top_p[nucleus, None]  # past the nucleus
        np.put_along_axis(q, order, np.where(outside, 0.0, ranked), axis=1)
        q /= q.sum(axis=1, keepdims=True)
        p[nucleus] = q
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    tokens[sampled] = (cdf <= uniform[:, None]).sum(axis=1)  # = searchsorted(cdf, u, side="right")
    return tokens


def penalized(logits: np.ndarray, rows: np.ndarray, counts: np.ndarray, seen: np.ndarray, presence: np.ndarray,
              frequency: np.ndarray, repetition: np.ndarray) -> np.ndarray:
    """(B, V) logits and, for the R rows `rows` of them, their (R, V) counts of generated tokens,
    (R, V) masks of the tokens in their prompt or text and their (R,) penalties -> the logits as
    sampled from: a copy with those rows penalized (the same array when R is 0)."""
    if not len(rows):
        return logits
    out = logits.copy()
    r, f, p = (setting[:, None].astype(out.dtype) for setting in (repetition, frequency, presence))
    z = out[rows]  # (R, V)
    z = np.where(seen, np.where(z > 0, z / r, z * r), z)
    out[rows] = z - (f * counts + p * (counts > 0))
    return out


def log_probabilities(logits: np.ndarray, chosen: np.ndarray, n: np.ndarray) -> tuple[list[float], list[list]]:
    """(B, V) logits as sampled from, (B,) chosen tokens and (B,) how many alternatives -> each
    chosen token's log-probability (log-softmax over the whole vocabulary, in float32) and each
    row's n most likely (id, log-probability), most likely first (ties: the lower id first)."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))  # (B, V) log-softmax
    chosen_logprobs = z[np.arange(len(z)), chosen].tolist()
    if not n.max(initial=0):
        return chosen_logprobs, [[] for _ in n]
    top, q = ranked(z, n)
    return chosen_logprobs, [list(zip(t[:k], r[:k])) for t, r, k in zip(top.tolist(), q.tolist(), n.tolist())]


def ranked(scores: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, V) scores and (B,) k -> the ids (B, max k) of each row's highest scores and those scores,
    highest first (ties: the lower id first)."""
    vocab, most = scores.shape[1], min(int(k.max(initial=1)), scores.shape[1])
    top = (np.argpartition(-scores, most - 1, axis=1)[:, :most] if most < vocab
           else np.tile(np.arange(vocab), (len(scores), 1)))
    q = np.take_along_axis(scores, top, axis=1)  # (B, most), unordered
    order = np.lexsort((top, -q))  # (B, most): by score, then id
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(q, order, axis=1)


def most_likely(logits: np.ndarray, k: np.ndarray) -> list[tuple[list[int], list[float]]]:
    """(B, V) logits and (B,) k -> each row's k most likely token ids and their probabilities
    (softmax over the whole vocabulary, in float32), most likely first (ties: the lower id first)."""
    top, q = ranked(softmax(logits.astype(np.float32, copy=False)), k)  # of (B, V) probabilities
    return [(t[:n].tolist(), r[:n].tolist()) for t, r, n in zip(top, q, k.tolist())]
