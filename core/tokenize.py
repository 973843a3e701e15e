"""Tokenizers (char, word, jieba; wordpiece: a pretrained encoder's own) and the vocabulary.
No PyTorch: training, export and serving share it. wordpiece runs the encoder's tokenizer.json
with the `tokenizers` library.

    python -m core.tokenize word "A <br />great film, isn't it?"
"""
import functools
import itertools
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1 in every vocabulary
KINDS = ("char", "word", "jieba", "wordpiece")
JOINED_BY = {"char": "", "jieba": "", "word": " ", "wordpiece": " "}  # how decoded tokens make a text
BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")  # words (with n't, 's) and single punctuation marks
# where a text can be cut without changing the tokens before the cut (char: anywhere); jieba's blocks are its re_han
SEPARATOR = {"word": re.compile(r"\s"), "wordpiece": re.compile(r"\s"),
             "jieba": re.compile(r"[^\u4E00-\u9FD5a-zA-Z0-9+#&._%\-]")}


@dataclass(frozen=True)
class Tokenizer:
    """Text -> tokens. kind: char | word | jieba | wordpiece; lower: lower-case first (word always
    does; wordpiece does what its tokenizer.json says). file: wordpiece's tokenizer.json, relative
    to the run or model folder, which `folder` (not saved) names."""
    kind: str = "word"
    lower: bool = True
    file: str = ""
    folder: str = field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"tokenizer kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "wordpiece" and not self.file:
            raise ValueError("a wordpiece tokenizer needs its tokenizer.json file")

    def __call__(self, text: str, limit: int | None = None) -> list[str]:
        """The text's tokens; with a limit, its first `limit` tokens, read from as much of the text
        as they need (a prefix cut where it changes no token before it, four times longer each
        try): a 100k-character text costs what its first few hundred tokens cost."""
        if limit is None:
            return self.tokens(text)
        size = 8 * (limit + 2)  # characters: English words average five with their space
        while True:
            cut = self.boundary(text, size)
            tokens = self.tokens(text[:cut])
            if cut == len(text) or len(tokens) > limit + (self.kind == "wordpiece"):  # (past the prefix's [SEP])
                return tokens[:limit]
            size *= 4

    def boundary(self, text: str, at: int) -> int:
        """The first place at or after `at` where the text can be cut without changing the tokens
        before it: a separator of this kind's tokens, never inside a <br />."""
        if at >= len(text):
            return len(text)
        if self.kind in SEPARATOR:
            found = SEPARATOR[self.kind].search(text, at)
            at = found.start() if found else len(text)
        opening = text.rfind("<", 0, at)
        if opening >= 0 and (line_break := BREAK.match(text, opening)) and line_break.end() > at:
            at = line_break.end()
        return at

    def tokens(self, text: str) -> list[str]:
        text = BREAK.sub(" ", text)
        if self.kind == "wordpiece":  # [CLS] word ##piece ... [SEP]
            return wordpiece(str(Path(self.folder) / self.file)).encode(text).tokens
        if self.lower or self.kind == "word":
            text = text.lower()
        if self.kind == "char":
            return list(text)
        if self.kind == "word":
            return WORD.findall(text)
        return [t for t in jieba().lcut(text) if t.strip()]

    def join(self, tokens: list[str]) -> str:
        """Tokens back into text (decoding): characters and Chinese words abut, words get a space."""
        return JOINED_BY[self.kind].join(tokens)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "folder" and (v or k != "file")}


@functools.cache
def wordpiece(path: str):
    from tokenizers import Tokenizer as HFTokenizer  # Rust, no PyTorch
    tokenizer = HFTokenizer.from_file(path)
    tokenizer.no_truncation()  # max_len cuts ids, as for every tokenizer here
    tokenizer.no_padding()
    return tokenizer


def jieba():
    import jieba as jieba_module  # imported on first use: it loads a dictionary
    jieba_module.setLogLevel(60)
    return jieba_module


class Vocab:
    """Token <-> id, with <pad>=0 and <unk>=1; the rest by frequency, then alphabetically.
    A pretrained encoder's vocabulary keeps its own ids: padding 0, its unknown token named by `unk`."""

    def __init__(self, tokens: list[str], unk: str = UNK):
        self.itos, self.unk = tokens, unk
        self.stoi = {t: i for i, t in enumerate(tokens)}
        if len(self.stoi) != len(tokens):
            raise ValueError("the vocabulary has duplicate tokens")
        if (tokens[:2] != [PAD, UNK]) if unk == UNK else (unk not in self.stoi):
            raise ValueError(f"a vocabulary starts with {PAD}, {UNK} (or names its own unknown token)")
        self.unk_id = self.stoi[unk]

    @classmethod
    def of_wordpiece(cls, tokenizer: Tokenizer) -> "Vocab":
        hf = wordpiece(str(Path(tokenizer.folder) / tokenizer.file))
        by_id = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] != list(range(len(by_id))):
            raise ValueError(f"{tokenizer.file}: the tokenizer's ids are not 0..V-1")
        return cls([t for t, _ in by_id], unk=hf.model.unk_token)

    @classmethod
    def build(cls, texts: list[list[str]], min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        counts = Counter(t for tokens in texts for t in tokens)
        ranked = sorted((t for t, n in counts.items() if n >= min_freq and t not in (PAD, UNK)),
                        key=lambda t: (-counts[t], t))
        return cls([PAD, UNK] + ranked[: None if max_size is None else max_size - 2])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return list(map(self.stoi.get, tokens, itertools.repeat(self.unk_id, len(tokens))))

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def save(self, path: Path):
        extra = {} if self.unk == UNK else {"unk": self.unk}
        Path(path).write_text(json.dumps({"tokens": self.itos, **extra}, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(saved["tokens"], saved.get("unk", UNK))


if __name__ == "__main__":
    print(Tokenizer(sys.argv[1])(" ".join(sys.argv[2:])))
