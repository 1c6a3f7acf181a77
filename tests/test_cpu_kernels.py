"""The engine's C++ CPU kernels (`cpu_kernels`) against the PyTorch reference ops, and the
fused CPU forward against the plain one.

`make setup` builds the extension wherever a compiler can be had; these tests fail (rather
than skip) when it is missing on a machine with g++, so a broken build cannot go unnoticed.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import make_tiny_llama, prompts

from python_backends.engine import EngineConfig, LLMEngine, SamplingParams, cpu_kernels
from python_backends.engine.llama import RMSNorm, apply_rope

built = pytest.mark.skipif(
    not cpu_kernels.available() and shutil.which("g++") is None,
    reason="no C++ compiler here: the engine runs its plain PyTorch path",
)


def test_setup_built_the_kernels_where_a_compiler_exists():
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler here")
    assert cpu_kernels.available(), cpu_kernels.IMPORT_ERROR


def rope_tables(head_dim: int, positions: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def reference_decode(q, k_cache, v_cache, tables, lens, scale):
    out = torch.zeros_like(q)
    block_size = k_cache.shape[1]
    for b, length in enumerate(lens.tolist()):
        if length == 0:
            continue
        blocks = tables[b, : -(-length // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)
        values = v_cache[blocks].flatten(0, 1)[:length].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b][:, None], keys, values, scale=scale,
                                                enable_gqa=True)[:, 0]
    return out


@built
@pytest.mark.parametrize("head_dim", [64, 128, 24])  # 64/128: unrolled; 24: the generic loop
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
# Query heads per kv head: with AVX-512, 1-4 and 6 (at head size 64) have kernels of their
# own; 5 takes the generic one.
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6])
def test_paged_decode_attention_matches_sdpa(head_dim, index_dtype, group):
    torch.manual_seed(0)
    kv_heads, batch, block_size, num_blocks = 3, 6, 16, 64
    heads = group * kv_heads
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim)
    q = torch.randn(batch, heads, head_dim)
    lens = torch.tensor([1, 16, 17, 0, 100, 255], dtype=index_dtype)
    tables = torch.stack([torch.randperm(num_blocks)[:16] for _ in range(batch)]).to(index_dtype)
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
    expected = reference_decode(q, k_cache, v_cache, tables, lens, 0.3)
    assert torch.allclose(out, expected, atol=1e-5)
    assert out[3].abs().max() == 0  # context length 0: a padding row writes zeros
    into = torch.empty_like(q)
    assert cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3,
                                              out=into) is into


@built
def test_paged_decode_attention_rejects_what_it_cannot_read():
    q = torch.randn(2, 4, 8)
    cache = torch.randn(4, 4, 2, 8)
    tables = torch.zeros(2, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.paged_decode_attention(q.double(), cache, cache, tables,
                                           torch.tensor([1, 1], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="longer than its block table"):
        cpu_kernels.paged_decode_attention(q, cache, cache, tables,
                                           torch.tensor([1, 5], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="block id out of range"):
        cpu_kernels.paged_decode_attention(q, cache, cache, tables + 9,
                                           torch.tensor([1, 1], dtype=torch.int32), 1.0)


@built
def test_rope_and_cache_rounds_like_apply_rope():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, tokens = 9, 3, 64, 20
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    positions = torch.randint(0, 300, (tokens,))
    cos, sin = rope_tables(head_dim)
    k_cache = torch.zeros(10, 16, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(160)[:tokens]
    slots[3] = -1  # a padding row: rotated, but not written
    q, k, v = qkv.clone().split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), -1)
    q_ref = apply_rope(q.reshape(tokens, heads, head_dim), cos[positions], sin[positions])
    k_ref = apply_rope(k.reshape(tokens, kv_heads, head_dim), cos[positions], sin[positions])
    cpu_kernels.rope_and_cache(qkv, positions, cos, sin, slots, k_cache, v_cache, heads,
                               kv_heads, head_dim)
    assert torch.equal(qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim), q_ref)
    written = slots >= 0
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[slots[written]], k_ref[written])
    assert torch.equal(flat_v[slots[written]], v.reshape(tokens, kv_heads, head_dim)[written])
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == tokens - 1
    with pytest.raises(RuntimeError, match="position out of the RoPE table"):
        cpu_kernels.rope_and_cache(qkv, positions + 300, cos, sin, slots, k_cache, v_cache,
                                   heads, kv_heads, head_dim)


@built
def test_rms_norm_and_silu_and_mul_match_pytorch():
    torch.manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data.normal_()
    x, residual = torch.randn(40, 576), torch.randn(40, 576)
    with torch.no_grad():
        normed, stream = cpu_kernels.rms_norm(x, norm.weight, 1e-5, residual)
        assert torch.equal(stream, x + residual)
        assert torch.allclose(normed, norm(x + residual), atol=1e-5)
        normed, stream = cpu_kernels.rms_norm(x, norm.weight, 1e-5)
        assert stream is x or stream.data_ptr() == x.data_ptr()
        assert torch.allclose(normed, norm(x), atol=1e-5)
    gate_up = torch.randn(33, 2 * 1536) * 4
    expected = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.allclose(cpu_kernels.silu_and_mul(gate_up), expected, atol=1e-5, rtol=1e-6)
    huge = torch.tensor([[-200.0, 0.0, 200.0, 1.0, 1.0, 1.0]])  # exp's overflow and underflow
    assert torch.equal(cpu_kernels.silu_and_mul(huge), F.silu(huge[:, :3]) * huge[:, 3:])


@built
def test_prefill_attention_batches_chunks_like_per_chunk_sdpa():
    """Chunks of several shapes in one step, one of them after a cached prefix."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, block_size = 4, 2, 16, 4
    k_cache = torch.randn(32, block_size, kv_heads, head_dim)
    v_cache = torch.randn(32, block_size, kv_heads, head_dim)
    chunks = [(5, 5), (5, 5), (3, 11), (7, 7)]  # (chunk length, context length after it)
    starts = [0]
    for q_len, _ in chunks:
        starts.append(starts[-1] + q_len)
    q = torch.randn(starts[-1], heads, head_dim)
    tables = torch.stack([torch.randperm(32)[:4] for _ in chunks]).int()
    out = cpu_kernels.paged_prefill_attention(
        q, k_cache, v_cache, tables, torch.tensor([c for _, c in chunks], dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32), 7, 0.25)
    for i, (q_len, ctx) in enumerate(chunks):
        blocks = tables[i].long()
        keys = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        values = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        rows = torch.arange(ctx - q_len, ctx)[:, None]
        mask = torch.arange(ctx)[None, :] <= rows
        expected = F.scaled_dot_product_attention(
            q[starts[i]:starts[i + 1]].transpose(0, 1), keys, values, attn_mask=mask,
            scale=0.25, enable_gqa=True).transpose(0, 1)
        assert torch.allclose(out[starts[i]:starts[i + 1]], expected, atol=1e-5), i


