import json

import numpy as np
import onnx
import pytest
import torch

from export.__main__ import main as export_main
from export.graph import export_onnx
from core.repository import FORMAT_VERSION, read_version, versions
from export.repository import export_run
from export.verify import ParityError, verify
from models.checkpoint import save_run
from models.rnn import ARCHS, LM_ARCHS, ModelConfig, RNNClassifier, at, build
from core.tokenize import Tokenizer, Vocab

WORDS = ["good", "bad", "film", "plot", "great", "awful", "the", "a"]


def make_run(folder, task="classifier", arch="lstm", num_layers=2, data="", model=None, seed=0):
    """A run folder with a tiny untrained model, as python -m models.train writes one."""
    torch.manual_seed(seed)
    vocab = Vocab.build([WORDS] if task == "classifier" else [list("the time traveller")])
    cfg = ModelConfig(task, arch, len(vocab), 2 if task == "classifier" else 0, embed_dim=8, hidden_size=12,
                      num_layers=1 if arch == "elman" else num_layers)
    model = model or build(cfg)
    save_run(folder, model, Tokenizer("word" if task == "classifier" else "char"), vocab,
             ["neg", "pos"] if task == "classifier" else [], 12, {"test_accuracy": 0.5},
             {"data": str(data), "seed": 0, "limit": None, "test_data": None})
    return folder


@pytest.mark.parametrize("task,arch", [("classifier", a) for a in ARCHS] + [("lm", a) for a in LM_ARCHS])
def test_every_arch_exports_with_native_recurrent_nodes_and_passes_parity(tmp_path, task, arch):
    version = export_run(make_run(tmp_path / "run", task, arch), tmp_path / "repo", cases=30)
    manifest = json.loads((version / "manifest.json").read_text())
    parity = manifest["graphs"]["fp32"]["parity"]
    assert parity["within_tolerance"] and parity["max_abs_diff"]["pytorch_vs_onnxruntime"] <= 1e-4
    assert parity["max_abs_diff"]["batched_vs_alone"] <= 1e-5
    ops = {node.op_type for node in onnx.load(version / "model.onnx").graph.node}
    assert ops & {"RNN", "GRU", "LSTM"}, ops  # native recurrent node, not unrolled
    assert "Loop" not in ops and "Scan" not in ops


