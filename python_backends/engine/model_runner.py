"""ModelRunner: owns the model and the KV cache; turns a schedule into tensors and tokens.

It knows nothing of queues: it gets the sequences of one step and returns one sampled
token per sequence.
"""

from __future__ import annotations

import logging

import torch

from python_backends.engine.config import EngineConfig
from python_backends.engine.llama import AttentionMetadata, LlamaConfig, load_model
from python_backends.engine.sampler import Sampler
from python_backends.engine.sequence import Sequence

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.dtype]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_config = LlamaConfig.from_model_dir(config.model_dir)
        self.model = load_model(config.model_dir, self.dtype, self.device)
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        shape = (
            self.num_blocks,
            self.block_size,
            self.model_config.num_key_value_heads,
            self.model_config.head_dim,
        )
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(self.model_config.num_hidden_layers)
        ]
        self.sampler = Sampler(self.device)
        log.info(
            "model runner: %s %s on %s, %d KV blocks of %d tokens",
            config.model_dir, self.dtype, self.device, self.num_blocks, self.block_size,
        )

    @property
    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        element = torch.tensor([], dtype=self.dtype).element_size()
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element
        return per_token * self.block_size

    def _num_kv_blocks(self) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.gpu_memory_utilization)
        else:
            budget = self.config.kv_cache_bytes
        blocks = budget // self.kv_bytes_per_block
        if blocks < 1:
            raise ValueError(
                f"KV-cache budget {budget} bytes holds no block of {self.kv_bytes_per_block} bytes"
            )
        return blocks

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if is_prefill:
            input_ids, positions, meta = self._prepare_prefill(seqs)
        else:
            input_ids, positions, meta = self._prepare_decode(seqs)
        logits = self.model(input_ids, positions, self.kv_caches, meta)
        return self.sampler.sample(logits, seqs)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _prepare_prefill(self, seqs: list[Sequence]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        for seq in seqs:
            start, end = seq.num_computed_tokens, seq.num_tokens
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            query_start.append(query_start[-1] + end - start)
            context_lens.append(end)
        meta = self._metadata(True, slots, context_lens, seqs, query_start)
        return self._long(input_ids), self._long(positions), meta

    def _prepare_decode(self, seqs: list[Sequence]):
        input_ids = [s.last_token_id for s in seqs]
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [self._slot(s, p) for s, p in zip(seqs, positions, strict=True)]
        context_lens = [s.num_tokens for s in seqs]
        meta = self._metadata(False, slots, context_lens, seqs, list(range(len(seqs) + 1)))
        return self._long(input_ids), self._long(positions), meta

    def _metadata(self, is_prefill, slots, context_lens, seqs, query_start) -> AttentionMetadata:
        lens = self._long(context_lens)
        max_len = max(context_lens)
        bias = None
        if not is_prefill:
            positions = torch.arange(max_len, device=self.device)
            bias = torch.zeros(len(seqs), 1, 1, max_len, device=self.device)
            bias.masked_fill_((positions[None, :] >= lens[:, None])[:, None, None, :],
                              float("-inf"))
        return AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=self._long(slots),
            context_lens=lens,
            block_tables=self._block_tables(seqs),
            query_start=query_start,
            context_lens_list=context_lens,
            last_token_rows=self._long([end - 1 for end in query_start[1:]]),
            max_context_len=max_len,
            decode_bias=bias,
        )

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
