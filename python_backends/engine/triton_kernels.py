"""Triton kernels for the engine's GPU path (imported only when the model runs on CUDA).

Kernels, each replacing a string of small PyTorch ops so that a decode step is about
nine launches a layer (small enough to make CUDA-graph replay cheap):

- `paged_decode_attention` / `paged_prefill_attention`: one kernel (FlashAttention-style
  online softmax, tensor-core dots) that reads keys and values from the paged cache through
  the block table. Decode: one query token per sequence; context lengths are read inside
  the kernel, so every shape is static and the launch can be captured in a CUDA graph; a
  row with context length 0 (padding of a graph batch) writes zeros. Prefill: all chunks of
  a step in one launch (varlen, causal), cached prefixes included. Grouped-query aware: a
  program handles one kv head and all the query heads that share it, so each key and
  value is read once per query tile.
- `rope_and_cache`: rotary embedding of q and k in place in the fused qkv projection
  output, and the write of k and v into the paged cache at each token's slot (slot < 0:
  no write, for padding rows).
- `rms_norm`: RMSNorm, optionally fused with the residual add before it.
- `silu_and_mul`: SiLU(gate) * up of the fused gate/up projection.

Rounding follows the PyTorch reference ops in `llama.py` (compute in float32, round to the
activation dtype where PyTorch does), so greedy tokens agree with the CPU path and with
transformers in float32. With TRITON_INTERPRET=1 the kernels also run on CPU tensors
(slowly), which the tests use where the triton package is installed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------- attention


@triton.jit
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    query_start_ptr,
    scale,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh,
    stride_bt,
    GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, DIM_P: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DECODE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program (sequence, kv head, query tile): BLOCK_M query tokens x the GROUP query heads
    # of this kv head, flattened into ROWS rows of one matrix, against the sequence's keys.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)  # keys in the cache after this step
    if DECODE:
        q_start = seq
        q_len = 1
    else:
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start

    ROWS: tl.constexpr = BLOCK_M * GROUP_P
    r = tl.arange(0, ROWS)
    tok = tile * BLOCK_M + r // GROUP_P
    g = r % GROUP_P
    d = tl.arange(0, DIM_P)
    d_mask = d < HEAD_DIM
    row_mask = (tok < q_len) & (g < GROUP)
    q_pos = ctx - q_len + tok  # each query's position: it sees keys 0..q_pos
    q_rows = q_start + tok
    heads = kv_head * GROUP + g
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=q_mask, other=0.0)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM_P], tl.float32)
    # Keys up to the tile's last query (causal); none for a tile past the chunk or a
    # padding row (context length 0).
    kv_end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)
    kv_end = tl.where(tile * BLOCK_M < q_len, kv_end, 0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs = tl.arange(0, BLOCK_N)
    for start in range(0, kv_end, BLOCK_N):
        t = start + offs
        t_mask = t < kv_end
        page = tl.load(table + t // PAGE, mask=t_mask, other=0).to(tl.int64)
        row = page * stride_kb + (t % PAGE) * stride_kt + kv_head * stride_kh
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [ROWS, BLOCK_N]
        visible = (t[None, :] <= q_pos[:, None]) & t_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        # The first tile holds key 0, which every row sees: m is finite from then on.
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    l_sum = tl.where(l_sum > 0.0, l_sum, 1.0)
    out = acc / l_sum[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _launch_attention(q, k_cache, v_cache, block_tables, context_lens, query_start, scale,
                      out, num_seqs, max_query_len, decode):
    _tokens, heads, head_dim = q.shape
    _num_blocks, page, kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim and heads % kv_heads == 0 and q.stride(-1) == 1
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    group = heads // kv_heads
    group_p = _pow2(group)
    if decode:
        block_m, group_p = 1, max(16, group_p)  # tl.dot needs at least 16 rows
    else:
        block_m = max(1, 64 // group_p)  # query tokens a program: 64 rows
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (num_seqs, kv_heads, triton.cdiv(max_query_len, block_m))
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, context_lens,
        query_start if query_start is not None else context_lens,
        scale,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, GROUP_P=group_p,
        HEAD_DIM=head_dim, DIM_P=max(16, _pow2(head_dim)),
        PAGE=page, BLOCK_M=block_m, BLOCK_N=64,
        DECODE=decode, PRECISION=precision,
        num_warps=4,
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its cached keys and values.

    q: [batch, heads, head_dim] (the last dim contiguous); k_cache/v_cache:
    [num_blocks, block_size, kv_heads, head_dim]; block_tables: [batch, >= blocks used]
    int32; context_lens: [batch] int32, the number of cached tokens to attend to (the new
    token's own key included; 0 for a padding row, whose output is zeros). Returns
    [batch, heads, head_dim] in q's dtype. Every length is read on the device: with static
    tensors the launch can be captured in a CUDA graph.
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return _launch_attention(q, k_cache, v_cache, block_tables, context_lens, None, scale,
                             out, q.shape[0], 1, decode=True)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of prefill chunks (varlen, one launch for all of them).

    Chunk i is rows query_start[i] ... query_start[i + 1] of q [tokens, heads, head_dim],
    the last tokens of a sequence that has context_lens[i] tokens after this step; its keys
    (those of the chunk included, written to the cache before) are read from the paged
    cache through block_tables[i], so a cached prefix is attended to like any other key.
    """
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    num_seqs = query_start.shape[0] - 1
    if num_seqs <= 0 or max_query_len <= 0:
        return out
    return _launch_attention(q, k_cache, v_cache, block_tables, context_lens, query_start,
                             scale, out, num_seqs, max_query_len, decode=False)


