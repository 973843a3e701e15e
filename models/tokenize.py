"""Tokenizers (char, word, jieba) and the vocabulary. Pure Python: serving uses it without PyTorch.

    python -m models.tokenize word "A <br />great film, isn't it?"
"""
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1 in every vocabulary
KINDS = ("char", "word", "jieba")
BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")  # words (with n't, 's) and single punctuation marks


@dataclass(frozen=True)
class Tokenizer:
    """Text -> tokens. kind: char | word | jieba; lower: lower-case first (word always does)."""
    kind: str = "word"
    lower: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer kind {self.kind!r} is not one of {KINDS}")

    def __call__(self, text: str) -> list[str]:
        text = BREAK.sub(" ", text)
        if self.lower or self.kind == "word":
            text = text.lower()
        if self.kind == "char":
            return list(text)
        if self.kind == "word":
            return WORD.findall(text)
        return [t for t in jieba().lcut(text) if t.strip()]

    def to_dict(self) -> dict:
        return asdict(self)


def jieba():
    import jieba as jieba_module  # imported on first use: it loads a dictionary
    jieba_module.setLogLevel(60)
    return jieba_module


class Vocab:
    """Token <-> id, with <pad>=0 and <unk>=1; the rest by frequency, then alphabetically."""

    def __init__(self, tokens: list[str]):
        assert tokens[:2] == [PAD, UNK], f"a vocabulary starts with {PAD}, {UNK}, not {tokens[:2]}"
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}
        assert len(self.stoi) == len(tokens), "vocabulary has duplicate tokens"

    @classmethod
    def build(cls, texts: list[list[str]], min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        counts = Counter(t for tokens in texts for t in tokens)
        ranked = sorted((t for t, n in counts.items() if n >= min_freq and t not in (PAD, UNK)),
                        key=lambda t: (-counts[t], t))
        return cls([PAD, UNK] + ranked[: None if max_size is None else max_size - 2])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, 1) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def save(self, path: Path):
        Path(path).write_text(json.dumps({"tokens": self.itos}, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["tokens"])


if __name__ == "__main__":
    print(Tokenizer(sys.argv[1])(" ".join(sys.argv[2:])))