@built
# Row tiles of 4 (AVX2) or 8 (AVX-512) rows, and each remainder.
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 7, 8, 9, 15, 32, 130])
@pytest.mark.parametrize("out_features,in_features", [(50, 7), (960, 576), (100, 1300)])
def test_linear_matches_matmul(rows, out_features, in_features):
    """Column counts off the panels (24 or 48 wide), depths split into blocks (1,300 > 640),
    and more rows than a 128-row block."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    x = torch.randn(rows, in_features)
    packed = cpu_kernels.pack_linear_weight(weight)
    width = cpu_kernels.panel_width()
    assert width in (24, 48)
    assert cpu_kernels.gemm_tile() in ("8x48 AVX-512", "4x24 AVX2", "4x24 scalar")
    assert cpu_kernels.gemm_tile().split()[0].endswith(f"x{width}")
    assert packed.shape == (-(-out_features // width), in_features, width)
    got = cpu_kernels.linear(x, packed, out_features)
    torch.testing.assert_close(got, x @ weight.T, rtol=1e-4, atol=1e-4)
    # A non-contiguous input computes the same.
    wide = torch.randn(rows, in_features * 2)[:, ::2].copy_(x)
    torch.testing.assert_close(cpu_kernels.linear(wide, packed, out_features), got)


@built
@pytest.mark.parametrize("threads", [1, 3, 5])
def test_work_dealt_out_in_chunks_gives_the_same_bits_at_any_thread_count(threads):
    """The GEMMs and decode attention deal their items out from a shared counter (parallel.h),
    so which thread computes an item varies from run to run: an item's result must not."""
    torch.manual_seed(0)
    weight, x = torch.randn(960, 576), torch.randn(32, 576)
    packed = cpu_kernels.pack_linear_weight(weight)
    k_cache, v_cache = torch.randn(64, 16, 3, 64), torch.randn(64, 16, 3, 64)
    q = torch.randn(9, 9, 64)
    lens = torch.tensor([1, 300, 17, 0, 100, 255, 2, 40, 160], dtype=torch.int32)
    tables = torch.stack([torch.randperm(64)[:20] for _ in range(9)]).to(torch.int32)

    def compute():
        return (cpu_kernels.linear(x, packed, 960),
                cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = compute()
        torch.set_num_threads(threads)
        got = compute()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@built
def test_argmax_rows_is_torch_argmax():
    """Greedy sampling's pick: the first of equal maxima, a NaN before any number, rows of
    any length (vector body and tail) and rows with a stride."""
    torch.manual_seed(0)
    cases = [torch.randn(rows, n) for rows, n in ((32, 49152), (1, 7), (5, 16), (3, 17),
                                                   (4, 100), (2, 1))]
    ties = torch.zeros(4, 100)
    ties[0, 5] = ties[0, 50] = 1.0  # the same lane's later equal
    ties[1, 99] = ties[1, 3] = 2.0  # another lane's earlier equal
    ties[2] = float("-inf")  # everything masked: index 0, as torch
    ties[3, 17] = ties[3, 33] = 3.0  # equals in two lanes
    nan = torch.randn(3, 64)
    nan[0, 40] = nan[0, 60] = float("nan")
    nan[1, 3] = float("nan")
    nan[2, 63] = float("nan")  # in the last vector
    cases += [ties, nan, torch.randn(6, 300)[:, 10:210]]
    for x in cases:
        assert torch.equal(cpu_kernels.argmax_rows(x), x.argmax(dim=-1)), x.shape
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.argmax_rows(torch.randn(10))
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.argmax_rows(torch.randn(4, 0))


@built
def test_linear_rejects_what_it_cannot_multiply():
    packed = cpu_kernels.pack_linear_weight(torch.randn(50, 8))
    with pytest.raises(RuntimeError, match=r"x must be \[rows, 8\]"):
        cpu_kernels.linear(torch.randn(3, 9), packed, 50)
    wrong = 50 + cpu_kernels.panel_width()
    with pytest.raises(RuntimeError, match=f"out_features {wrong} does not match"):
        cpu_kernels.linear(torch.randn(3, 8), packed, wrong)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.linear(torch.randn(3, 8, dtype=torch.float64), packed, 50)
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        cpu_kernels.linear(torch.randn(3, 8), torch.randn(8, 50), 50)
    with pytest.raises(RuntimeError, match="out_features, in_features"):
        cpu_kernels.pack_linear_weight(torch.randn(50))


@built
@pytest.mark.parametrize("heads", [8, 2])  # head_dim 16 (generic loop) and 64 (unrolled)
def test_fused_cpu_engine_matches_the_plain_path(tmp_path, heads):
    """Greedy tokens with the C++ kernels == the plain PyTorch path: mixed prefill/decode
    steps, chunked prefill and prefix-cache hits included."""
    model = make_tiny_llama(tmp_path, num_attention_heads=heads)
    batch = prompts(5) + [prompts(1)[0][:2] * 12 + p for p in prompts(2, seed=3)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outputs = []
    for native in (False, True):
        engine = LLMEngine(EngineConfig(
            model_dir=model, device="cpu", dtype="float32", kv_cache_bytes=8 << 20,
            enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
            native_cpu_kernels=native))
        assert (engine.runner.model.kernels is cpu_kernels) == native
        assert engine.runner.kernels_description() == (
            f"fused kernels: cpu_kernels, GEMMs: cpu_kernels ({cpu_kernels.gemm_tile()} tile)"
            if native else "plain PyTorch ops, GEMMs: oneDNN")
        outputs.append(engine.generate(batch, params))
        outputs.append(engine.generate(batch[-2:], params))  # again: from the prefix cache
        assert engine.block_manager.stats.hit_tokens > 0
    assert outputs[2:] == outputs[:2]


@built
def test_kernels_let_other_python_threads_run():
    """The kernels release the GIL, as PyTorch's ops do: served, the engine loop's thread is
    in them most of the time, and the stub's other threads must not wait for it."""
    import threading
    import time

    weight = cpu_kernels.pack_linear_weight(torch.randn(4096, 4096))
    x = torch.randn(512, 4096)  # ~17 GFLOP: a tenth of a second or more here
    took = []

    def multiply():
        begin = time.perf_counter()
        cpu_kernels.linear(x, weight, 4096)
        took.append(time.perf_counter() - begin)

    worker = threading.Thread(target=multiply)
    longest_wait, last = 0.0, time.perf_counter()
    worker.start()
    while worker.is_alive():  # Python bytecode: runs only while this thread holds the GIL
        now = time.perf_counter()
        longest_wait, last = max(longest_wait, now - last), now
    longest_wait = max(longest_wait, time.perf_counter() - last)
    worker.join()
    # Holding the GIL, the call would stop this loop for its whole length.
    assert longest_wait < took[0] / 2, (longest_wait, took[0])


def _has_avx512() -> bool:
    try:
        return " avx512f" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@built
@pytest.mark.skipif(not _has_avx512(),
                    reason="no AVX-512 here: the native build is the AVX2 one, tested above")
def test_the_avx2_build_computes_the_same(tmp_path):
    """On an AVX-512 machine the native build takes its AVX-512 paths (the 8 x 48 GEMM tile,
    the fixed-group decode attention). An AVX2-only machine builds the others: build the
    kernels once more without AVX-512 and check those too."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run(["bash", "scripts/build_native.sh", "cpu-kernels-variant", str(tmp_path),
                    "_cpu_kernels_avx2", "-mno-avx512f"],
                   cwd=root, env={**os.environ, "PY": sys.executable},
                   check=True, timeout=600)
    spec = importlib.util.spec_from_file_location(
        "_cpu_kernels_avx2", next(tmp_path.glob("_cpu_kernels_avx2*.so")))
    avx2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(avx2)
    assert avx2.gemm_tile() == "4x24 AVX2" and avx2.panel_width() == 24
    torch.manual_seed(0)
    for rows, out_features, in_features in [(1, 50, 7), (5, 960, 576), (130, 100, 1300)]:
        weight, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
        got = avx2.linear(x, avx2.pack_linear_weight(weight), out_features)
        torch.testing.assert_close(got, x @ weight.T, rtol=1e-4, atol=1e-4)
    k_cache, v_cache = torch.randn(2, 64, 16, 3, 64).unbind(0)
    q = torch.randn(4, 9, 64)
    lens = torch.tensor([1, 17, 0, 200], dtype=torch.int32)
    tables = torch.stack([torch.randperm(64)[:16] for _ in range(4)]).to(torch.int32)
    out = avx2.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.3)
    assert torch.allclose(out, reference_decode(q, k_cache, v_cache, tables, lens, 0.3),
                          atol=1e-5)
    x = torch.randn(33, 2 * 100)
    torch.testing.assert_close(avx2.silu_and_mul(x), cpu_kernels.silu_and_mul(x))
    logits = torch.randn(5, 1000)
    logits[1, 7] = float("nan")
    assert torch.equal(avx2.argmax_rows(logits), logits.argmax(dim=-1))
