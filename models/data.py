"""Named data sets and the user's own files, as lists of (text, label) or one corpus string.

    python -m models.data imdb        # prints the split sizes and labels

A named data set is read from $RNNSERVE_DATA, then ../shared/data beside the repository,
then a download cache (~/.cache/rnnserve); where none has it, it is downloaded from its
canonical URL and checked against its checksum. Offline and absent: one DataNotFound that
says where to put the file. Nothing here is ever copied into the repository.
"""
import csv
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnnserve"


@dataclass(frozen=True)
class Source:
    files: tuple[str, ...]  # names this data set may have on disk, preferred first
    url: str
    checksum: tuple[str, str]  # (algorithm, hexdigest) of the downloaded file, as published


SOURCES = {
    "imdb": Source(("aclImdb_v1_labeled.tar.gz", "aclImdb", "aclImdb_v1.tar.gz"),
                   "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                   ("md5", "7c2ac02c03563afcf9b574c7e56c153a")),
    "chnsenticorp": Source(("ChnSentiCorp_htl_all.csv",),
                           "https://raw.githubusercontent.com/SophonPlus/ChineseNlpCorpus/master/"
                           "datasets/ChnSentiCorp_htl_all/ChnSentiCorp_htl_all.csv",
                           # of the rows without the header line, as ../shared/data/README.md gives it
                           ("sha256-rows", "fd9e05bc82672483f7af8f8c46e86919aeea1852a22e971efdde8522d7b78f50")),
    "timemachine": Source(("timemachine.txt",),
                          "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
                          ("sha1", "090b5e7e70c295757f55df93cb0a180b9691891a")),
}


class DataNotFound(FileNotFoundError):
    pass


@dataclass
class Splits:
    """A classification data set: (text, label) pairs per split and the labels in order."""
    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]
    labels: list[str]


def search_dirs() -> list[Path]:
    dirs = [Path(os.environ["RNNSERVE_DATA"])] if os.environ.get("RNNSERVE_DATA") else []
    return dirs + [REPO.parent / "shared" / "data", CACHE]


def digest(path: Path, algorithm: str) -> str:
    data = path.read_bytes()
    if algorithm == "sha256-rows":  # the canonical CSV has a header line that the shared copy lacks
        if data.startswith(b"label,review"):
            data = data.split(b"\n", 1)[1]
        algorithm = "sha256"
    return hashlib.new(algorithm, data).hexdigest()


def locate(name: str) -> Path:
    """Path of a named data set's file (or unpacked folder), downloading it if it can."""
    source = SOURCES[name]
    for folder in search_dirs():
        for file in source.files:
            if (folder / file).exists():
                return folder / file
    target = CACHE / source.url.rsplit("/", 1)[1]
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"downloading {source.url} -> {target}", file=sys.stderr)
        urllib.request.urlretrieve(source.url, target.with_suffix(".part"))
    except OSError as e:
        places = ", ".join(str(d) for d in search_dirs())
        raise DataNotFound(f"data set {name!r} not found: put {source.files[0]} in one of {places} "
                           f"(or set RNNSERVE_DATA); downloading {source.url} failed: {e}") from None
    algorithm, expected = source.checksum
    if digest(target.with_suffix(".part"), algorithm) != expected:
        raise DataNotFound(f"{source.url} did not match its {algorithm} checksum {expected}")
    return target.with_suffix(".part").rename(target)


