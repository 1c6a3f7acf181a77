"""CPU kernels for the engine's fused forward pass (float32): `triton_kernels`' counterparts.

The same five functions with the same signatures, so `llama.py` runs one fused forward on
either device. Four are C++ (`native/cpu_kernels.cc`, built by `make setup` into
`_cpu_kernels*.so`): RMSNorm with the residual add, RoPE with the KV-cache write, SiLU-and-
mul, and paged decode attention that reads the cache in place. Prefill attention stays on
PyTorch's SDPA (its flash kernel does long prompts better than a simple loop would), with
the chunks of a step batched by shape.

The extension also has greedy sampling's argmax over the logits (`argmax_rows`), and the
fused path's GEMM, `pack_linear_weight` and `linear`, which
`llama.Linear` multiplies through (CUDA's path uses cuBLAS for that), and, where the build
and the processor have AMX, `blockq_linear` for exactly block-quantized weights
(`block_quant`).

Where the extension is not built (no compiler at setup), `available()` is False and the
model keeps its plain PyTorch path, which computes the same function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:
    from python_backends.engine import _cpu_kernels as _native
except ImportError as exc:  # not built: no C++ toolchain, or built for another torch
    _native = None
    IMPORT_ERROR: str | None = str(exc)
else:
    IMPORT_ERROR = None


def available() -> bool:
    return _native is not None


if _native is not None:
    paged_decode_attention = _native.paged_decode_attention
    rope_and_cache = _native.rope_and_cache
    rms_norm = _native.rms_norm
    silu_and_mul = _native.silu_and_mul
    pack_linear_weight = _native.pack_linear_weight
    linear = _native.linear
    panel_width = _native.panel_width
    gemm_tile = _native.gemm_tile
    blockq_available = _native.blockq_available
    blockq_linear = _native.blockq_linear
    argmax_rows = _native.argmax_rows  # torch.argmax(x, dim=-1) of float32 rows, vectorized


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the first `length` tokens of each row of `block_tables`, copied out
    of the paged cache: [rows, kv_heads, length, head_dim] each (strided views of
    [rows, length, kv_heads, head_dim] copies, which SDPA reads as they are)."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    num_blocks = -(-length // block_size)
    flat = block_tables[:, :num_blocks].reshape(-1)
    shape = (block_tables.shape[0], num_blocks * block_size, kv_heads, head_dim)
    # index_select on the flat table: advanced indexing (cache[table]) is ~1000x slower on
    # the CPU for these shapes.
    keys = k_cache.index_select(0, flat).view(shape)[:, :length]
    values = v_cache.index_select(0, flat).view(shape)[:, :length]
    return keys.transpose(1, 2), values.transpose(1, 2)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor | Sequence[int],
    query_start: torch.Tensor | Sequence[int],
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks; the contract of
    `triton_kernels.paged_prefill_attention` (lengths and starts may also be lists: the
    plain path's metadata has them so). Plain PyTorch, so the plain path runs it too.

    Chunks with the same (chunk length, context length) go through one batched SDPA call:
    batched 4-D inputs take PyTorch's flash kernel, where one call per chunk took its math
    fallback (32 chunks of 64 tokens: 5.5 ms a layer against 15).
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    starts = query_start.tolist() if isinstance(query_start, torch.Tensor) else query_start
    lengths = context_lens.tolist() if isinstance(context_lens, torch.Tensor) else context_lens
    shapes: dict[tuple[int, int], list[int]] = {}
    for i, ctx_len in enumerate(lengths):
        q_len = starts[i + 1] - starts[i]
        if q_len > 0:
            shapes.setdefault((q_len, ctx_len), []).append(i)
    head_dim = q.shape[-1]
    for (q_len, ctx_len), chunks in shapes.items():
        rows = torch.tensor([starts[i] + j for i in chunks for j in range(q_len)],
                            device=q.device)
        queries = q.index_select(0, rows).view(len(chunks), q_len, -1, head_dim)
        keys, values = gather_kv(k_cache, v_cache, block_tables[chunks], ctx_len)
        mask = None
        if ctx_len != q_len:  # a cached prefix before the chunk: causal from an offset
            query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)[:, None]
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= query_pos
        result = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys, values,
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True,
        )
        out.index_copy_(0, rows, result.transpose(1, 2).reshape(-1, *out.shape[1:]))
    return out
