"""Small engine fixtures shared by the engine's test modules: a random tiny Llama checkpoint
and prompts for it."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_llama(path: Path, seed: int = 0, **overrides) -> str:
    """A small random Llama checkpoint (transformers layout, safetensors) in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():  # larger than the default init, so logits are not near-ties
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(path)
    return str(path)


def prompts(n: int, seed: int = 1, vocab: int = 512) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(length),), generator=gen).tolist()
            for length in torch.randint(3, 40, (n,), generator=gen)]
