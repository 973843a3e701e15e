"""Text -> graph input and graph output -> answers, written once for training, export, serving
and load tests: the encode rule, padding rows into a batch, and the softmax. A version's codec:
`python -m core.repository model_repository/imdb-gru/1 "A moving, beautifully acted film."`.
"""
from dataclasses import dataclass
from itertools import chain

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
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    return right_padded(np.fromiter(chain.from_iterable(rows), np.int64, int(lengths.sum())), lengths), lengths


def right_padded(flat: np.ndarray, lengths: np.ndarray, dtype=None) -> np.ndarray:
    """The rule, written once: rows given end to end, (total, ...) with (B,) lengths, right-padded
    with 0 -> (B, T_max, ...) in `dtype` (else flat's), by one scatter (a boolean mask fills in
    row-major order, the order the rows come in)."""
    padded = np.zeros((len(lengths), int(lengths.max(initial=0)), *flat.shape[1:]), dtype or flat.dtype)
    padded[np.arange(padded.shape[1]) < lengths[:, None]] = flat
    return padded


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Probabilities in the logits' dtype; the max is subtracted first, so nothing overflows."""
    p = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return p / p.sum(axis=axis, keepdims=True)

