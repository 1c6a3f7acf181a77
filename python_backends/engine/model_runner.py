"""ModelRunner: owns the model and the KV cache; turns a schedule into tensors and tokens.

It knows nothing of queues: it gets the sequences of one step and returns one sampled
token per sequence.

On a GPU (unless `enforce_eager`), decode-only steps replay CUDA graphs captured at start-up
for a ladder of batch sizes (1, 2, 4, ... up to max_num_seqs, as in vLLM and nano-vllm):
the batch is padded to the next captured size, padding rows write no KV (slot -1) and attend
to nothing (context length 0), and their logits are dropped. The graphs read every per-step
value (token ids, positions, slots, context lengths, block tables) from static buffers that
each step fills with two host-to-device copies. Steps with prefill chunks run eagerly, and
sampling always runs outside the graph. The CPU is always eager.
"""

from __future__ import annotations

import logging

import torch

from python_backends.engine import cpu_kernels
from python_backends.engine.config import EngineConfig
from python_backends.engine.llama import AttentionMetadata, LlamaConfig, load_model
from python_backends.engine.sampler import Sampler
from python_backends.engine.scheduler import SchedulerOutput
from python_backends.engine.sequence import Sequence

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: powers of two below max_num_seqs, then max_num_seqs."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = []
    size = 1
    while size < max_num_seqs:
        sizes.append(size)
        size *= 2
    sizes.append(max_num_seqs)
    return sizes


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds `num_seqs` rows; None when none does."""
    for size in sizes:
        if size >= num_seqs:
            return size
    return None


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
        self.model = load_model(config.model_dir, self.dtype, self.device,
                                native_cpu_kernels=config.native_cpu_kernels,
                                blockq_gemm=config.blockq_gemm)
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
        # Greedy's argmax over 49,152 logits a row: PyTorch's CPU argmax was ~6% of a decode
        # step at 32 rows; the kernel's is the same function, vectorized.
        on_cpu_kernels = self.model.kernels is cpu_kernels
        self.sampler = Sampler(self.device,
                               argmax=cpu_kernels.argmax_rows if on_cpu_kernels else None)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        # Captured decode graphs, by batch size; empty on the CPU or with enforce_eager.
        self.cuda_graph_sizes: list[int] = []
        self._graphs: dict = {}  # batch size -> torch.cuda.CUDAGraph
        self._graph_logits: dict[int, torch.Tensor] = {}
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_cuda_graphs()
        log.info(
            "model runner: %s %s on %s, %s, %d KV blocks of %d tokens, CUDA graphs for %s",
            config.model_dir, self.dtype, self.device, self.kernels_description(),
            self.num_blocks, self.block_size, self.cuda_graph_sizes or "no batch size (eager)",
        )

    @property
    def fused_kernels(self) -> bool:
        """Whether the model runs its fused path (Triton on CUDA, C++ on the CPU), which reads
        int32 lengths, starts and block tables rather than the plain path's padded mask."""
        return self.model.fused_kernels

    def kernels_description(self) -> str:
        gemm = self.model.cpu_gemm
        gemms = f", GEMMs: {gemm}" if gemm else ""
        if gemm and "cpu_kernels" in gemm:
            gemms += f" ({cpu_kernels.gemm_tile()} tile)"
        kernels = self.model.kernels
        if kernels is not None:
            return f"fused kernels: {kernels.__name__.rsplit('.', 1)[-1]}{gemms}"
        if (self.device.type == "cpu" and self.dtype == torch.float32
                and self.config.native_cpu_kernels and not cpu_kernels.available()):
            return (f"plain PyTorch ops{gemms} (C++ kernels not built: "
                    f"{cpu_kernels.IMPORT_ERROR})")
        return f"plain PyTorch ops{gemms}"

    @property
    def kv_bytes_per_block(self) -> int:
        cfg = self.model_config
        element = torch.tensor([], dtype=self.dtype).element_size()
        per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element
        return per_token * self.block_size

    def _num_kv_blocks(self) -> int:
        if self.device.type == "cuda" and self.config.gpu_kv_cache_bytes:
            budget = self.config.gpu_kv_cache_bytes
        elif self.device.type == "cuda":
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
        graph_size = None
        if self._graphs and not batch.prefill_seqs and batch.decode_seqs:
            graph_size = padded_batch_size(len(batch.decode_seqs), self.cuda_graph_sizes)
        if graph_size is not None:
            logits = self._replay(batch.decode_seqs, graph_size)
            sampled = list(batch.decode_seqs)
        else:
            input_ids, positions, meta, sampled = self._prepare(batch)
            logits = self.model(input_ids, positions, self.kv_caches, meta)
        return self.sampler.sample(logits, sampled)

    # ------------------------------------------------------------------ CUDA graphs

    def _graph_meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._graph_inputs[2, :size],
            logits_rows=None,
            num_decode=size,
            decode_block_tables=self._graph_block_tables[:size],
            decode_context_lens=self._graph_inputs[3, :size],
        )

    @torch.inference_mode()
    def _capture_cuda_graphs(self) -> None:
        sizes = cuda_graph_batch_sizes(self.config.max_num_seqs)
        max_bs = sizes[-1]
        # Rows: token ids, positions, slots (-1: write nothing), context lengths (0: padding).
        self._graph_inputs = torch.zeros((4, max_bs), dtype=torch.int32, device=self.device)
        self._graph_inputs[2].fill_(-1)
        self._graph_block_tables = torch.zeros(
            (max_bs, self.max_blocks_per_seq), dtype=torch.int32, device=self.device
        )
        pool = None
        for size in reversed(sizes):  # largest first: the smaller ones reuse its memory
            ids, positions = self._graph_inputs[0, :size], self._graph_inputs[1, :size]
            meta = self._graph_meta(size)

            def step(ids=ids, positions=positions, meta=meta) -> torch.Tensor:
                return self.model(ids, positions, self.kv_caches, meta)

            step()  # warm-up: compiles the kernels outside the capture
            self._synchronize()
            graph, logits = self._capture_graph(step, pool)
            if pool is None:
                pool = graph.pool()
            self._graphs[size] = graph
            self._graph_logits[size] = logits
        self._synchronize()
        self.cuda_graph_sizes = sizes

    @staticmethod
    def _capture_graph(step, pool):
        """Capture `step()` in a CUDA graph; returns the graph and its (static) output."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
        return graph, out

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _replay(self, seqs, size: int) -> torch.Tensor:
        n = len(seqs)
        pad = size - n
        lens = [s.num_tokens for s in seqs]
        rows = [
            [s.last_token_id for s in seqs] + [0] * pad,
            [length - 1 for length in lens] + [0] * pad,
            [self._slot(s, length - 1) for s, length in zip(seqs, lens, strict=True)]
            + [-1] * pad,
            lens + [0] * pad,
        ]
        width = max(len(s.block_table) for s in seqs)
        table = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        self._graph_inputs[:, :size].copy_(torch.tensor(rows, dtype=torch.int32))
        self._graph_block_tables[:n, :width].copy_(torch.tensor(table, dtype=torch.int32))
        self._graphs[size].replay()
        return self._graph_logits[size][:n]

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

    def _block_tables(self, seqs, dtype: torch.dtype = torch.long) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=dtype, device=self.device)

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
        if decodes and self.fused_kernels:
            lens = [s.num_tokens for s in decodes]
            meta.decode_block_tables = self._block_tables(decodes, torch.int32)
            meta.decode_context_lens = torch.tensor(lens, dtype=torch.int32, device=self.device)
        elif decodes:
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
        if batch.prefill_seqs and self.fused_kernels:
            meta.prefill_block_tables = self._block_tables(batch.prefill_seqs, torch.int32)
            meta.prefill_query_start = torch.tensor(meta.query_start, dtype=torch.int32,
                                                    device=self.device)
            meta.prefill_context_lens = torch.tensor(meta.context_lens, dtype=torch.int32,
                                                     device=self.device)
            meta.prefill_max_query_len = max(batch.prefill_chunks)
        elif batch.prefill_seqs:
            meta.prefill_block_tables = self._block_tables(batch.prefill_seqs)
        meta.slot_mapping = self._long(slots)
        meta.logits_rows = self._long(logits_rows)
        return self._long(input_ids), self._long(positions), meta, self.sampling_seqs(batch)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
