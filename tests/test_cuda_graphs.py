"""CUDA graphs and the Triton (GPU) path of the engine.

On the CPU: the graph batch-size ladder and padding, that the CPU ignores enforce_eager,
and (where the triton package is installed) the Triton kernels and the whole fused forward
under TRITON_INTERPRET=1 against the PyTorch path. On a GPU: the kernels against PyTorch,
and greedy tokens with CUDA graphs == eager == the CPU path, with padded batches and mixed
prefill/decode steps. GPU tests are skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_helpers import make_tiny_llama, prompts

from python_backends.engine import EngineConfig, LLMEngine, SamplingParams
from python_backends.engine.model_runner import cuda_graph_batch_sizes, padded_batch_size

REPO_ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


# ----------------------------------------------------------------------------- CPU


def test_graph_batch_size_ladder():
    assert cuda_graph_batch_sizes(1) == [1]
    assert cuda_graph_batch_sizes(2) == [1, 2]
    assert cuda_graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert cuda_graph_batch_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert cuda_graph_batch_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(ValueError):
        cuda_graph_batch_sizes(0)


def test_padding_picks_the_next_captured_size():
    sizes = cuda_graph_batch_sizes(48)
    assert [padded_batch_size(n, sizes) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [
        1, 2, 4, 8, 16, 32, 48, 48]
    assert padded_batch_size(49, sizes) is None


def test_enforce_eager_defaults_off_and_cpu_ignores_it(tiny_model):
    assert EngineConfig().enforce_eager is False  # graphs on, where there is a GPU
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batch = prompts(3)
    outputs = []
    for eager in (False, True):
        engine = LLMEngine(EngineConfig(model_dir=tiny_model, device="cpu", dtype="float32",
                                        kv_cache_bytes=8 << 20, enforce_eager=eager))
        assert engine.runner.cuda_graph_sizes == []
        outputs.append(engine.generate(batch, params))
    assert outputs[0] == outputs[1]


_INTERPRETED = """
import torch
from python_backends.engine import EngineConfig, LLMEngine, SamplingParams
from python_backends.engine import triton_kernels as tk
from python_backends.engine.llama import RMSNorm, apply_rope

