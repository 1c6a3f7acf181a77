"""Tokenization shared by the preprocessing, postprocessing and engine models.

Everything here is plain Python over a Hugging Face fast tokenizer, so it is unit-testable
without Triton. The word-list helpers produce and read the TensorRT-LLM `stop_words_list` /
`bad_words_list` layout, so a request prepared here means the same thing to our engine and to
a real TensorRT-LLM engine.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from python_backends.paths import default_model_dir

# What a byte-level BPE (and SentencePiece) decode yields for an incomplete UTF-8 sequence.
REPLACEMENT_CHAR = "\ufffd"


def resolve_tokenizer_dir(model_dir: str | Path | None = None) -> Path:
    """The tokenizer folder to use: `model_dir`, or the default model's when empty or unset.

    Model configs leave `tokenizer_dir` empty to mean "the default model"; an unfilled
    `${tokenizer_dir}` template counts as empty too, so an upstream-style config still loads.
    """
    text = "" if model_dir is None else str(model_dir).strip()
    if not text or text.startswith("${"):
        return default_model_dir()
    return Path(text)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_tokenizer(model_dir: str | Path | None = None) -> Any:
    """Load the fast tokenizer of `model_dir` (default: the default model), once per folder.

    Loading takes a few hundred milliseconds and every model instance needs the same object,
    hence the cache. The tokenizer is shared: callers must not mutate it.
    """
    return _load_tokenizer_cached(str(resolve_tokenizer_dir(model_dir).resolve()))


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(end_id, pad_id) as TensorRT-LLM's preprocessing derives them: pad falls back to EOS."""
    end_id = tokenizer.eos_token_id
    if end_id is None:
        raise ValueError("the tokenizer has no EOS token; pass END_ID explicitly")
    pad_id = tokenizer.pad_token_id
    return int(end_id), int(end_id if pad_id is None else pad_id)


def parse_messages(raw: str | bytes) -> list[dict[str, str]]:
    """Parse a JSON chat (`[{"role": ..., "content": ...}, ...]`) and check its shape."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"messages are not valid UTF-8: {exc}") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"messages are not valid JSON: {exc}") from None
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty JSON list of {role, content} objects")
    messages: list[dict[str, str]] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise ValueError(f"messages[{index}] must be an object, got {type(item).__name__}")
        role, content = item.get("role"), item.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}].role must be a non-empty string")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string")
        messages.append({"role": role, "content": content})
    return messages


def encode_prompt(
    tokenizer: Any,
    text: str | None = None,
    *,
    messages: list[dict] | None = None,
    chat: bool = False,
    add_special_tokens: bool = True,
) -> list[int]:
    """Token ids of a prompt: plain text, or a chat rendered with the model's chat template.

    With `messages`, or with `chat=True` (then `text` is one user message), the template is
    applied with the assistant turn opened (add_generation_prompt), so the model answers
    rather than continues the user's text.
    """
    if messages is not None and text is not None:
        raise ValueError("give either text or messages, not both")
    if messages is None and chat:
        if text is None:
            raise ValueError("chat=True needs text")
        messages = [{"role": "user", "content": text}]
    if messages is not None:
        # Render to a string, then encode without adding specials: the template already
        # holds every special token it wants (adding a BOS again would double it).
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer.encode(rendered, add_special_tokens=False))
    if text is None:
        raise ValueError("no prompt: give text or messages")
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged id lists into int32 [batch, max_len] plus lengths int32 [batch, 1]."""
    lengths = np.array([[len(seq)] for seq in sequences], dtype=np.int32).reshape(-1, 1)
    width = int(lengths.max()) if len(sequences) else 0
    ids = np.full((len(sequences), width), pad_id, dtype=np.int32)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
    return ids, lengths


def to_word_list(tokenizer: Any, words: Sequence[str | bytes]) -> np.ndarray:
    """One request's stop/bad words in TensorRT-LLM's int32 [2, L] layout.

    Row 0 holds the token ids of all words back to back, padded with 0; row 1 the cumulative
    end offset of each word, padded with -1. Words that encode to no tokens are dropped and
    L is at least 1, so an empty list gives [[0], [-1]] (as upstream's `_to_word_list_format`
    does for a request that sends the tensor with nothing usable in it).
    """
    flat: list[int] = []
    offsets: list[int] = []
    for word in words:
        if isinstance(word, bytes):
            word = word.decode("utf-8")
        # No specials: a BOS in front would make every stop word unmatchable.
        ids = tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            continue
        flat.extend(int(i) for i in ids)
        offsets.append(len(flat))
    width = max(1, len(flat))
    out = np.zeros((2, width), dtype=np.int32)
    out[1, :] = -1
    out[0, : len(flat)] = flat
    out[1, : len(offsets)] = offsets
    return out


def stack_word_lists(word_lists: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-request [2, L_i] word lists into [batch, 2, max L], padding as upstream does."""
    width = max((wl.shape[1] for wl in word_lists), default=0)
    out = np.zeros((len(word_lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for row, wl in enumerate(word_lists):
        out[row, :, : wl.shape[1]] = wl
    return out


def from_word_list(word_list: np.ndarray) -> list[list[int]]:
    """The token sequences encoded in a [2, L] (or [1, 2, L]) word list; inverse of to_word_list.

    An empty tensor ([2, 0], what upstream sends when no words were given) yields [].
    """
    arr = np.asarray(word_list)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise ValueError(f"a word list must have shape [2, L], got {list(arr.shape)}")
    ids, ends = arr[0].tolist(), arr[1].tolist()
    words: list[list[int]] = []
    start = 0
    for end in ends:
        if end < 0:
            break
        if end <= start or end > len(ids):
            raise ValueError(f"word list offsets must increase within [1, {len(ids)}]: {ends}")
        words.append([int(i) for i in ids[start:end]])
        start = end
    return words


def embedding_bias(
    tokenizer: Any, words: Sequence[str | bytes], weights: Sequence[float]
) -> np.ndarray:
    """A float32 [vocab] logit bias: each word's weight added to each of its tokens."""
    if len(words) != len(weights):
        raise ValueError(
            f"{len(words)} embedding bias words but {len(weights)} weights: they must pair up"
        )
    bias = np.zeros(len(tokenizer), dtype=np.float32)
    for word, weight in zip(words, weights, strict=True):
        if isinstance(word, bytes):
            word = word.decode("utf-8")
        for token_id in tokenizer.encode(word, add_special_tokens=False):
            bias[token_id] += weight
    return bias


def decode_all(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Decode a whole sequence at once (the reference the incremental decoder must match)."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turn a growing token sequence into text deltas, never splitting a UTF-8 character.

    Byte-level tokenizers spread one character (an emoji, most CJK) over several tokens;
    decoding the tokens seen so far then ends in U+FFFD. Like vLLM and TGI we keep two
    offsets: text is decoded from `prefix_offset` (a little context, so tokenizers that
    drop a leading space at the start of a decode still get it right) and only the part
    after the already-emitted `read_offset` is new. While the decode ends in U+FFFD the
    delta is held back; `flush()` releases it at the end of the stream.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def _pending(self) -> tuple[str, str]:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        return prefix_text, new_text

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (may be "" while a char is partial)."""
        self.ids.extend(int(i) for i in token_ids)
        prefix_text, new_text = self._pending()
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the stream (a truly incomplete char stays U+FFFD)."""
        prefix_text, new_text = self._pending()
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]
