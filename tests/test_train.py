import json
import random

import pytest
import torch
from safetensors import safe_open

from models.checkpoint import load_run
from models.train import main

@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread: the same numbers (measured: the IMDB run's accuracy is identical), and a
    fraction of the CPU on a shared box, where the intra-op threads spin waiting for each other
    (that run took 137 s of CPU on two threads under load, 15 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = {"pos": ["good", "great", "fine", "superb"], "neg": ["bad", "awful", "poor", "dull"]}


@pytest.fixture
def tiny_csv(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(200):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(WORDS[label], k=rng.randint(1, 8)) + rng.choices(["the", "film", "a"], k=3)
        rng.shuffle(words)
        rows.append(f"{' '.join(words)},{label}\n")
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(rows))
    return path


def train_tiny(data, out, *extra):
    return main(["classifier", "--data", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "16",
                 "--embed-dim", "16", "--hidden-size", "16", "--lr", "0.01", "--min-freq", "1", *extra])


@pytest.mark.parametrize("arch", ["bigru", "elman"])
def test_classifier_cli_writes_a_complete_run_that_reloads_exactly(tiny_csv, tmp_path, arch):
    metrics = train_tiny(tiny_csv, tmp_path / "run", "--arch", arch)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "metrics.json",
                                                       "model.safetensors", "vocab.json"]
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"] > 0.8  # the words give the label away
    assert {"epochs", "wall_time_s", "device", "history"} <= saved.keys()
    model, config, tokenizer, vocab = load_run(run)
    assert config["labels"] == ["neg", "pos"] and tokenizer.kind == "word"
    ids = torch.tensor([vocab.encode(tokenizer("a superb film"))])
    assert model(ids, torch.tensor([ids.shape[1]])).argmax().item() == 1
    with safe_open(run / "model.safetensors", "pt") as f:  # plain tensors, no pickle
        assert "embed.weight" in f.keys()


def test_fixed_seed_gives_the_same_run(tiny_csv, tmp_path):
    a = train_tiny(tiny_csv, tmp_path / "a", "--arch", "lstm", "--seed", "3")
    b = train_tiny(tiny_csv, tmp_path / "b", "--arch", "lstm", "--seed", "3")
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_lm_cli_trains_and_its_sample_is_greedy_generation(tmp_path):
    (tmp_path / "book.txt").write_text("the time traveller smiled. " * 200)
    metrics = main(["lm", "--data", str(tmp_path / "book.txt"), "--arch", "lstm", "--out", str(tmp_path / "lm"),
                    "--epochs", "3", "--batch-size", "8", "--seq-len", "20", "--hidden-size", "32", "--lr", "0.01"])
    assert metrics["valid_perplexity"] < 2.0  # a repeated sentence is easy to predict
    assert metrics["greedy_sample"]["text"].startswith(" smiled. the time traveller")
    model, config, tokenizer, vocab = load_run(tmp_path / "lm")
    assert config["model"]["task"] == "lm" and tokenizer.kind == "char"


def test_load_run_refuses_incomplete_or_mismatched_runs(tiny_csv, tmp_path):
    train_tiny(tiny_csv, tmp_path / "run", "--arch", "gru", "--epochs", "1")
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    (tmp_path / "run" / "vocab.json").write_text(json.dumps({"tokens": vocab["tokens"][:-1]}))
    with pytest.raises(ValueError, match="vocab.json has"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_run(tmp_path / "run")


def test_short_real_imdb_run_beats_chance_clearly(tmp_path):
    """A pipeline test on a slice of the real data set, not an accuracy claim."""
    metrics = main(["classifier", "--data", "imdb", "--arch", "gru", "--out", str(tmp_path / "imdb"),
                    "--limit", "4000", "--max-len", "128", "--epochs", "3", "--lr", "0.01", "--min-freq", "3",
                    "--embed-dim", "32", "--hidden-size", "32"])
    # 4000 test reviews: 50% +- 0.8% by chance; seeds 0, 1, 2 of this run gave 71%, 71%, 67%
    assert metrics["test_accuracy"] > 0.62, metrics
