import json
import tarfile
import urllib.request

import pytest

from models import data
from models.data import DataNotFound, load_classification, load_corpus, read_aclimdb, stratified_split

REVIEWS = {("train", "pos"): ["great film", "loved it"], ("train", "neg"): ["awful", "boring <br />plot"],
           ("test", "pos"): ["superb"], ("test", "neg"): ["dull"]}


def write_aclimdb(folder):
    for (split, label), texts in REVIEWS.items():
        (folder / "aclImdb" / split / label).mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / "aclImdb" / split / label / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(text)
    (folder / "aclImdb" / "imdb.vocab").write_text("the\n")


def test_aclimdb_reads_the_same_from_tar_gz_and_from_the_folder(tmp_path):
    write_aclimdb(tmp_path)
    with tarfile.open(tmp_path / "aclImdb_v1.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "aclImdb", arcname="aclImdb")
    packed, unpacked = read_aclimdb(tmp_path / "aclImdb_v1.tar.gz"), read_aclimdb(tmp_path / "aclImdb")
    assert packed == unpacked
    assert sorted(packed["train"]) == [("awful", "neg"), ("boring <br />plot", "neg"),
                                       ("great film", "pos"), ("loved it", "pos")]
    assert sorted(packed["test"]) == [("dull", "neg"), ("superb", "pos")]


def test_named_data_sets_are_read_from_rnnserve_data(tmp_path, monkeypatch):
    (tmp_path / "ChnSentiCorp_htl_all.csv").write_text(
        "".join(f'{i % 2},"评论{i}，很好"\n' for i in range(40)), encoding="utf-8")
    (tmp_path / "timemachine.txt").write_text("a" * 90 + "b" * 10)
    monkeypatch.setenv("RNNSERVE_DATA", str(tmp_path))
    splits = load_classification("chnsenticorp")
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (32, 4, 4)
    assert splits.labels == ["0", "1"] and splits.train[0][0].startswith("评论")
    assert load_corpus("timemachine") == ("a" * 90, "b" * 10)


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path])
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")

    def offline(url, target):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(DataNotFound, match=r"put timemachine.txt in one of .*RNNSERVE_DATA"):
        load_corpus("timemachine")


def test_a_download_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path])
    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, target: target.write_text("not the book"))
    with pytest.raises(DataNotFound, match="checksum"):
        load_corpus("timemachine")
    assert not (tmp_path / "cache" / "timemachine.txt").exists()


def user_rows(n=50):
    return [(f"text number {i}", "spam" if i % 5 == 0 else "ham") for i in range(n)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_user_files_split_80_10_10_stratified_with_string_labels(tmp_path, suffix):
    path = tmp_path / f"mine{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in user_rows()))
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text("label" + sep + "text\n" + "".join(f"{y}{sep}{t}\n" for t, y in user_rows()))
    splits = load_classification(str(path))
    assert splits.labels == ["ham", "spam"]
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (40, 5, 5)
    assert sorted(splits.train + splits.valid + splits.test) == sorted(user_rows())
    assert sum(y == "spam" for _, y in splits.test) == 1  # 10 spam: 8 / 1 / 1
    assert load_classification(str(path)) == splits  # fixed seed


def test_user_folder_and_separate_test_file(tmp_path):
    for split, label, text in [("train", "a", "x y"), ("train", "b", "y z"), ("test", "a", "x"), ("test", "b", "z")] * 5:
        folder = tmp_path / "d" / split / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.txt").write_text(text)
    splits = load_classification(str(tmp_path / "d"))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (8, 2, 10)  # valid from train: 4 + 1 of each label
    (tmp_path / "t.csv").write_text("text,label\nonly,a\n")
    assert load_classification(str(tmp_path / "d"), test_data=str(tmp_path / "t.csv")).test == [("only", "a")]


def test_bad_user_file_says_what_it_expected(tmp_path):
    (tmp_path / "bad.csv").write_text("sentence,y\nhi,1\n")
    with pytest.raises(ValueError, match="'text' and 'label'"):
        load_classification(str(tmp_path / "bad.csv"))


def test_stratified_split_keeps_label_shares():
    pairs = [(str(i), "a" if i < 80 else "b") for i in range(100)]
    train, valid, test = stratified_split(pairs)
    assert [sum(y == "b" for _, y in part) for part in (train, valid, test)] == [16, 2, 2]


def test_real_shared_data_sets_have_their_published_sizes():
    imdb = data.load_imdb()
    assert (len(imdb.train) + len(imdb.valid), len(imdb.test)) == (25_000, 25_000)
    assert sum(y == "pos" for _, y in imdb.test) == 12_500
    chn = load_classification("chnsenticorp")
    assert len(chn.train) + len(chn.valid) + len(chn.test) == 7_766
    assert sum(y == "1" for _, y in chn.train + chn.valid + chn.test) == 5_322
    train, held_out = load_corpus("timemachine")
    assert len(train) + len(held_out) > 170_000 and "time traveller" in train.lower()