def test_manifest_is_complete_and_versions_count_up(tmp_path):
    run = make_run(tmp_path / "run", "lm", "lstm")
    first = export_run(run, tmp_path / "repo", name="tm", cases=10)
    before = (first / "model.onnx").read_bytes()
    second = export_run(run, tmp_path / "repo", name="tm", cases=10)
    assert (first.name, second.name) == ("1", "2") and versions(tmp_path / "repo" / "tm") == [1, 2]
    assert (first / "model.onnx").read_bytes() == before  # earlier versions untouched
    m = json.loads((second / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION and m["task"] == "lm" and m["arch"] == "lstm"
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "lengths", "h0", "c0"]
    assert m["inputs"][2]["shape"] == [2, "batch", 12] and m["outputs"][0]["shape"] == ["batch", "seq", 12]
    assert m["state"] == {"inputs": ["h0", "c0"], "outputs": ["hn", "cn"], "layers": 2, "hidden_size": 12}
    version = read_version(second)  # what serving reads, through the contract
    assert version.codec.vocab.itos == Vocab.load(run / "vocab.json").itos and version.codec.max_len == 12
    assert sorted(p.name for p in second.iterdir()) == sorted(version.manifest.files)
    import hashlib
    assert version.graph_bytes() == (second / "model.onnx").read_bytes()
    assert m["graphs"]["fp32"]["sha256"] == hashlib.sha256(version.graph_bytes()).hexdigest()
    assert {"torch", "onnx", "onnxruntime"} == m["versions"].keys()


class BackwardRunsOverPadding(RNNClassifier):
    """A subtly broken BiLSTM: unpacked, so its backward direction starts on the padding."""

    def forward(self, input_ids, lengths):
        out, _ = self.rnn(self.embed(input_ids))  # (B, T, 2H)
        h = self.cfg.hidden_size
        return self.head(torch.cat([at(out, lengths - 1)[:, :h], out[:, 0, h:]], dim=1))


class ReadsLastPaddedStep(RNNClassifier):
    """A broken model: ignores lengths and reads the output at the last (padded) position."""

    def forward(self, input_ids, lengths):
        return self.head(self.rnn(self.embed(input_ids))[0][:, -1])


def test_parity_check_catches_a_graph_that_reads_padding(tmp_path, monkeypatch):
    cfg = ModelConfig("classifier", "bilstm", 10, 2, 8, 12)
    torch.manual_seed(0)
    broken = BackwardRunsOverPadding(cfg).eval()
    path = export_onnx(broken, cfg, tmp_path / "broken.onnx")
    with pytest.raises(ParityError, match="batched_vs_alone"):
        verify(broken, cfg, path, max_len=12, cases=20)
    run = make_run(tmp_path / "run", arch="bilstm", num_layers=1)
    monkeypatch.setattr(RNNClassifier, "forward", BackwardRunsOverPadding.forward)  # as load_run rebuilds it
    with pytest.raises(ParityError, match="batched_vs_alone"):
        export_run(run, tmp_path / "repo")
    assert versions(tmp_path / "repo" / "run") == []
    assert not list((tmp_path / "repo" / "run").glob(".*"))  # no half-written version left behind


def test_parity_check_catches_a_graph_that_ignores_lengths(tmp_path):
    cfg = ModelConfig("classifier", "gru", 10, 2, 8, 12)
    broken = ReadsLastPaddedStep(cfg).eval()
    with pytest.raises(ParityError, match="graph inputs are"):
        verify(broken, cfg, export_onnx(broken, cfg, tmp_path / "broken.onnx"), max_len=12, cases=5)


def test_parity_check_catches_a_graph_with_the_example_length_baked_in(tmp_path):
    cfg = ModelConfig("classifier", "gru", 10, 2, 8, 12)
    model = build(cfg).eval()
    path = export_onnx(model, cfg, tmp_path / "m.onnx")
    graph = onnx.load(path)
    graph.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 7  # seq fixed to the example's 7
    onnx.save(graph, path)
    with pytest.raises(Exception):
        verify(model, cfg, path, max_len=12, cases=5)


def test_run_folder_errors_are_clear(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    vocab = json.loads((run / "vocab.json").read_text())
    (run / "vocab.json").write_text(json.dumps({"tokens": vocab["tokens"] + ["extra"]}))
    with pytest.raises(ValueError, match="vocab.json has 11 tokens but the model was built for 10"):
        export_main([str(run), "--repository", str(tmp_path / "repo")])
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        export_main([str(run), "--repository", str(tmp_path / "repo")])


def test_int8_variant_records_its_quality_and_is_refused_past_one_point(tmp_path, monkeypatch):
    rows = [(" ".join(np.random.default_rng(i).choice(WORDS, 5)), "pos" if i % 2 else "neg") for i in range(60)]
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    run = make_run(tmp_path / "run", arch="lstm", data=tmp_path / "d.csv")
    version = export_run(run, tmp_path / "repo", quantize="int8", fp16=True, cases=10)
    int8 = json.loads((version / "manifest.json").read_text())["graphs"]["int8"]
    assert (version / int8["file"]).exists() and set(int8["quality"]) == {"int8", "fp32"}
    assert int8["guarantee"].startswith("approximate")
    import export.repository as repository
    monkeypatch.setattr(repository, "MAX_INT8_LOSS", -1.0)  # any variant now "loses" too much
    with pytest.raises(ParityError, match="int8 variant refused"):
        export_run(run, tmp_path / "repo", quantize="int8", cases=10)
    assert versions(tmp_path / "repo" / "run") == [1]
