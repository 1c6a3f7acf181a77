"""The CPU path's packed linear layers (oneDNN, and the C++ kernels' GEMM where built): same
results as F.linear, plain weights freed."""

import pytest
import torch
import torch.nn.functional as F

from python_backends.engine import cpu_kernels
from python_backends.engine.llama import NATIVE_GEMM, ONEDNN_GEMM, Linear, load_model

needs_onednn = pytest.mark.skipif(ONEDNN_GEMM is None, reason="PyTorch built without oneDNN")
GEMMS = [pytest.param(ONEDNN_GEMM, marks=needs_onednn, id="oneDNN"),
         pytest.param(NATIVE_GEMM, id="cpu_kernels", marks=pytest.mark.skipif(
             NATIVE_GEMM is None, reason="C++ kernels not built"))]


def _layer(in_features: int, out_features: int, bias: bool = False) -> Linear:
    torch.manual_seed(0)
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_packed_linear_matches_f_linear_and_frees_the_plain_weight(rows, gemm):
    layer = _layer(96, 160)
    weight = layer.weight.detach().clone()
    x = torch.randn(rows, 96)
    assert layer.pack_for_cpu(gemm)
    assert layer.weight.is_meta and layer.weight.shape == (160, 96)
    with torch.inference_mode():
        got = layer(x)
        batched = layer(x.view(1, rows, 96))
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert batched.shape == (1, rows, 160)
    torch.testing.assert_close(batched[0], got)


@needs_onednn
def test_keep_weight_leaves_the_plain_weight_readable():
    layer = _layer(32, 48)
    weight = layer.weight.detach().clone()
    assert layer.pack_for_cpu(ONEDNN_GEMM, keep_weight=True)
    torch.testing.assert_close(layer.weight.detach(), weight)


@pytest.mark.parametrize("case", ["bias", "bfloat16", "no GEMM"])
def test_layers_a_gemm_cannot_take_stay_plain(case):
    layer = _layer(32, 48, bias=case == "bias")
    if case == "bfloat16":
        layer = layer.to(torch.bfloat16)
    x = torch.randn(3, 32, dtype=layer.weight.dtype)
    expected = F.linear(x, layer.weight, layer.bias)
    assert not layer.pack_for_cpu(None if case == "no GEMM" else ONEDNN_GEMM or NATIVE_GEMM)
    assert layer.packed_weight is None and not layer.weight.is_meta
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)


@needs_onednn
@pytest.mark.parametrize("native", [True, False])
def test_cpu_model_packs_every_linear_and_keeps_the_tied_embedding(model_dir, native):
    model = load_model(model_dir, torch.float32, torch.device("cpu"), native_cpu_kernels=native)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed_weight is not None for m in linears)
    # The fused path multiplies through the C++ GEMM; the plain path (the reference) oneDNN.
    assert model.cpu_gemm == ("cpu_kernels" if native and cpu_kernels.available() else "oneDNN")
    assert model.config.tie_word_embeddings
    # The embedding still reads real values; the vocabulary projection packed its own copy.
    assert not model.embed_tokens.weight.is_meta
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.layers[0].mlp.down_proj.weight.is_meta
