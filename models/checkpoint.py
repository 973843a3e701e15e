"""A run folder: config.json, vocab.json, model.safetensors, metrics.json, curves.png (and the
encoder's tokenizer.json for a classifier with a pretrained encoder).

    python -m models.checkpoint runs/imdb-bilstm     # loads the run and prints its summary

Weights are safetensors and everything else is JSON: loading a run can never execute code.
"""
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from core.tokenize import Tokenizer, Vocab
from models.rnn import ModelConfig, build

FILES = ("config.json", "vocab.json", "model.safetensors")


def save_run(out: Path, model: nn.Module, tokenizer: Tokenizer, vocab: Vocab, labels: list[str],
             max_len: int, metrics: dict, train_args: dict):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": model.cfg.to_dict(), "tokenizer": tokenizer.to_dict(), "labels": labels,
              "max_len": max_len, "vocab_file": "vocab.json", "train_args": train_args}
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    vocab.save(out / "vocab.json")
    if tokenizer.file:  # a pretrained encoder's own tokenizer.json travels with the run
        shutil.copy(Path(tokenizer.folder) / tokenizer.file, out / tokenizer.file)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_run(run: Path) -> tuple[nn.Module, dict, Tokenizer, Vocab]:
    """(model in eval mode on the CPU, config dict, tokenizer, vocabulary) from a run folder."""
    run = Path(run)
    missing = [f for f in FILES if not (run / f).exists()]
    if missing:
        raise FileNotFoundError(f"{run} is not a complete run folder: missing {', '.join(missing)}")
    config = json.loads((run / "config.json").read_text())
    cfg = ModelConfig(**config["model"])
    vocab = Vocab.load(run / config["vocab_file"])
    if len(vocab) != cfg.vocab_size:
        raise ValueError(f"{run}: vocab.json has {len(vocab)} tokens but the model was built for {cfg.vocab_size}")
    model = build(cfg)
    model.load_state_dict(load_file(run / "model.safetensors"))
    return model.eval(), config, Tokenizer(**config["tokenizer"], folder=str(run)), vocab


if __name__ == "__main__":
    model, config, tokenizer, vocab = load_run(Path(sys.argv[1]))
    print(json.dumps({"model": config["model"], "tokenizer": config["tokenizer"], "vocab": len(vocab),
                      "metrics": json.loads((Path(sys.argv[1]) / "metrics.json").read_text())}, indent=2))