# ----------------------------------------------------------------------------- rope + cache


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, stride_qkv, positions_ptr, cos_ptr, sin_ptr, stride_cs, slots_ptr,
    k_cache_ptr, v_cache_ptr, stride_slot,
    NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEADS_P: tl.constexpr, KV_P: tl.constexpr,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
):
    tok = tl.program_id(0)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    j = tl.arange(0, HALF_P)
    j_mask = j < HALF
    cos = tl.load(cos_ptr + pos * stride_cs + j, mask=j_mask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cs + j, mask=j_mask, other=0.0)[None, :]
    row = qkv_ptr + tok.to(tl.int64) * stride_qkv
    dtype = qkv_ptr.dtype.element_ty

    h = tl.arange(0, HEADS_P)
    mask = (h < NUM_HEADS)[:, None] & j_mask[None, :]
    first = row + h[:, None] * HEAD_DIM + j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)

    kh = tl.arange(0, KV_P)
    kmask = (kh < NUM_KV)[:, None] & j_mask[None, :]
    kfirst = row + NUM_HEADS * HEAD_DIM + kh[:, None] * HEAD_DIM + j[None, :]
    k1 = tl.load(kfirst, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(kfirst + HALF, mask=kmask, other=0.0).to(tl.float32)
    r1 = (k1 * cos - k2 * sin).to(dtype)
    r2 = (k2 * cos + k1 * sin).to(dtype)
    tl.store(kfirst, r1, mask=kmask)
    tl.store(kfirst + HALF, r2, mask=kmask)

    slot = tl.load(slots_ptr + tok).to(tl.int64)
    if slot >= 0:
        vfirst = kfirst + NUM_KV * HEAD_DIM
        v1 = tl.load(vfirst, mask=kmask, other=0.0)
        v2 = tl.load(vfirst + HALF, mask=kmask, other=0.0)
        dest = slot * stride_slot + kh[:, None] * HEAD_DIM + j[None, :]
        cache_dtype = k_cache_ptr.dtype.element_ty
        tl.store(k_cache_ptr + dest, r1.to(cache_dtype), mask=kmask)
        tl.store(k_cache_ptr + dest + HALF, r2.to(cache_dtype), mask=kmask)
        tl.store(v_cache_ptr + dest, v1.to(cache_dtype), mask=kmask)
        tl.store(v_cache_ptr + dest + HALF, v2.to(cache_dtype), mask=kmask)


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """Rotate q and k in place in `qkv` [tokens, (heads + 2 kv_heads) * head_dim] (the
    Hugging Face half-split layout); write k and v to the cache at `slot_mapping`.

    cos/sin: [max_positions, head_dim // 2] float32 tables indexed by position.
    """
    tokens = qkv.shape[0]
    if tokens == 0:
        return
    assert qkv.stride(-1) == 1 and cos.stride() == sin.stride()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    half = head_dim // 2
    _rope_cache_kernel[(tokens,)](
        qkv, qkv.stride(0), positions, cos, sin, cos.stride(0), slot_mapping,
        k_cache, v_cache, num_kv_heads * head_dim,
        NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEADS_P=_pow2(num_heads),
        KV_P=_pow2(num_kv_heads), HEAD_DIM=head_dim, HALF=half, HALF_P=_pow2(half),
        num_warps=1 if num_heads * head_dim <= 1024 else 4,
    )


# ----------------------------------------------------------------------------- norm, mlp


@triton.jit
def _rms_norm_kernel(
    x_ptr, stride_x, res_ptr, stride_r, res_out_ptr, stride_ro, out_ptr, stride_o, w_ptr,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / n_cols
    y = (x32 * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of `x` (or of `x + residual`). Returns (normed, the new residual stream):
    the residual stream is `x` itself without `residual`, else the sum (a new tensor)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    res_out = x if residual is None else torch.empty_like(x)
    res = x if residual is None else residual
    if rows:
        _rms_norm_kernel[(rows,)](
            x, x.stride(0), res, res.stride(0), res_out, res_out.stride(0), out, out.stride(0),
            weight, cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=_pow2(cols),
            num_warps=4 if cols <= 4096 else 8,
        )
    return out, res_out


@triton.jit
def _silu_and_mul_kernel(x_ptr, stride_x, out_ptr, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x[:, :n]) * x[:, n:] for x: [tokens, 2n]."""
    rows, width = x.shape
    n = width // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x, x.stride(0), out, out.stride(0), n, BLOCK=block, num_warps=4,
        )
    return out
