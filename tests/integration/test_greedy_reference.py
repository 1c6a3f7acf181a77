"""Greedy output through every entry point equals transformers' generate() on the same weights."""

from __future__ import annotations

import pytest
import torch

from python_backends.paths import default_model_dir
from python_backends.text import encode_prompt

from .client import engine_inputs, ensemble_inputs, joined_text, llm_inputs, run
from .conftest import LLM_BLS

pytestmark = pytest.mark.server

MAX_TOKENS = 24
# (prompt, chat): two chats (one ends on EOS early, one runs to max_tokens) and plain text.
CASES = [
    ("What is the capital of France?", True),
    ("Write a haiku about the sea.", True),
    ("Once upon a time, there was", False),
]
IDS = ["chat-short", "chat-long", "plain"]


@pytest.fixture(scope="module")
def reference(tokenizer):
    """prompt -> (prompt ids, generated ids without EOS, generated text) from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    model.eval()
    eos = tokenizer.eos_token_id
    out = {}
    for prompt, chat in CASES:
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos,
            )
        tokens = gen[0, len(ids):].tolist()
        if tokens and tokens[-1] == eos:
            tokens = tokens[:-1]
        out[prompt] = (ids, tokens, tokenizer.decode(tokens, skip_special_tokens=True))
    del model
    return out


def test_reference_is_meaningful(reference):
    """Guard: the cases cover an early EOS and a length cut, and produce real text."""
    lengths = [len(reference[p][1]) for p, _ in CASES]
    assert min(lengths) < MAX_TOKENS and max(lengths) == MAX_TOKENS
    assert "Paris" in reference[CASES[0][0]][2]


@pytest.mark.parametrize("model", ["llm", LLM_BLS])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(("prompt", "chat"), CASES, ids=IDS)
def test_llm_matches_transformers(stack, reference, prompt, chat, stream, model):
    """`llm` with its engine in process, and over BLS to `engine` (`llm_bls`)."""
    _, tokens, expected = reference[prompt]
    responses = run(stack.url, model, llm_inputs(prompt, MAX_TOKENS, stream=stream, chat=chat))
    assert joined_text(responses) == expected
    assert responses[-1].final
    chunks = len([r for r in responses if r.text])
    if stream:
        assert chunks > len(tokens) // 2  # streamed as it was generated
    else:
        assert chunks <= 1  # the whole answer at once


def test_llm_whole_answer_echoes_the_prompt(stack, reference):
    """vLLM semantics: without exclude_input_in_output the text starts with the prompt."""
    prompt = CASES[2][0]
    inputs = llm_inputs(prompt, MAX_TOKENS, stream=False, exclude_input=False)
    assert joined_text(run(stack.url, "llm", inputs)) == prompt + reference[prompt][2]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(("prompt", "chat"), CASES, ids=IDS)
def test_ensemble_matches_transformers(stack, tokenizer, reference, prompt, chat, stream):
    ids, _, expected = reference[prompt]
    if chat:
        # The ensemble takes text as it is: send it the rendered chat template.
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(prompt) == ids  # preprocessing tokenizes it to the same ids
    responses = run(stack.url, "ensemble", ensemble_inputs(prompt, MAX_TOKENS, stream=stream))
    assert joined_text(responses) == expected
    assert responses[-1].final


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize(("prompt", "chat"), CASES, ids=IDS)
def test_engine_token_ids_match_transformers(stack, reference, prompt, chat, stream):
    ids, expected, _ = reference[prompt]
    responses = run(stack.url, "engine", engine_inputs(ids, MAX_TOKENS, stream=stream))
    assert not [r.error for r in responses if r.error]
    assert [t for r in responses for t in r.token_ids] == expected
    assert responses[-1].final
