"""Seeded request streams drawn from the IMDB test set, shared by Locust, the bench and baselines.

- short: one text of 16-128 words (a random cut of a real review) per request;
- long: whole IMDB test reviews (the server cuts them at the model's max_len, 256 tokens);
- v2: the same short texts, pre-tokenized for the V2 infer API (or as they are, its text_input).
"""
import json
import random
from pathlib import Path

from core.codec import pad
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


def v2_body(*rows: list[int]) -> bytes:
    """A V2 infer request with JSON tensors."""
    ids, lengths = pad(list(rows))
    return json.dumps({"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.ravel().tolist()},
                                  {"name": "lengths", "shape": list(lengths.shape), "datatype": "INT64", "data": lengths.tolist()}]}).encode()


def v2_binary_body(*rows: list[int]) -> tuple[bytes, int]:
    """A V2 infer request with binary tensors in and out, as tritonclient.http sends it by default:
    (body, its JSON header's length, for Inference-Header-Content-Length)."""
    ids, lengths = pad(list(rows))
    header = json.dumps({"inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64",
                                     "parameters": {"binary_data_size": ids.nbytes}},
                                    {"name": "lengths", "shape": list(lengths.shape), "datatype": "INT64",
                                     "parameters": {"binary_data_size": lengths.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + ids.tobytes() + lengths.tobytes(), len(header)


def v2_text_body(*texts_: str) -> bytes:
    """A V2 infer request of a classifier's text_input with JSON data (every output, as JSON)."""
    return json.dumps({"inputs": [{"name": "text_input", "shape": [len(texts_)], "datatype": "BYTES",
                                   "data": list(texts_)}]}).encode()


def v2_text_binary_body(*texts_: str) -> tuple[bytes, int]:
    """text_input as tritonclient.http sends it by default: BYTES serialized after the JSON header
    (each a 4-byte little-endian length, then the UTF-8), every output asked as binary; (body, its
    JSON header's length)."""
    raw = serialized(texts_)
    header = json.dumps({"inputs": [{"name": "text_input", "shape": [len(texts_)], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + raw, len(header)


def serialized(texts_) -> bytes:
    """Texts as BYTES elements, as Triton's clients lay them out: each a 4-byte little-endian length, then the UTF-8."""
    return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts_)
