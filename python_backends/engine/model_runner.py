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
from python_backends.engine.scheduler import SchedulerOutput
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
    def run(self, batch: SchedulerOutput) -> list[int]:
        """Run one step; return a token for each sequence in `sampling_seqs(batch)`."""
        input_ids, positions, meta, sampled = self._prepare(batch)
        logits = self.model(input_ids, positions, self.kv_caches, meta)
        return self.sampler.sample(logits, sampled)

    @staticmethod
    def sampling_seqs(batch: SchedulerOutput) -> list[Sequence]:
        """Sequences that get a new token this step: decodes, and prompts whose last chunk
        this step computes."""
        done = [
            seq for seq, n in zip(batch.prefill_seqs, batch.prefill_chunks, strict=True)
            if seq.num_computed_tokens + n == seq.num_tokens
        ]
        return list(batch.decode_seqs) + done

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    def _block_tables(self, seqs) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _prepare(self, batch: SchedulerOutput):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        decodes = batch.decode_seqs
        for seq in decodes:
            position = seq.num_tokens - 1
            input_ids.append(seq.last_token_id)
            positions.append(position)
            slots.append(self._slot(seq, position))
            logits_rows.append(len(logits_rows))
        meta = AttentionMetadata(slot_mapping=None, logits_rows=None, num_decode=len(decodes))
        if decodes:
            lens = [s.num_tokens for s in decodes]
            meta.decode_max_len = max(lens)
            meta.decode_block_tables = self._block_tables(decodes)
            span = torch.arange(meta.decode_max_len, device=self.device)
            past_end = span[None, :] >= self._long(lens)[:, None]
            meta.decode_bias = torch.zeros(len(decodes), 1, 1, meta.decode_max_len,
                                           device=self.device)
            meta.decode_bias.masked_fill_(past_end[:, None, None, :], float("-inf"))
        for seq, n in zip(batch.prefill_seqs, batch.prefill_chunks, strict=True):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids.extend(seq.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            meta.query_start.append(meta.query_start[-1] + n)
            meta.context_lens.append(end)
            if end == seq.num_tokens:
                logits_rows.append(len(input_ids) - 1)
        if batch.prefill_seqs:
            meta.prefill_block_tables = self._block_tables(batch.prefill_seqs)
        meta.slot_mapping = self._long(slots)
        meta.logits_rows = self._long(logits_rows)
        return self._long(input_ids), self._long(positions), meta, self.sampling_seqs(batch)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
