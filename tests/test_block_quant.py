"""Exactly block-quantized weights (engine/block_quant.py) and the AMX GEMM that multiplies
them (native/blockq_gemm.h): the form is found bit for bit or not at all, the tiles have the
kernel's layout, and the products are as accurate as float32's. The kernel's tests run where
the processor has AMX; elsewhere they are skipped and the engine keeps its float32 GEMM."""

import pytest
import torch
from safetensors.torch import load_file

from python_backends.engine import block_quant, cpu_kernels
from python_backends.engine.config import EngineConfig
from python_backends.engine.engine import LLMEngine
from python_backends.engine.llama import BLOCKQ_GEMM, NATIVE_GEMM, load_model
from python_backends.engine.sampling import SamplingParams

needs_amx = pytest.mark.skipif(BLOCKQ_GEMM is None,
                               reason="no AMX here (or the C++ kernels are not built)")


def _quantized(kind: str, n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    """A weight as a GGUF loader makes it: float32 of fl(d * q + m) per 32-wide block."""
    generator = torch.Generator().manual_seed(seed)
    blocks = k // block_quant.BLOCK
    d = (torch.rand(n, blocks, 1, generator=generator) * 0.01 + 1e-4).half().float()
    if kind == "q4_1":
        q = torch.randint(0, 16, (n, blocks, block_quant.BLOCK), generator=generator).float()
        q[..., 0], q[..., 1] = 0, 15  # the quantizer's minimum and maximum
        m = (torch.rand(n, blocks, 1, generator=generator) * -0.05).half().float()
    else:
        q = torch.randint(-127, 128, (n, blocks, block_quant.BLOCK), generator=generator).float()
        q[..., 0] = 127
        m = torch.zeros(n, blocks, 1)
    return (d * q + m).reshape(n, k)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_the_block_form_is_found_and_reproduces_the_weight_bit_for_bit(kind):
    weight = _quantized(kind)
    form = block_quant.find_blocks(weight)
    assert form is not None
    d = form.d.repeat_interleave(block_quant.BLOCK, dim=1)
    m = form.m.repeat_interleave(block_quant.BLOCK, dim=1)
    assert torch.equal(d * form.q + m, weight)
    assert torch.equal(form.q, form.q.round()) and form.q.abs().max() <= 127


def test_rows_are_searched_in_chunks_with_the_same_result():
    weight = _quantized("q4_1", n=96)
    whole, chunked = block_quant.find_blocks(weight), block_quant.find_blocks(weight, 32)
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked, strict=True))
    weight[80, 5] = torch.nextafter(weight[80, 5], torch.tensor(1.0))  # in the last chunk
    assert block_quant.find_blocks(weight, 32) is None


def test_the_checkpoints_weights_are_block_quantized(model_dir):
    state = load_file(f"{model_dir}/model.safetensors")
    assert block_quant.find_blocks(state["model.layers.0.mlp.down_proj.weight"]) is not None
    assert block_quant.find_blocks(state["model.layers.0.self_attn.k_proj.weight"]) is not None


@pytest.mark.parametrize("case", ["random", "one value off", "n not a multiple of 16",
                                  "k not a multiple of 32", "float64"])
def test_weights_without_the_form_are_not_taken(case):
    weight = _quantized("q4_1")
    if case == "random":
        weight = torch.randn(48, 96)
    elif case == "one value off":
        weight[3, 40] = torch.nextafter(weight[3, 40], torch.tensor(1.0))
    elif case == "n not a multiple of 16":
        weight = weight[:40]
    elif case == "k not a multiple of 32":
        weight = weight[:, :80]
    else:
        weight = weight.double()
    assert block_quant.find_blocks(weight) is None


def test_tiles_are_the_vnni_layout_of_q_and_scales_hold_d_then_m():
    weight = _quantized("q4_1", n=32, k=64)
    form = block_quant.find_blocks(weight)
    tiles, scales = block_quant.pack(form)
    assert tiles.shape == (2, 2, 512) and tiles.dtype == torch.bfloat16
    assert scales.shape == (2, 2, 32)
    for tile, block, row, column, pair in [(0, 0, 0, 0, 0), (1, 1, 15, 15, 1), (1, 0, 7, 3, 1)]:
        n, k = tile * 16 + column, block * 32 + 2 * row + pair
        assert tiles[tile, block, row * 32 + column * 2 + pair].item() == form.q[n, k].item()
    assert scales[1, 0, 5].item() == form.d[21, 0].item()
    assert scales[1, 0, 16 + 5].item() == form.m[21, 0].item()


@needs_amx
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 16, 40, 300])
def test_the_amx_product_is_as_accurate_as_float32(kind, rows):
    weight = _quantized(kind, n=64, k=192)
    tiles, scales = block_quant.pack(block_quant.find_blocks(weight))
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    exact = x.double() @ weight.double().T
    got = cpu_kernels.blockq_linear(x, tiles, scales)
    float32 = x @ weight.T
    assert got.shape == (rows, 64)
    error = (got.double() - exact).abs().max().item()
    # Three bfloat16 parts hold x to 2^-27: the error is float32's rounding, not bfloat16's.
    assert error <= 4 * max((float32.double() - exact).abs().max().item(), 1e-7)


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
def test_the_amx_product_is_the_same_at_any_thread_count(threads):
    """Column pairs go to whichever thread asks first (parallel.h); each pair's result is one
    thread's alone, so the bits do not depend on the split."""
    tiles, scales = block_quant.pack(block_quant.find_blocks(_quantized("q4_1", n=400, k=192)))
    x = torch.randn(40, 192, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        expected = cpu_kernels.blockq_linear(x, tiles, scales)
        torch.set_num_threads(threads)
        got = cpu_kernels.blockq_linear(x, tiles, scales)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, expected)


@needs_amx
def test_the_amx_product_rejects_what_pack_did_not_make():
    tiles, scales = block_quant.pack(block_quant.find_blocks(_quantized("q4_1")))
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels.blockq_linear(torch.randn(4, 64), tiles, scales)
    with pytest.raises(RuntimeError, match="tiles must"):
        cpu_kernels.blockq_linear(torch.randn(4, 96), tiles.float(), scales)


@pytest.mark.skipif(NATIVE_GEMM is None, reason="C++ kernels not built")
def test_the_model_uses_the_amx_gemm_only_where_asked_and_available(model_dir):
    model = load_model(model_dir, torch.float32, torch.device("cpu"), blockq_gemm=True)
    if BLOCKQ_GEMM is None:
        assert model.cpu_gemm == "cpu_kernels"  # no AMX: the float32 GEMM, nothing else
    else:
        assert model.cpu_gemm == BLOCKQ_GEMM.name  # every layer of SmolLM2 has the form
    assert load_model(model_dir, torch.float32, torch.device("cpu")).cpu_gemm == "cpu_kernels"


@needs_amx
def test_greedy_tokens_are_the_float32_gemms(model_dir):
    """Real weights; requests of different lengths, so the decode batch shrinks from 20 rows
    to 1 and every row count is multiplied: the same greedy tokens."""
    outputs = {}
    for blockq in (False, True):
        engine = LLMEngine(EngineConfig(model_dir=model_dir, blockq_gemm=blockq))
        generator = torch.Generator().manual_seed(3)
        for i in range(20):
            prompt = torch.randint(100, 40000, (8 + i,), generator=generator).tolist()
            engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4 + i, ignore_eos=True))
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        outputs[blockq] = tokens
    assert [len(tokens) for tokens in outputs[True].values()] == [4 + i for i in range(20)]
    assert outputs[True] == outputs[False]
