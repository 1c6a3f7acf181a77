"""Weights that are exactly block-quantized, for the AMX GEMM in `native/blockq_gemm.h`.

A GGUF Q4_1 or Q8_0 checkpoint dequantized to float32 (what transformers loads, and so what
the engine's converted weights are) keeps its structure: each block of 32 weights along a
row is fl(d * q + m), q an integer (0..15 for Q4_1, -127..127 for Q8_0 with m = 0) and d, m
float16 values. `find_blocks` recovers q, d and m and checks them bit for bit against the
weight, so a weight of any other origin is simply not taken. From them the C++ GEMM computes
x W^T on AMX's bfloat16 tiles as accurately as float32 arithmetic does (the header says how),
with the weight in 2 bytes an element instead of 4.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

BLOCK = 32  # weights per block along a row: GGUF's Q4_1/Q8_0 block, one AMX tile's depth
TILE = 16  # output columns per AMX tile


class BlockForm(NamedTuple):
    """weight[n, b * 32 + i] == fl(d[n, b] * q[n, b * 32 + i] + m[n, b]), exactly."""

    q: torch.Tensor  # [n, k] bfloat16 holding small integers (exactly)
    d: torch.Tensor  # [n, k / 32] float32 (float16 values)
    m: torch.Tensor  # [n, k / 32] float32


class PackedBlocks(NamedTuple):
    """A BlockForm in the kernel's layout (`cpu_kernels.blockq_linear`'s arguments)."""

    tiles: torch.Tensor  # [n / 16, k / 32, 512] bfloat16: q in AMX's VNNI layout
    scales: torch.Tensor  # [n / 16, k / 32, 32] float32: d of the 16 columns, then m


def _float16_neighbours(values: torch.Tensor) -> list[torch.Tensor]:
    """float16(values) and the float16 values next to it, as float32: the candidates for a
    scale the quantizer rounded to float16 from what the weights let us recompute."""
    nearest = values.to(torch.float16)
    bits = nearest.view(torch.int16)
    return [nearest.float()] + [(bits + step).view(torch.float16).float() for step in (1, -1)]


def find_blocks(weight: torch.Tensor, rows_per_chunk: int = 2048) -> BlockForm | None:
    """The weight's exact block form, or None where some block has none (or the shape does
    not tile: k a multiple of 32, n of 16). Works through `rows_per_chunk` rows at a time, so
    its temporaries stay small next to the weight (a 49,152-row vocabulary included)."""
    if weight.dim() != 2 or weight.dtype != torch.float32:
        return None
    n, k = weight.shape
    if n % TILE or k % BLOCK or n == 0:
        return None
    forms = []
    for start in range(0, n, rows_per_chunk):
        form = _find_blocks_of_rows(weight[start:start + rows_per_chunk].detach())
        if form is None:
            return None
        forms.append(form)
    return BlockForm(*(torch.cat(parts) for parts in zip(*forms, strict=True)))


def _find_blocks_of_rows(weight: torch.Tensor) -> BlockForm | None:
    n, k = weight.shape
    blocks = weight.reshape(n, k // BLOCK, BLOCK)
    low = blocks.amin(-1, keepdim=True)
    high = blocks.amax(-1, keepdim=True)
    largest = blocks.abs().amax(-1, keepdim=True)
    zero = torch.zeros_like(low)
    # (d, m, q's range) to try: Q4_1 keeps the block's minimum as m (q = 0 there) and maps its
    # maximum to q = 15; Q8_0 maps the largest magnitude to q = +-127.
    candidates = [(d, low, 0, 15) for d in _float16_neighbours((high - low) / 15)]
    candidates += [(d, zero, -127, 127) for d in _float16_neighbours(largest / 127)]
    found = torch.zeros(n, k // BLOCK, 1, dtype=torch.bool)
    q_found, d_found, m_found = torch.zeros_like(blocks), torch.zeros_like(low), zero.clone()
    for d, m, q_min, q_max in candidates:
        divisor = torch.where(d == 0, torch.ones_like(d), d)
        q = torch.round((blocks - m) / divisor).clamp(q_min, q_max)
        exact = ((d * q + m) == blocks).all(-1, keepdim=True) & ~found
        q_found = torch.where(exact, q, q_found)
        d_found = torch.where(exact, d, d_found)
        m_found = torch.where(exact, m, m_found)
        found |= exact
        if bool(found.all()):
            # bfloat16 holds q exactly (|q| <= 127) in half the memory.
            return BlockForm(q_found.reshape(n, k).to(torch.bfloat16), d_found.reshape(n, -1),
                             m_found.reshape(n, -1))
    return None


def pack(form: BlockForm) -> PackedBlocks:
    """Lay a BlockForm out as the kernel reads it: per (column tile, block), q as one AMX B
    tile (row r holds inputs 2r and 2r + 1 of the 16 columns, interleaved) and 32 scales."""
    n, k = form.q.shape
    tiles_n, blocks = n // TILE, k // BLOCK
    tiles = (form.q.reshape(tiles_n, TILE, blocks, BLOCK // 2, 2)
             .permute(0, 2, 3, 1, 4)
             .reshape(tiles_n, blocks, BLOCK * TILE)
             .to(torch.bfloat16))  # a no-op for find_blocks' q; exact for |q| <= 256
    scales = torch.stack([form.d.reshape(tiles_n, TILE, blocks).transpose(1, 2),
                          form.m.reshape(tiles_n, TILE, blocks).transpose(1, 2)], dim=2)
    return PackedBlocks(tiles.contiguous(), scales.reshape(tiles_n, blocks, 2 * TILE).contiguous())
