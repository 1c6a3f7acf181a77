"""A compact Llama (SmolLM2, Llama 3.x) whose attention reads a paged KV cache.

Linear layers run on the flattened tokens of the whole batch ([num_tokens, hidden]); only
attention needs per-sequence structure, which `AttentionMetadata` describes. Weights load
from a Hugging Face safetensors checkpoint; q/k/v and gate/up are fused at load time so a
layer costs four matrix multiplies.

Two paths compute the same function. The plain one is PyTorch ops (decode attention gathers
each sequence's blocks into a padded buffer): the reference, and the fallback. The fused
one calls a kernels module with one interface and two implementations, about nine calls a
layer: RMSNorm with the residual add, RoPE with the KV-cache write, SiLU-and-mul, and paged
attention that reads keys and values through the block tables. On CUDA that is
`triton_kernels` (its decode step reads every per-step value from tensors, so the model
runner can capture it in a CUDA graph); on the CPU in float32, `cpu_kernels` (C++, where
`make setup` built it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from python_backends.engine import block_quant, cpu_kernels

# Row count oneDNN lays a packed weight out for. Any count runs with it; 32-128 rows measured
# alike and fastest, from single-sequence decode up to 2,048-row prefills.
PACK_BATCH_HINT = 64


class CpuGemm(NamedTuple):
    """A CPU matrix multiply for `Linear`, whose weights it lays out once ahead of time."""

    name: str
    # weight [out, in] -> packed weight, or None where this GEMM cannot take the weight
    pack: Callable[[torch.Tensor], object]
    # (x [rows, in], packed weight, out features) -> x @ weight.T [rows, out]
    multiply: Callable[[torch.Tensor, object, int], torch.Tensor]


def _onednn_gemm() -> CpuGemm | None:
    """oneDNN's fp32 linear with its weight reordered into oneDNN's blocked layout, or None
    where this PyTorch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        reorder = torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None
    return CpuGemm("oneDNN",
                   lambda weight: reorder(weight, PACK_BATCH_HINT),
                   lambda x, packed, _out: linear(x, packed, None, "none", [], ""))


# The plain path's GEMM; the fused path multiplies through the C++ kernels' own where they
# are built (1.3-1.4x oneDNN at decode's rows: docs/benchmarks/cpu_gemm.md).
ONEDNN_GEMM = _onednn_gemm()
NATIVE_GEMM = (CpuGemm("cpu_kernels", cpu_kernels.pack_linear_weight, cpu_kernels.linear)
               if cpu_kernels.available() else None)


def _blockq_gemm() -> CpuGemm:
    """The AMX GEMM for exactly block-quantized weights (`block_quant`); pack returns None
    for other weights, whose layers take the float32 GEMM. Used at every row count: with the
    weights coming from memory, as in a decode step, it is the faster from one row up (a
    SmolLM2 decode step's GEMMs: 17.7 against 20.6 ms at 1 row, 21 against 33 ms at 8, 32
    against 46 ms at 32), since its weights take 2 bytes each instead of 4."""

    def pack(weight: torch.Tensor) -> block_quant.PackedBlocks | None:
        form = block_quant.find_blocks(weight)
        return None if form is None else block_quant.pack(form)

    def multiply(x: torch.Tensor, packed: block_quant.PackedBlocks,
                 out_features: int) -> torch.Tensor:
        return cpu_kernels.blockq_linear(x, packed.tiles, packed.scales)

    return CpuGemm("AMX block GEMM", pack, multiply)


BLOCKQ_GEMM = (_blockq_gemm()
               if NATIVE_GEMM is not None and cpu_kernels.blockq_available() else None)


