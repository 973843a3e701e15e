"""Text -> graph input and graph output -> answers, written once for training, export, serving
and load tests: the encode rule, padding rows into a batch, and the softmax. A version's codec:
`python -m core.repository model_repository/imdb-gru/1 "A moving, beautifully acted film."`.
"""
from dataclasses import dataclass

import numpy as np

from core.tokenize import Tokenizer, Vocab


@dataclass(frozen=True)
class TextCodec:
    """One model's text <-> token ids: its tokenizer, vocabulary and max_len."""
    tokenizer: Tokenizer
    vocab: Vocab
    max_len: int

    def encode(self, text: str) -> tuple[list[int], bool]:
        """(token ids, whether the text was cut): a classifier's input. Only the first max_len + 1
        tokens are looked for: however long the text, no more work than that."""
        return self.cut(self.tokenizer(text, self.max_len + 1))

    def cut(self, tokens: list[str]) -> tuple[list[int], bool]:
        """The rule: ids of the first max_len tokens; an empty text is one unknown token."""
        return (self.vocab.encode(tokens[: self.max_len]) or [self.vocab.unk_id]), len(tokens) > self.max_len

    def ids(self, text: str) -> list[int]:
        """Every token's id, uncut: a language model's prompt or session step."""
        return self.vocab.encode(self.tokenizer(text))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.join(self.vocab.decode(ids))

    def piece(self, token: int) -> str:
        """One generated token as it continues a text: a word after a space, a character as it is."""
        return self.tokenizer.join(["", self.vocab.itos[token]])


def pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad with 0: (B, T_max) int64 ids and (B,) int64 lengths."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    return ids, lengths


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities in the logits' dtype; the max is subtracted first, so nothing overflows."""
    p = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return p / p.sum(axis=axis, keepdims=True)

