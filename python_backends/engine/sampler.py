"""Sampler: greedy, temperature, top-k and top-p, reproducible per request with a seed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from python_backends.engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device,
                 argmax: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.device = device
        # Each row's argmax, as logits.argmax(dim=-1) computes it (e.g. the CPU kernels').
        self._argmax = argmax or (lambda logits: logits.argmax(dim=-1))
        # One generator per seeded sequence, so a seed gives the same tokens whatever
        # else shares the batch.
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One next token per sequence from `logits` [batch, vocab] (float32)."""
        for row, seq in enumerate(seqs):
            params = seq.sampling
            if params.end_id is not None and seq.num_output_tokens < params.min_tokens:
                logits[row, params.end_id] = float("-inf")
            for word in params.bad_token_ids:
                # Ban the word's last token where the text so far ends with the rest of it.
                if len(word) == 1 or tuple(seq.all_token_ids[-(len(word) - 1):]) == word[:-1]:
                    logits[row, word[-1]] = float("-inf")
        tokens = self._argmax(logits).tolist()
        for row, seq in enumerate(seqs):
            if not seq.sampling.greedy:
                tokens[row] = self._sample_one(logits[row], seq)
        return tokens

    def forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def _sample_one(self, logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.sampling
        logits = logits / params.temperature
        if params.top_k > 0 and params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, params.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (always the top token).
            drop = cumulative - sorted_probs >= params.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(seq)).item())

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.seed is None:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.sampling.seed)
            self._generators[seq.seq_id] = gen
        return gen
