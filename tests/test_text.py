"""python_backends.text: prompts, word lists and incremental detokenization."""

from __future__ import annotations

import numpy as np
import pytest

from python_backends import text
from python_backends.paths import default_model_dir

REPLACEMENT = "\ufffd"
# Emoji and CJK take 3-4 byte-level tokens each in SmolLM2's vocabulary.
MULTIBYTE = "Hi 🦙 and 你好世界, then 😀👍 é done."


@pytest.fixture(scope="module")
def tok():
    if not (default_model_dir() / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer in {default_model_dir()} (run scripts/setup.sh)")
    return text.load_tokenizer()


class FakeTokenizer:
    """Deterministic encode for pinning exact word-list arrays."""

    VOCAB = {"ab": [1, 2], "c": [3], "de f": [4, 5, 6], "": []}

    def encode(self, word: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens, "word lists must be encoded without special tokens"
        return list(self.VOCAB[word])


def upstream_word_list_format(tokenizer, word_lists: list[list[str]]) -> np.ndarray:
    """The batch layout of TensorRT-LLM's preprocessing `_to_word_list_format`, restated."""
    flat_ids, offsets = [], []
    for words in word_lists:
        ids: list[int] = []
        ends: list[int] = []
        for word in words:
            encoded = tokenizer.encode(word, add_special_tokens=False)
            if encoded:
                ids += encoded
                ends.append(len(encoded))
        flat_ids.append(np.array(ids))
        offsets.append(np.cumsum(np.array(ends)))
    pad_to = max(1, max(len(ids) for ids in flat_ids))
    flat_ids = [np.pad(ids, (0, pad_to - len(ids)), constant_values=0) for ids in flat_ids]
    offsets = [np.pad(o, (0, pad_to - len(o)), constant_values=-1) for o in offsets]
    return np.array([flat_ids, offsets], dtype="int32").transpose((1, 0, 2))


# --- word lists ---------------------------------------------------------------------------


def test_word_list_layout() -> None:
    got = text.to_word_list(FakeTokenizer(), ["ab", b"c", "", "de f"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[1, 2, 3, 4, 5, 6], [2, 3, 6, -1, -1, -1]])


def test_word_list_empty_is_upstream_placeholder() -> None:
    np.testing.assert_array_equal(text.to_word_list(FakeTokenizer(), []), [[0], [-1]])
    np.testing.assert_array_equal(text.to_word_list(FakeTokenizer(), [""]), [[0], [-1]])


def test_stacked_word_lists_match_upstream() -> None:
    batch = [["ab", "c"], ["de f", "ab", "c"], []]
    ours = text.stack_word_lists([text.to_word_list(FakeTokenizer(), w) for w in batch])
    np.testing.assert_array_equal(ours, upstream_word_list_format(FakeTokenizer(), batch))


def test_word_list_round_trip(tok) -> None:
    words = ["\n\nUser:", "###", " stop here", "你好"]
    encoded = text.to_word_list(tok, words)
    assert encoded.shape[0] == 2
    decoded = text.from_word_list(encoded)
    assert decoded == [tok.encode(w, add_special_tokens=False) for w in words]
    assert [tok.decode(ids) for ids in decoded] == words
    # A batched [1, 2, L] tensor, as the engine receives it, reads the same.
    assert text.from_word_list(encoded[None]) == decoded


def test_from_word_list_edge_cases() -> None:
    assert text.from_word_list(np.empty((2, 0), np.int32)) == []
    assert text.from_word_list(np.empty((1, 2, 0), np.int32)) == []
    assert text.from_word_list(np.array([[0], [-1]])) == []
    with pytest.raises(ValueError, match="shape"):
        text.from_word_list(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="offsets"):
        text.from_word_list(np.array([[1, 2], [2, 1]]))


# --- prompts ------------------------------------------------------------------------------


def test_chat_template_applied(tok) -> None:
    ids = text.encode_prompt(tok, "What is the capital of France?", chat=True)
    rendered = tok.decode(ids)
    assert "What is the capital of France?" in rendered
    assert rendered.startswith("<|im_start|>")
    # add_generation_prompt: the assistant turn is open, so the model answers.
    assert rendered.endswith("<|im_start|>assistant\n")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert text.encode_prompt(tok, messages=messages) == ids


def test_plain_encode(tok) -> None:
    assert text.encode_prompt(tok, "Hello world") == tok.encode("Hello world")
    with pytest.raises(ValueError):
        text.encode_prompt(tok, "x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ValueError):
        text.encode_prompt(tok)


def test_parse_messages() -> None:
    raw = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    assert text.parse_messages(raw) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert text.parse_messages(raw.encode()) == text.parse_messages(raw)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("[{", "not valid JSON"),
        ('{"role": "user"}', "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('["hi"]', "messages[0] must be an object"),
        ('[{"content": "hi"}]', "messages[0].role"),
        ('[{"role": "user", "content": 3}]', "messages[0].content"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_parse_messages_rejects(raw, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        text.parse_messages(raw)


def test_special_ids_and_cache(tok) -> None:
    end_id, pad_id = text.special_ids(tok)
    assert end_id == tok.eos_token_id
    assert pad_id == (tok.pad_token_id if tok.pad_token_id is not None else end_id)
    assert text.load_tokenizer(default_model_dir()) is tok
    assert text.load_tokenizer("") is tok
    assert text.load_tokenizer("${tokenizer_dir}") is tok


def test_pad_sequences() -> None:
    ids, lens = text.pad_sequences([[5, 6, 7], [8]], pad_id=2)
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 2, 2]])
    np.testing.assert_array_equal(lens, [[3], [1]])
    assert ids.dtype == lens.dtype == np.int32


def test_embedding_bias(tok) -> None:
    bias = text.embedding_bias(tok, ["Paris", b"London"], [2.0, -1.5])
    assert bias.shape == (len(tok),) and bias.dtype == np.float32
    for word, weight in (("Paris", 2.0), ("London", -1.5)):
        for token_id in tok.encode(word, add_special_tokens=False):
            assert bias[token_id] == pytest.approx(weight)
    with pytest.raises(ValueError, match="pair up"):
        text.embedding_bias(tok, ["a"], [])


# --- incremental detokenization -----------------------------------------------------------


def stream(tok, ids: list[int], chunk: int, skip_special_tokens: bool = True) -> list[str]:
    detok = text.IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas + [detok.flush()]


def test_multibyte_really_splits(tok) -> None:
    # Guard: the test text must put characters across token boundaries, or the tests
    # below prove nothing.
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_deltas_concatenate_to_full_decode(tok, chunk: int) -> None:
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    deltas = stream(tok, ids, chunk)
    assert "".join(deltas) == text.decode_all(tok, ids) == MULTIBYTE
    assert not any(REPLACEMENT in d for d in deltas), deltas
    assert deltas[-1] == "", "nothing should be held back after complete characters"


def test_character_released_only_when_complete(tok) -> None:
    ids = tok.encode("🦙", add_special_tokens=False)
    assert len(ids) > 1
    detok = text.IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🦙"


def test_flush_releases_incomplete_tail(tok) -> None:
    ids = tok.encode("ok 🦙", add_special_tokens=False)[:-1]
    deltas = stream(tok, ids, 1)
    assert "".join(deltas) == text.decode_all(tok, ids)
    assert deltas[-1].endswith(REPLACEMENT)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip: bool) -> None:
    ids = text.encode_prompt(tok, "Hi", chat=True) + tok.encode(" 你好", add_special_tokens=False)
    ids.append(tok.eos_token_id)
    deltas = stream(tok, ids, 1, skip_special_tokens=skip)
    assert "".join(deltas) == text.decode_all(tok, ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in "".join(deltas)) is not skip
