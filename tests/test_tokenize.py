import pytest

from core.tokenize import Tokenizer, Vocab


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
