"""Seeded request streams drawn from the IMDB test set, shared by Locust, the bench and baselines.

- short: one text of 16-128 words (a random cut of a real review) per request;
- long: whole IMDB test reviews (the server cuts them at the model's max_len, 256 tokens);
- v2: the same short texts, pre-tokenized for the V2 infer API.
"""
import json
import random
from pathlib import Path

from core.repository import read_version
from models.data import CACHE, locate, read_aclimdb

PROMPTS = ["time traveller", "the machine", "it was", "weena", "the morlocks", "i saw", "we", "the psychologist"]


def imdb_test_texts(n: int, seed: int = 0) -> list[str]:
    reviews = [text for text, _ in read_aclimdb(locate("imdb"))["test"]]
    return random.Random(seed).sample(reviews, n)


def short_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for review in imdb_test_texts(n, seed):
        words = review.split()
        k = rng.randint(16, 128)
        while len(words) < k:
            words += words
        start = rng.randint(0, len(words) - k)
        texts.append(" ".join(words[start: start + k]))
    return texts


def texts(workload: str, n: int, seed: int = 0) -> list[str]:
    """The seeded stream, cached as JSON (reading the IMDB archive takes seconds; Locust's run-time
    clock starts before its locustfile is imported)."""
    cached = CACHE / f"loadtest-{workload}-{n}-{seed}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    stream = short_texts(n, seed) if workload == "short" else imdb_test_texts(n, seed)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(stream))
    return stream


def token_rows(model_dir: Path, texts_: list[str]) -> list[list[int]]:
    """The texts as the server encodes them, through the exported version's codec."""
    codec = read_version(model_dir).codec
    return [codec.encode(t)[0] for t in texts_]


def predict_body(*texts_: str) -> bytes:
    return json.dumps({"instances": list(texts_)}).encode()


def v2_body(row: list[int]) -> bytes:
    return json.dumps({"inputs": [{"name": "input_ids", "shape": [1, len(row)], "datatype": "INT64", "data": row},
                                  {"name": "lengths", "shape": [1], "datatype": "INT64", "data": [len(row)]}]}).encode()