def stratified_split(pairs: list, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[list]:
    """Split (text, label) pairs into len(fractions) parts keeping each label's share; fixed seed."""
    by_label: dict[str, list] = {}
    for pair in pairs:
        by_label.setdefault(pair[1], []).append(pair)
    parts = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        start = 0
        for i, fraction in enumerate(fractions):
            end = len(group) if i == len(fractions) - 1 else start + round(fraction * len(group))
            parts[i].extend(group[start:end])
            start = end
    for part in parts:
        rng.shuffle(part)
    return parts


# --- the named data sets ---

def read_aclimdb(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(text, label)]} from the aclImdb layout, packed (.tar.gz) or unpacked."""
    splits = {"train": [], "test": []}

    def add(member: str, read):
        parts = member.split("/")  # aclImdb/<split>/<label>/<id>_<rating>.txt
        if len(parts) == 4 and parts[1] in splits and parts[2] in ("pos", "neg") and parts[3].endswith(".txt"):
            splits[parts[1]].append((parts[3], read().decode("utf-8"), parts[2]))

    if path.is_dir():
        for file in sorted(path.glob("*/*/*.txt")):
            add("aclImdb/" + file.relative_to(path).as_posix(), file.read_bytes)
    else:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile():
                    add(member.name.removeprefix("./"), lambda: tar.extractfile(member).read())
    # the archive's member order is not sorted; sort by file name so that every read is identical
    return {split: [(text, label) for _, text, label in sorted(rows)] for split, rows in splits.items()}


def load_imdb(seed: int = 0) -> Splits:
    """The official 25k/25k train/test split; 10% of train held out (stratified) for validation."""
    splits = read_aclimdb(locate("imdb"))
    train, valid = stratified_split(splits["train"], (0.9, 0.1), seed)
    return Splits(train, valid, splits["test"], ["neg", "pos"])


def load_chnsenticorp(seed: int = 0) -> Splits:
    """ChnSentiCorp hotel reviews (label,review; no header): a stratified 80/10/10 split."""
    with open(locate("chnsenticorp"), encoding="utf-8", newline="") as f:
        rows = [row for row in csv.reader(f) if row and row != ["label", "review"]]
    pairs = [(review, label) for label, review in rows]
    return Splits(*stratified_split(pairs, seed=seed), labels=["0", "1"])


# --- the user's own files ---

def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(text, label) pairs from a CSV/TSV with a header, or a JSONL file, with text and label."""
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        text = path.read_text(encoding="utf-8")
        records = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    if not records or "text" not in records[0] or "label" not in records[0]:
        raise ValueError(f"{path}: expected 'text' and 'label' columns (CSV/TSV header) or fields (JSONL)")
    return [(str(r["text"]), str(r["label"])) for r in records]


def read_folder(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{split: [(text, label)]} from <split>/<label>/*.txt."""
    splits = {}
    for file in sorted(path.glob("*/*/*.txt")):
        split, label = file.parent.parent.name, file.parent.name
        splits.setdefault(split, []).append((file.read_text(encoding="utf-8"), label))
    if not splits:
        raise ValueError(f"{path}: expected <split>/<label>/*.txt files")
    return splits


def load_classification(data: str, test_data: str | None = None, seed: int = 0) -> Splits:
    """A named data set (imdb, chnsenticorp) or a CSV/TSV/JSONL file or <split>/<label>/ folder.

    Data without its own split is split 80/10/10 with a fixed seed, stratified by label
    (90/10 train/valid when --test-data gives the test set). Labels are sorted.
    """
    if data == "imdb":
        splits = load_imdb(seed)
    elif data == "chnsenticorp":
        splits = load_chnsenticorp(seed)
    else:
        path = Path(data)
        if not path.exists():
            raise DataNotFound(f"{data}: no such file or folder (named data sets: imdb, chnsenticorp)")
        parts = read_folder(path) if path.is_dir() else {"all": read_pairs(path)}
        if test_data:
            parts["test"] = read_pairs(Path(test_data))
        pool = parts.get("train", parts.get("all", []))
        valid = parts.get("valid", parts.get("validation"))
        if "test" in parts and valid is not None:
            train, test = pool, parts["test"]
        elif "test" in parts:
            (train, valid), test = stratified_split(pool, (0.9, 0.1), seed), parts["test"]
        else:
            train, valid, test = stratified_split(pool, seed=seed)
        splits = Splits(train, valid, test, sorted({label for _, label in train + valid + test}))
    if test_data and data in ("imdb", "chnsenticorp"):
        splits.test = read_pairs(Path(test_data))
    return splits


def load_corpus(data: str) -> tuple[str, str]:
    """(train text, held-out text) for language modelling: the last 10% of the text is held out."""
    path = locate("timemachine") if data == "timemachine" else Path(data)
    if not path.exists():
        raise DataNotFound(f"{data}: no such file (named corpus: timemachine)")
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "imdb"
    if name == "timemachine":
        train, held_out = load_corpus(name)
        print(f"{name}: {len(train)} training characters, {len(held_out)} held out")
    else:
        s = load_classification(name)
        print(f"{name}: train {len(s.train)}, valid {len(s.valid)}, test {len(s.test)}, labels {s.labels}")
