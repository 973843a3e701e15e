"""The model repository contract (core/repository.py): what a version is, what a manifest must
say, and the errors that name the file and the field. Export writes through it and serving reads
through it, so both agree on every rule here."""
import json
import shutil
import subprocess
import sys

import pytest

from core.repository import ManifestError, model_names, read_version, versions
from export.repository import export_run
from tests.test_export import make_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("contract")
    export_run(make_run(folder / "runs" / "clf", "classifier", "gru"), folder / "repo", cases=2)
    export_run(make_run(folder / "runs" / "lm", "lm", "lstm"), folder / "repo", cases=2)
    return folder / "repo"


def test_a_version_is_a_positive_integer_without_leading_zeros(tmp_path):
    for name in ("1", "2", "10", "0", "01", "-1", "1.5", ".3.partial", "x", "1e3"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "m" / "7").write_text("a file, not a folder")
    assert versions(tmp_path / "m") == [1, 2, 10]
    (tmp_path / "only-zero" / "0").mkdir(parents=True)
    (tmp_path / "_hidden" / "1").mkdir(parents=True)
    assert model_names(tmp_path) == ["m"]  # no version, or not a model name: not a model


def test_export_and_serving_agree_on_a_folder_named_0(tmp_path):
    """Export used to count a folder "0" as a version (writing 1 next to it) while serving
    refused it; now neither counts it."""
    (tmp_path / "repo" / "clf" / "0").mkdir(parents=True)
    written = export_run(make_run(tmp_path / "run", "classifier", "gru"), tmp_path / "repo", name="clf", cases=2)
    assert written.name == "1" and versions(tmp_path / "repo" / "clf") == [1]
    assert read_version(written).number == 1


def spoiled(exported, tmp_path, name, change) -> ManifestError:
    shutil.copytree(exported / name / "1", tmp_path / name / "1")
    path = tmp_path / name / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as caught:
        read_version(tmp_path / name / "1")
    assert str(path) in str(caught.value)  # every error names the file
    return caught.value


@pytest.mark.parametrize("name,change,says", [
    ("clf", lambda m: m.pop("max_len"), "max_len: Field required"),
    ("clf", lambda m: m.update(max_len="long"), "max_len: Input should be a valid integer"),
    ("clf", lambda m: m.pop("format_version"), "format None is not 1 (written by another export): export the run again"),
    ("clf", lambda m: m.update(format_version=0), "format 0 is not 1 (written by another export): export the run again"),
    ("clf", lambda m: m.update(task="regression"), "task: Input should be 'classifier' or 'lm'"),
    ("clf", lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
    ("clf", lambda m: m["graphs"]["fp32"].update(file="../../elsewhere.onnx"), "is not a plain .onnx file name"),
    ("clf", lambda m: m["graphs"]["fp32"].update(sha256="abc"), "graphs.fp32.sha256"),
    ("clf", lambda m: m["graphs"].pop("fp32"), "no 'fp32' graph"),
    ("clf", lambda m: m["tokenizer"].update(kind="bpe"), "tokenizer"),
    ("clf", lambda m: m.update(labels=[]), "a classifier has labels"),
    ("lm", lambda m: m.update(state=None), "a language model has a state"),
    ("lm", lambda m: m["state"].pop("layers"), "state.layers: Field required"),
])
def test_a_bad_manifest_is_refused_naming_the_field(exported, tmp_path, name, change, says):
    assert says in str(spoiled(exported, tmp_path, name, change))


def test_the_graph_is_checked_against_its_sha256_and_a_broken_vocabulary_is_named(exported, tmp_path):
    shutil.copytree(exported / "clf" / "1", tmp_path / "clf" / "1")
    version = read_version(tmp_path / "clf" / "1")
    assert version.graph_bytes()[:2] and version.manifest.files[:2] == ["manifest.json", "vocab.json"]
    with open(tmp_path / "clf" / "1" / "model.onnx", "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ManifestError, match="model.onnx: does not match the manifest's sha256"):
        version.graph_bytes()
    with pytest.raises(ManifestError, match="no 'int8' graph"):
        version.graph_bytes("int8")
    (tmp_path / "clf" / "1" / "vocab.json").write_text('{"tokens": ["a", "a"]}')
    with pytest.raises(ManifestError, match="vocab.json or the tokenizer is unusable: the vocabulary has duplicate"):
        read_version(tmp_path / "clf" / "1")


def test_the_codec_is_the_one_rule_from_text_to_ids(exported):
    codec = read_version(exported / "clf" / "1").codec
    assert codec.encode("") == ([codec.vocab.unk_id], False)  # an empty text is one unknown token
    ids, cut = codec.encode("good " * 20)
    assert len(ids) == codec.max_len == 12 and cut
    assert codec.decode(codec.encode("good film")[0]) == "good film"
    lm = read_version(exported / "lm" / "1").codec
    assert lm.decode(lm.ids("the time")) == "the time" and len(lm.ids("the time " * 5)) == 45  # prompts are not cut
    assert lm.piece(lm.ids("t")[0]) == "t" and codec.piece(codec.ids("film")[0]) == " film"  # a generated token's text


def test_the_repository_command_lists_every_version(exported):
    done = subprocess.run([sys.executable, "-m", "core.repository", str(exported)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["clf/1", "lm/1"]
    assert "classifier gru 2x12, word tokens, max_len 12" in lines[0] and "graphs fp32" in lines[0]
    assert "lm lstm" in lines[1] and "parity" in lines[1]
