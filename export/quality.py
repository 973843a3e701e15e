"""Held-out quality of an ONNX graph on the run's own validation data: accuracy or perplexity.

Used by python -m export to compare a quantized variant with the fp32 graph.
"""
import math

import numpy as np
import onnxruntime as ort

from models.data import load_classification, load_corpus
from models.tokenize import Tokenizer, Vocab


def classifier_accuracy(sess: ort.InferenceSession, config: dict, tokenizer: Tokenizer, vocab: Vocab,
                        batch_size: int = 64) -> float:
    args = config["train_args"]
    pairs = load_classification(args["data"], args.get("test_data"), args["seed"]).valid[: args.get("limit")]
    label_id = {label: i for i, label in enumerate(config["labels"])}
    rows = sorted(((vocab.encode(tokenizer(text)[: config["max_len"]]) or [1], label_id[label])
                   for text, label in pairs), key=lambda r: len(r[0]))
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        lengths = np.array([len(ids) for ids, _ in batch], dtype=np.int64)
        ids = np.zeros((len(batch), lengths.max()), dtype=np.int64)
        for i, (row, _) in enumerate(batch):
            ids[i, : len(row)] = row
        logits = sess.run(["logits"], {"input_ids": ids, "lengths": lengths})[0]
        correct += int((logits.argmax(-1) == np.array([y for _, y in batch])).sum())
    return correct / len(rows)


def lm_perplexity(sess: ort.InferenceSession, config: dict, tokenizer: Tokenizer, vocab: Vocab) -> float:
    args = config["train_args"]
    ids = np.array([vocab.encode(tokenizer(load_corpus(args["data"])[1])[: args.get("limit")])], dtype=np.int64)
    feeds = {"input_ids": ids[:, :-1], "lengths": np.array([ids.shape[1] - 1], dtype=np.int64)}
    for spec in sess.get_inputs()[2:]:
        feeds[spec.name] = np.zeros([1 if d == "batch" else d for d in spec.shape], dtype=np.float32)
    logits = sess.run(["logits"], feeds)[0][0].astype(np.float64)  # (T, V)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return math.exp(-log_probs[np.arange(len(logits)), ids[0, 1:]].mean())


def held_out_quality(sess, config, tokenizer, vocab) -> dict:
    if config["model"]["task"] == "classifier":
        return {"valid_accuracy": classifier_accuracy(sess, config, tokenizer, vocab)}
    return {"valid_perplexity": lm_perplexity(sess, config, tokenizer, vocab)}