class Linear(nn.Linear):
    """nn.Linear that, once packed for the CPU, multiplies through a `CpuGemm` with its
    weight laid out ahead of time.

    MKL's GEMM (behind F.linear) re-packs the weight on every call, which at decode's few rows
    costs about as much as the arithmetic: on 2 AVX2 cores a SmolLM2 decode step's matrix
    multiplies take 128 ms at 32 rows with F.linear and 79 ms with oneDNN packed (37 and 26
    ms at one row; the 49,152-token vocabulary projection alone 53 and 20 ms at 32 rows). The
    weights stay fp32, so outputs match F.linear's to rounding.
    """

    packed_weight: object = None  # what `gemm.pack` made of the weight
    gemm: CpuGemm | None = None

    def pack_for_cpu(self, gemm: CpuGemm | None, keep_weight: bool = False) -> bool:
        """Pack the weight for `gemm`; drop the plain copy unless `keep_weight` (a tied
        embedding still reads it). False, and nothing changed, where `gemm` cannot take it."""
        weight = self.weight
        if (gemm is None or self.bias is not None or weight.device.type != "cpu"
                or weight.dtype != torch.float32):
            return False
        packed = gemm.pack(weight.detach())
        if packed is None:
            return False
        self.packed_weight = packed
        self.gemm = gemm
        if not keep_weight:
            # Inference only from here on. A meta tensor keeps the shape readable and makes
            # any read of the old values fail loudly.
            self.weight = nn.Parameter(torch.empty(weight.shape, device="meta"),
                                       requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is None:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = self.gemm.multiply(flat, self.packed_weight, self.out_features)
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> LlamaConfig:
        heads = raw["num_attention_heads"]
        rope_theta = raw.get("rope_theta")
        rope_params = raw.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10000.0)
        rope_scaling = raw.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        eos = raw.get("eos_token_id")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LlamaConfig:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        arch = raw.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"only Llama-architecture models are supported, got {arch!r}")
        return cls.from_dict(raw)


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and keys are, for one forward pass.

    A step mixes decodes and prefill chunks. The flattened batch holds the decode tokens
    first (one per sequence), then each prefill chunk: chunk i is rows
    num_decode + query_start[i] ... num_decode + query_start[i+1], at positions
    context_lens[i] - chunk_len ... context_lens[i] - 1. Keys come from the paged cache
    through block tables (new keys are written there before attention reads).
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    logits_rows: torch.Tensor  # rows whose next-token logits are wanted
    num_decode: int = 0
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks]
    # CUDA path: [num_decode] int32 tokens in each decode sequence's cache (0: padding row,
    # which attends to nothing); read inside the attention kernel.
    decode_context_lens: torch.Tensor | None = None
    decode_max_len: int = 0
    # 0 where a key position is within the sequence, -inf past it; [num_decode, 1, 1, len],
    # built once per step rather than once per layer.
    decode_bias: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None  # [num_prefill, max_blocks]
    # CUDA path: query_start and context_lens as int32 tensors, and the longest chunk.
    prefill_query_start: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    prefill_max_query_len: int = 0
    query_start: list[int] = field(default_factory=lambda: [0])  # prefill chunks
    context_lens: list[int] = field(default_factory=list)  # prefill: tokens after the step


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1+ frequency-dependent scaling (long-context extension).
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {scaling!r}")
    return inv_freq.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like the reference, whatever the activation dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        self.split = (q_size, kv_size, kv_size)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.split, dim=-1)
        q = apply_rope(q.view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        # k_cache: [num_blocks, block_size, kv_heads, head_dim]; flat slots index tokens.
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta).view(nd, -1, self.head_dim)
        if n > nd:  # keys and values from the cache, where they were just written
            cpu_kernels.paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.context_lens,
                meta.query_start, meta.prefill_max_query_len, self.scale, out=out[nd:])
        return self.o_proj(out.reshape(n, -1))

    def forward_fused(self, hidden, positions, rope_cos, rope_sin, k_cache, v_cache, meta,
                      kernels):
        """Fused path (`kernels`: a kernels module): RoPE and the cache write in one call,
        then paged attention: one call for the decode rows, one for all prefill chunks."""
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        kernels.rope_and_cache(qkv, positions, rope_cos, rope_sin, meta.slot_mapping, k_cache,
                               v_cache, self.num_heads, self.num_kv_heads, self.head_dim)
        q = qkv[:, : self.split[0]].view(n, self.num_heads, self.head_dim)
        out = torch.empty((n, self.num_heads, self.head_dim), dtype=q.dtype, device=q.device)
        nd = meta.num_decode
        if nd:
            kernels.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                           meta.decode_context_lens, self.scale, out=out[:nd])
        if n > nd:
            kernels.paged_prefill_attention(
                q[nd:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_context_lens,
                meta.prefill_query_start, meta.prefill_max_query_len, self.scale, out=out[nd:])
        return self.o_proj(out.view(n, -1))

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # SDPA reads the gathered keys and values through their strides (no copy into a
        # head-major layout) and groups query heads itself: 2.7x faster a layer than two
        # batched matmuls at 32 sequences of ~100 tokens on 2 AVX2 cores.
        keys, values = cpu_kernels.gather_kv(k_cache, v_cache, meta.decode_block_tables,
                                             meta.decode_max_len)
        b = q.shape[0]
        out = F.scaled_dot_product_attention(
            q.view(b, self.num_heads, 1, self.head_dim), keys, values,
            attn_mask=meta.decode_bias, scale=self.scale, enable_gqa=True,
        )
        return out.reshape(b, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Half-split rotation, the Hugging Face Llama layout. cos/sin: [tokens, head_dim // 2].
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor, kernels) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, hidden, cos, sin, k_cache, v_cache, meta):
        hidden = hidden + self.self_attn(
            self.input_layernorm(hidden), cos, sin, k_cache, v_cache, meta
        )
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(self, hidden, residual, positions, rope_cos, rope_sin, k_cache, v_cache,
                      meta, kernels, keep_rows: torch.Tensor | None = None):
        """Fused path. Returns (this layer's MLP output, the residual stream before it); the
        next layer's norm adds them (as vLLM does), which rounds like `hidden + mlp(...)`.

        `keep_rows`: only these rows go on past attention to the MLP (in the last layer,
        whose outputs only the logits read; every row's keys and values are cached all the
        same)."""
        norm = self.input_layernorm
        normed, residual = kernels.rms_norm(hidden, norm.weight, norm.eps, residual)
        attn = self.self_attn.forward_fused(normed, positions, rope_cos, rope_sin, k_cache,
                                            v_cache, meta, kernels)
        if keep_rows is not None:
            attn, residual = attn[keep_rows], residual[keep_rows]
        norm = self.post_attention_layernorm
        normed, residual = kernels.rms_norm(attn, norm.weight, norm.eps, residual)
        return self.mlp.forward_fused(normed, kernels), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # The fused path's kernels module (see the module docstring), or None for plain
        # PyTorch ops. `load_model` picks it; tests may set `triton_kernels` on the CPU under
        # TRITON_INTERPRET=1.
        self.kernels = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Logits of each sequence's last token: [batch, vocab] in float32.

        `meta.logits_rows` None means every row (a CUDA-graph decode step)."""
        if self.kernels is not None:
            return self._forward_fused(input_ids, positions, kv_caches, meta)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        hidden = self.embed_tokens(input_ids)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, cos, sin, k_cache, v_cache, meta)
        last = self.norm(hidden[meta.logits_rows])
        return self.lm_head(last).float()

    def pack_for_cpu(self, gemm: CpuGemm | None, fallback: CpuGemm | None = None) -> None:
        """Pack every linear layer's weight for `gemm` (see `Linear`), or for `fallback`
        where `gemm` cannot take it. CPU fp32 only; a tied vocabulary projection packs a copy,
        as the embedding still reads the plain weight."""
        tied = self.config.tie_word_embeddings
        for module in self.modules():
            if isinstance(module, Linear):
                keep = tied and module is self.lm_head
                if not module.pack_for_cpu(gemm, keep_weight=keep):
                    module.pack_for_cpu(fallback, keep_weight=keep)

    @property
    def cpu_gemm(self) -> str | None:
        """The names of the CPU GEMMs the linear layers multiply through ("a; b" where they
        differ), or None (F.linear)."""
        names = sorted({m.gemm.name for m in self.modules()
                        if isinstance(m, Linear) and m.gemm is not None})
        return "; ".join(names) or None

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_positions, head_dim // 2] (float32) for the fused RoPE kernel,
        computed as the CPU path computes them per step."""
        cached = getattr(self, "_rope_cos", None)
        if cached is None or cached.device != self.inv_freq.device:
            positions = torch.arange(self.config.max_position_embeddings,
                                     device=self.inv_freq.device)
            freqs = positions.float()[:, None] * self.inv_freq[None, :]
            self._rope_cos, self._rope_sin = freqs.cos(), freqs.sin()
        return self._rope_cos, self._rope_sin

    @property
    def fused_kernels(self) -> bool:
        return self.kernels is not None

    def _forward_fused(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        kernels = self.kernels
        rope_cos, rope_sin = self.rope_tables()
        hidden = self.embed_tokens(input_ids)
        residual = None
        # The last layer's MLP runs on the logits rows only: in a prefill, a prompt's last
        # token (2.5% fewer FLOPs on SmolLM2). A decode step keeps every row.
        keep_rows = meta.logits_rows
        if keep_rows is not None and keep_rows.numel() == input_ids.numel():
            keep_rows = None
        last_layer = len(self.layers) - 1
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches,
                                                            strict=True)):
            hidden, residual = layer.forward_fused(
                hidden, residual, positions, rope_cos, rope_sin, k_cache, v_cache, meta,
                kernels, keep_rows=keep_rows if i == last_layer else None)
        last, _ = kernels.rms_norm(hidden, self.norm.weight, self.norm.eps, residual)
        return self.lm_head(last).float()

    def load_hf_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face Llama state dict, fusing q/k/v and gate/up."""
        own = self.state_dict()
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor) -> None:
            target = own[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{name}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}"
                )
            target.copy_(tensor)
            loaded.add(name)

        def get(name: str) -> torch.Tensor:
            for key in (name, f"model.{name}"):
                if key in state:
                    return state[key]
            raise KeyError(f"checkpoint has no tensor {name!r}")

        put("embed_tokens.weight", get("embed_tokens.weight"))
        put("norm.weight", get("norm.weight"))
        if not self.config.tie_word_embeddings:
            put("lm_head.weight", get("lm_head.weight"))
        for i in range(self.config.num_hidden_layers):
            p = f"layers.{i}"
            attn = [get(f"{p}.self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
            put(f"{p}.self_attn.qkv_proj.weight", torch.cat(attn, dim=0))
            put(f"{p}.self_attn.o_proj.weight", get(f"{p}.self_attn.o_proj.weight"))
            mlp = [get(f"{p}.mlp.{n}_proj.weight") for n in ("gate", "up")]
            put(f"{p}.mlp.gate_up_proj.weight", torch.cat(mlp, dim=0))
            put(f"{p}.mlp.down_proj.weight", get(f"{p}.mlp.down_proj.weight"))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                put(f"{p}.{norm}.weight", get(f"{p}.{norm}.weight"))
        tied = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        missing = set(own) - loaded - tied
        if missing:
            raise ValueError(f"weights missing from checkpoint: {sorted(missing)[:5]}")


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               native_cpu_kernels: bool = True, blockq_gemm: bool = False) -> LlamaForCausalLM:
    """The model, on `device` in `dtype`, with its fused kernels where the device has them:
    Triton on CUDA; the C++ CPU kernels in float32 when `native_cpu_kernels` and built, and
    with `blockq_gemm` the AMX GEMM for the weights that are exactly block-quantized, where
    the processor has AMX."""
    from safetensors.torch import load_file

    config = LlamaConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(config).to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    state: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(path), device=str(device)))
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    with torch.no_grad():
        model.load_hf_weights(state)
    model = model.to(dtype).eval()
    # The rotary frequencies stay in float32 whatever the weights' dtype (`to` casts buffers).
    model.inv_freq = rope_inv_freq(config).to(device)
    if device.type == "cuda":
        from python_backends.engine import triton_kernels

        model.kernels = triton_kernels
    elif device.type == "cpu" and dtype == torch.float32:
        if native_cpu_kernels and cpu_kernels.available():
            model.kernels = cpu_kernels
            model.pack_for_cpu(BLOCKQ_GEMM if blockq_gemm else None, fallback=NATIVE_GEMM)
        else:
            model.pack_for_cpu(ONEDNN_GEMM)
    return model
