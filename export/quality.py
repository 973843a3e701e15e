"""Held-out quality of an ONNX graph on the run's own validation data: accuracy or perplexity.

Used by python -m export to compare a quantized variant with the fp32 graph.
"""
import math

import numpy as np
import onnxruntime as ort

from core.codec import TextCodec, pad, softmax
from models.data import load_classification, load_corpus


def classifier_accuracy(sess: ort.InferenceSession, config: dict, codec: TextCodec, batch_size: int = 64) -> float:
    args = config["train_args"]
    pairs = load_classification(args["data"], args.get("test_data"), args["seed"]).valid[: args.get("limit")]
    label_id = {label: i for i, label in enumerate(config["labels"])}
    rows = sorted(((codec.encode(text)[0], label_id[label]) for text, label in pairs), key=lambda r: len(r[0]))
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start: start + batch_size]
        ids, lengths = pad([ids for ids, _ in batch])
        logits = sess.run(["logits"], {"input_ids": ids, "lengths": lengths})[0]
        correct += int((logits.argmax(-1) == np.array([y for _, y in batch])).sum())
    return correct / len(rows)


def lm_perplexity(sess: ort.InferenceSession, config: dict, codec: TextCodec) -> float:
    args = config["train_args"]
    ids = np.array([codec.ids(load_corpus(args["data"])[1])[: args.get("limit")]], dtype=np.int64)
    feeds = {"input_ids": ids[:, :-1], "lengths": np.array([ids.shape[1] - 1], dtype=np.int64)}
    for spec in sess.get_inputs()[2:]:
        feeds[spec.name] = np.zeros([1 if d == "batch" else d for d in spec.shape], dtype=np.float32)
    p = softmax(sess.run(["logits"], feeds)[0][0].astype(np.float64))  # (T, V)
    return math.exp(-np.log(p[np.arange(len(p)), ids[0, 1:]]).mean())


def held_out_quality(sess, config: dict, codec: TextCodec) -> dict:
    if config["model"]["task"] == "classifier":
        return {"valid_accuracy": classifier_accuracy(sess, config, codec)}
    return {"valid_perplexity": lm_perplexity(sess, config, codec)}
