"""Sampling over the whole batch: for a seed, the same tokens as one stream sampled alone, and the
same texts as the server gave before it sampled in batches (recorded from a2e04d7); a session
step's top k, taken in the engine, as the front-end took it before; the penalties of a batch as
each row's by their definition; log-probabilities as numpy's log of the softmax."""
import asyncio
import json
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.codec import softmax
from serving.engine.sampling import log_probabilities, most_likely, next_tokens, penalized
from tests.serving_fixtures import Server, tiny_repository

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "generation_a2e04d7.json").read_text())


def sampled_alone(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """The server's sampler before this one, per stream (serving/generation.py at a2e04d7)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = (logits.astype(np.float64) - logits.max()) / temperature
    if 0 < top_k < len(z):
        z[z < np.partition(z, -top_k)[-top_k]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p)
        outside = np.cumsum(p[order]) - p[order] >= top_p
        p[order[outside]] = 0
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


@pytest.mark.parametrize("vocab", [2, 47, 1000])
def test_a_batch_samples_what_each_row_would_alone(vocab):
    rng = np.random.default_rng(vocab)
    batch = 400
    logits = (rng.standard_normal((batch, vocab)) * rng.choice([0.1, 1, 5], (batch, 1))).astype(np.float32)
    temperature = rng.choice([0.0, 1e-310, 0.3, 1.0, 2.0], batch)
    top_k = rng.choice([0, 1, 3, vocab // 2, vocab], batch)
    top_p = rng.choice([1.0, 0.95, 0.5, 0.01], batch)
    seeds = rng.integers(0, 10 ** 6, batch)
    uniform = np.array([np.random.default_rng(s).random() for s in seeds])  # each stream's first draw
    expected = [sampled_alone(logits[i], temperature[i], int(top_k[i]), top_p[i], np.random.default_rng(seeds[i]))
                for i in range(batch)]
    assert next_tokens(logits, temperature, top_k, top_p, uniform).tolist() == expected


def most_likely_before(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The front-end's top k of a step's logits before the engine took it (routes/lm.py at 120d4d0)."""
    p = softmax(logits)
    return [(int(i), float(p[i])) for i in np.argsort(-p)[:k]]


@pytest.mark.parametrize("vocab", [2, 47, 30000])
def test_the_engines_top_k_is_what_the_front_end_took_before(vocab):
    """Same ids in the same order, probabilities within 1e-6, k of 1 to 100 (past the vocabulary:
    all of it), rows of several k in one call."""
    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal((32, vocab)) * rng.choice([0.1, 1, 5], (32, 1))).astype(np.float32)
    k = rng.choice([1, 3, 12, 100], 32)
    for row, n, (tokens, p) in zip(logits, k, most_likely(logits, k)):
        expected = most_likely_before(row, int(n))
        assert tokens == [i for i, _ in expected] and len(tokens) == min(n, vocab)
        assert np.abs(np.array(p) - [q for _, q in expected]).max() <= 1e-6
    assert most_likely(logits[:0], k[:0]) == []


def penalized_alone(logits: np.ndarray, prompt: list[int], generated: list[int], presence: float, frequency: float,
                    repetition: float) -> np.ndarray:
    """One row's penalties by their definition (vLLM's, OpenAI's), token by token: the logit of a
    token in the prompt or the text is divided by repetition where positive, else multiplied; then
    less presence once and frequency per time for each generated token."""
    z = logits.astype(np.float64)
    for t in set(prompt) | set(generated):
        z[t] = z[t] / repetition if z[t] > 0 else z[t] * repetition
    for t, count in Counter(generated).items():
        z[t] -= presence + frequency * count
    return z


def test_a_batch_is_penalized_as_each_row_would_be_alone():
    """Rows with and without penalties in one batch: each as its definition says (float32, 1e-5),
    the rows without any untouched; no penalty anywhere: the same array, not a copy."""
    rng, batch, vocab = np.random.default_rng(5), 64, 47
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
    prompts = [rng.integers(0, vocab, rng.integers(1, 10)).tolist() for _ in range(batch)]
    texts = [rng.integers(0, vocab, rng.integers(0, 30)).tolist() for _ in range(batch)]
    presence, frequency = rng.choice([0.0, -2.0, 0.5, 2.0], batch), rng.choice([0.0, -1.0, 0.3, 2.0], batch)
    repetition = rng.choice([1.0, 0.5, 1.3, 2.0], batch)
    presence[::4], frequency[::4], repetition[::4] = 0.0, 0.0, 1.0  # every fourth row: no penalty
    counts, seen = np.zeros((batch, vocab), np.int32), np.zeros((batch, vocab), bool)
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        np.add.at(counts[i], text, 1)
        seen[i, prompt + text] = True
    rows = np.flatnonzero((presence != 0) | (frequency != 0) | (repetition != 1))
    assert 0 < len(rows) < batch
    got = penalized(logits, rows, counts[rows], seen[rows], presence[rows], frequency[rows], repetition[rows])
    expected = np.stack([penalized_alone(logits[i], prompts[i], texts[i], presence[i], frequency[i], repetition[i])
                         for i in range(batch)])
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5
    untouched = np.setdiff1d(np.arange(batch), rows)
    assert (got[untouched] == logits[untouched]).all() and got is not logits
    assert penalized(logits, rows[:0], counts[:0], seen[:0], presence[:0], frequency[:0], repetition[:0]) is logits


def test_log_probabilities_are_the_log_of_the_softmax_with_the_top_n_ranked():
    """Each chosen token's log-probability and the n most likely (ties: the lower id first), as
    float64 numpy takes them, to 1e-5; n of 0 gives none."""
    rng = np.random.default_rng(9)
    logits = (rng.standard_normal((16, 30)) * 4).astype(np.float32)
    logits[0, [3, 7, 11]] = logits[0].max() + 1  # a three-way tie for the first place
    chosen, n = rng.integers(0, 30, 16), rng.choice([0, 1, 5, 20], 16)
    n[0] = 4
    got, top = log_probabilities(logits, chosen, n)
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    assert np.abs(np.array(got) - logp[np.arange(16), chosen]).max() < 1e-5
    for row, k, alternatives in zip(logp, n, top):
        order = sorted(range(30), key=lambda t: (-row[t], t))[:k]
        assert [t for t, _ in alternatives] == order
        assert all(abs(lp - row[t]) < 1e-5 for t, lp in alternatives)
    assert [t for t, _ in top[0][:3]] == [3, 7, 11]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_repository(tmp_path_factory.mktemp("sampling")))
    yield s
    s.stop()


def test_seeded_generations_give_the_texts_recorded_from_the_server_before(server):
    """The 30 recorded requests (greedy, temperatures, top-k, top-p, three seeds), sent all at once
    so that they share steps: each text as recorded."""
    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/models/lm:generate", json=a["request"])
                                          for a in RECORDED["answers"]))
    answers = [r.json() for r in asyncio.run(fire())]
    assert [(a["text"], a["tokens"]) for a in answers] == [(a["text"], a["tokens"]) for a in RECORDED["answers"]]