torch.manual_seed(0)
# paged decode attention against a dense reference (GQA 4:1, a padding row of length 0)
B, H, KV, D, page, nb = 4, 8, 2, 32, 4, 40
kc, vc, q = torch.randn(nb, page, KV, D), torch.randn(nb, page, KV, D), torch.randn(B, H, D)
lens = torch.tensor([1, 9, 0, 30], dtype=torch.int32)
bt = torch.stack([torch.randperm(nb)[:12] for _ in range(B)]).int()
out = tk.paged_decode_attention(q, kc, vc, bt, lens, D ** -0.5)
for b in range(B):
    n = int(lens[b])
    if n == 0:
        assert out[b].abs().max() == 0
        continue
    k = kc[bt[b].long()].reshape(-1, KV, D)[:n].repeat_interleave(H // KV, 1)
    v = vc[bt[b].long()].reshape(-1, KV, D)[:n].repeat_interleave(H // KV, 1)
    s = torch.einsum("hd,thd->ht", q[b], k) * D ** -0.5
    ref = torch.einsum("ht,thd->hd", s.softmax(-1), v)
    assert torch.allclose(out[b], ref, atol=1e-5), b
# prefill: chunks of 5, 16 and 3 new tokens after 0, 20 and 9 cached ones, in one launch
q_lens, cached = [5, 16, 3], [0, 20, 9]
ctx = [a + b for a, b in zip(q_lens, cached)]
starts = [0, 5, 21, 24]
qp = torch.randn(24, H, D)
outp = tk.paged_prefill_attention(
    qp, kc, vc, bt[:3], torch.tensor(ctx, dtype=torch.int32),
    torch.tensor(starts, dtype=torch.int32), max(q_lens), D ** -0.5)
for i in range(3):
    k = kc[bt[i].long()].reshape(-1, KV, D)[:ctx[i]].repeat_interleave(H // KV, 1)
    v = vc[bt[i].long()].reshape(-1, KV, D)[:ctx[i]].repeat_interleave(H // KV, 1)
    qi = qp[starts[i]:starts[i + 1]]
    s = torch.einsum("qhd,thd->hqt", qi, k) * D ** -0.5
    visible = torch.arange(ctx[i])[None, :] <= torch.arange(cached[i], ctx[i])[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    ref = torch.einsum("hqt,thd->qhd", s.softmax(-1), v)
    assert torch.allclose(outp[starts[i]:starts[i + 1]], ref, atol=1e-5), i
# rope + cache write
n = 5
qkv = torch.randn(n, (H + 2 * KV) * D)
pos, slots = torch.tensor([0, 3, 7, 50, 2]), torch.tensor([3, 20, -1, 50, 64])
inv = 1 / 10000 ** (torch.arange(0, D, 2).float() / D)
freqs = torch.arange(64).float()[:, None] * inv
cos, sin = freqs.cos(), freqs.sin()
k_cache, v_cache, orig = torch.zeros(nb, page, KV, D), torch.zeros(nb, page, KV, D), qkv.clone()
tk.rope_and_cache(qkv, pos, cos, sin, slots, k_cache, v_cache, H, KV, D)
kr = apply_rope(orig[:, H * D:(H + KV) * D].view(n, KV, D), cos[pos], sin[pos])
qr = apply_rope(orig[:, :H * D].view(n, H, D), cos[pos], sin[pos])
assert torch.equal(qkv[:, :H * D], qr.reshape(n, -1))
for i, slot in enumerate(slots.tolist()):
    if slot >= 0:
        assert torch.equal(k_cache.view(-1, KV, D)[slot], kr[i])
        assert torch.equal(v_cache.view(-1, KV, D)[slot], orig[i, (H + KV) * D:].view(KV, D))
assert k_cache.view(-1, KV, D).abs().sum(dim=(1, 2)).count_nonzero() == 4
# norms and the MLP activation
x, r = torch.randn(3, 96), torch.randn(3, 96)
norm = RMSNorm(96, 1e-5)
norm.weight.data.normal_()
with torch.no_grad():
    assert torch.allclose(tk.rms_norm(x, norm.weight, 1e-5)[0], norm(x), atol=1e-6)
    normed, res = tk.rms_norm(x, norm.weight, 1e-5, r)
    assert torch.equal(res, x + r) and torch.allclose(normed, norm(x + r), atol=1e-6)
g = torch.randn(3, 64)
ref = torch.nn.functional.silu(g[:, :32]) * g[:, 32:]
assert torch.allclose(tk.silu_and_mul(g), ref, atol=1e-6)
# the whole fused forward (what runs on CUDA) against the PyTorch path, mixed steps included
params = SamplingParams(max_tokens=10, ignore_eos=True)
cfg = EngineConfig(model_dir=MODEL, device="cpu", dtype="float32", kv_cache_bytes=8 << 20,
                   enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4,
                   native_cpu_kernels=False)
batch = PROMPTS + [PROMPTS[0][:2] * 12 + PROMPTS[1], PROMPTS[0][:2] * 12 + PROMPTS[2]]
reference = LLMEngine(cfg).generate(batch, params)
fused = LLMEngine(cfg)
fused.runner.model.kernels = tk
assert fused.generate(batch, params) == reference
assert fused.generate(batch[-2:], params) == reference[-2:]  # again: from the prefix cache
assert fused.block_manager.stats.hit_tokens > 0


# The CUDA-graph logic (static buffers, padding rows, the ladder) with a stand-in for the
# graph that re-runs the captured step on replay and writes its static output.
class FakeGraph:
    def __init__(self, step, out):
        self.step, self.out = step, out

    def pool(self):
        return None

    def replay(self):
        self.out.copy_(self.step())


def fake_capture(step, pool):
    out = step()
    return FakeGraph(step, out), out


graphs = LLMEngine(EngineConfig(model_dir=MODEL, device="cpu", dtype="float32",
                                kv_cache_bytes=8 << 20, max_num_seqs=6))
runner = graphs.runner
runner.model.kernels = tk
runner._capture_graph = fake_capture
runner._capture_cuda_graphs()
assert runner.cuda_graph_sizes == [1, 2, 4, 6]
replays = []
real_replay = runner._replay
runner._replay = lambda seqs, size: replays.append((len(seqs), size)) or real_replay(seqs, size)
assert graphs.generate(batch[:5], params) == reference[:5]
assert graphs.generate(batch[:3], params) == reference[:3]
assert [graphs.generate([p], params)[0] for p in batch[:2]] == reference[:2]
assert {(5, 6), (3, 4), (1, 1)} <= set(replays), replays
print("INTERPRETED-OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed (GPU image)")
@pytest.mark.skipif(HAS_CUDA, reason="covered on the GPU by the CUDA tests")
def test_triton_kernels_and_fused_forward_interpreted(tiny_model):
    """Runs the Triton path on CPU tensors through Triton's interpreter, in a subprocess:
    TRITON_INTERPRET must be set before triton is first imported."""
    script = f"MODEL = {tiny_model!r}\nPROMPTS = {prompts(5)!r}\n" + textwrap.dedent(_INTERPRETED)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "INTERPRETED-OK" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- GPU


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_pytorch_on_cuda(dtype):
    from python_backends.engine import triton_kernels as tk
    from python_backends.engine.llama import RMSNorm, apply_rope

    dev = "cuda"
    torch.manual_seed(0)
    B, H, KV, D, page, nb = 7, 9, 3, 64, 16, 64
    kc = torch.randn(nb, page, KV, D, device=dev).to(dtype)
    vc = torch.randn(nb, page, KV, D, device=dev).to(dtype)
    q = torch.randn(B, H, D, device=dev).to(dtype)
    lens = torch.tensor([1, 16, 17, 0, 100, 255, 3], dtype=torch.int32, device=dev)
    bt = torch.stack([torch.randperm(nb, device=dev)[:16] for _ in range(B)]).int()
    out = torch.full_like(q, float("nan"))
    tk.paged_decode_attention(q, kc, vc, bt, lens, D**-0.5, out=out)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            assert out[b].abs().max() == 0
            continue
        k = kc[bt[b].long()].reshape(-1, KV, D)[:n].double().repeat_interleave(H // KV, 1)
        v = vc[bt[b].long()].reshape(-1, KV, D)[:n].double().repeat_interleave(H // KV, 1)
        s = torch.einsum("hd,thd->ht", q[b].double(), k) * D**-0.5
        ref = torch.einsum("ht,thd->hd", s.softmax(-1), v)
        err = ((out[b].double() - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (b, err)

    # Prefill: chunks after 0, 40 and 100 cached tokens, in one launch.
    q_lens, cached = [70, 16, 5], [0, 40, 100]
    ctx = [a + b for a, b in zip(q_lens, cached, strict=True)]
    starts = [0, 70, 86, 91]
    qp = torch.randn(91, H, D, device=dev).to(dtype)
    outp = tk.paged_prefill_attention(
        qp, kc, vc, bt[:3], torch.tensor(ctx, dtype=torch.int32, device=dev),
        torch.tensor(starts, dtype=torch.int32, device=dev), max(q_lens), D**-0.5)
    for i in range(3):
        k = kc[bt[i].long()].reshape(-1, KV, D)[: ctx[i]].double().repeat_interleave(H // KV, 1)
        v = vc[bt[i].long()].reshape(-1, KV, D)[: ctx[i]].double().repeat_interleave(H // KV, 1)
        qi = qp[starts[i] : starts[i + 1]].double()
        s = torch.einsum("qhd,thd->hqt", qi, k) * D**-0.5
        visible = (torch.arange(ctx[i], device=dev)[None, :]
                   <= torch.arange(cached[i], ctx[i], device=dev)[:, None])
        ref = torch.einsum("hqt,thd->qhd", s.masked_fill(~visible, float("-inf")).softmax(-1), v)
        err = ((outp[starts[i] : starts[i + 1]].double() - ref).norm() / ref.norm()).item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-2), (i, err)

    n = 9
    qkv = torch.randn(n, (H + 2 * KV) * D, device=dev).to(dtype)
    pos = torch.randint(0, 500, (n,), device=dev)
    slots = torch.tensor([0, 5, -1, 17, 300, 31, 2, -1, 1000], device=dev)
    inv = 1.0 / 100000 ** (torch.arange(0, D, 2, device=dev).float() / D)
    freqs = torch.arange(512, device=dev).float()[:, None] * inv[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    k_cache, v_cache = torch.zeros_like(kc), torch.zeros_like(vc)
    orig = qkv.clone()
    tk.rope_and_cache(qkv, pos, cos, sin, slots, k_cache, v_cache, H, KV, D)
    qr = apply_rope(orig[:, : H * D].view(n, H, D), cos[pos], sin[pos])
    kr = apply_rope(orig[:, H * D : (H + KV) * D].view(n, KV, D), cos[pos], sin[pos])
    # Same rounding as the PyTorch ops up to fused multiply-adds (an ulp of float32).
    torch.testing.assert_close(qkv[:, : H * D], qr.reshape(n, -1))
    torch.testing.assert_close(qkv[:, H * D : (H + KV) * D], kr.reshape(n, -1))
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(k_cache.view(-1, KV, D)[slot], kr[i])
            assert torch.equal(v_cache.view(-1, KV, D)[slot], orig[i, (H + KV) * D :].view(KV, D))
    written = k_cache.view(-1, KV, D).abs().sum(dim=(1, 2)).count_nonzero().item()
    assert written == 7  # nothing for the slot -1 rows

    x = torch.randn(5, 576, device=dev).to(dtype)
    r = torch.randn(5, 576, device=dev).to(dtype)
    norm = RMSNorm(576, 1e-5).to(dev, dtype)
    with torch.no_grad():
        norm.weight.normal_()
        normed, res = tk.rms_norm(x, norm.weight, 1e-5, r)
        assert torch.equal(res, x + r)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(normed.float(), norm(x + r).float(), rtol=tol, atol=tol)
    g = torch.randn(4, 2 * 1536, device=dev).to(dtype)
    ref = torch.nn.functional.silu(g[:, :1536]) * g[:, 1536:]
    assert torch.allclose(tk.silu_and_mul(g).float(), ref.float(), rtol=1e-2, atol=1e-5)


@needs_cuda
def test_cuda_graphs_match_eager_and_cpu(tiny_model, monkeypatch):
    """Greedy tokens: CUDA graphs == GPU eager == the CPU path (float32), for batches that
    are padded (3 -> 4, 5 -> 8), with steps that mix prefill and decode."""
    from python_backends.engine.model_runner import ModelRunner

    params = SamplingParams(max_tokens=16, ignore_eos=True)
    batch = prompts(5)
    cpu = LLMEngine(EngineConfig(model_dir=tiny_model, device="cpu", dtype="float32",
                                 kv_cache_bytes=8 << 20))
    expected = cpu.generate(batch, params)
    replays = []
    real_replay = ModelRunner._replay
    monkeypatch.setattr(ModelRunner, "_replay",
                        lambda self, seqs, size: replays.append((len(seqs), size))
                        or real_replay(self, seqs, size))
    results = {}
    for eager in (True, False):
        engine = LLMEngine(EngineConfig(model_dir=tiny_model, device="cuda", dtype="float32",
                                        max_num_seqs=8, enforce_eager=eager,
                                        gpu_memory_utilization=0.05))
        assert engine.runner.cuda_graph_sizes == ([] if eager else [1, 2, 4, 8])
        results[eager] = (engine.generate(batch, params),
                          [engine.generate([p], params)[0] for p in batch[:2]],
                          engine.generate(batch[:3], params))
        # Staggered arrivals: steps that mix prefill and decode run eagerly.
        seqs = []
        for i, prompt in enumerate(batch):
            seqs.append(engine.add_request(f"r{i}", prompt, params))
            engine.step()
        while engine.has_unfinished():
            engine.step()
        assert [s.output_token_ids for s in seqs] == expected
        del engine
        torch.cuda.empty_cache()
    assert results[True] == results[False]
    assert results[False][0] == expected
    assert results[False][1] == expected[:2] and results[False][2] == expected[:3]
    assert (5, 8) in replays and (3, 4) in replays and (1, 1) in replays
