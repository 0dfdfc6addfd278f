"""rgt.ops.epilogue: oneDNN's fused linear (bias, GELU, residual add) for CPU inference, against float64 and the
plain ops; when the model takes it, and that everything else (training, reference, export) does not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _utils import SMALL96, TINY, gen

from rgt import RGT
from rgt.ops import epilogue

pytestmark = pytest.mark.skipif(not epilogue.available(), reason="this torch has no oneDNN fused linear")

# max |error| / max |exact| against float64; measured on a Xeon (AVX-512), 20 seeds x 4 shapes: plain and
# fused both 4.9e-7 (bias), 5.1e-7 (GELU), 2.0e-7 (add). The bound is about 4x.
LINEAR_REL = 2e-6
# whole model, the same measure: fused 1.0e-6 / 1.6e-6 (tiny / small96), plain fp32 reference 1.0e-6 / 1.9e-6
# (AVX-512); with the AVX2 kernels an AMD EPYC runs, fused 1.1e-6 / 1.5e-6, plain 1.4e-6 / 1.6e-6.
MODEL_REL = 4e-6


def rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("kind", ["bias", "gelu", "add"])
@pytest.mark.parametrize("shape", [(2, 64, 36, 72), (1, 300, 180, 540), (3, 17, 180, 90)])
def test_fused_linear_matches_float64(kind, shape):
    B, L, n_in, n_out = shape
    g = gen(f"epilogue-{kind}-{shape}")
    layer = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=g) * n_in**-0.5)
        layer.bias.copy_(torch.randn(n_out, generator=g))
    x = torch.randn(B, L, n_in, generator=g)
    add = torch.randn(B, L, n_out, generator=g) * 3 if kind == "add" else None
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    exact = F.gelu(exact) if kind == "gelu" else exact
    exact = exact + add.double() if kind == "add" else exact
    with torch.no_grad():
        fused = epilogue.linear(x, layer, True, gelu=kind == "gelu", add=add)
        plain = epilogue.linear(x, layer, False, gelu=kind == "gelu", add=add)
    assert fused.shape == plain.shape == exact.shape
    assert rel(fused, exact) <= LINEAR_REL and rel(plain, exact) <= LINEAR_REL


def test_one_epilogue_at_a_time():
    with pytest.raises(ValueError, match="gelu or add"):
        epilogue.linear_weights(torch.ones(2, 3), torch.ones(4, 3), None, gelu=True, add=torch.ones(2, 4))


def test_applies_to_cpu_fp32_inference_only():
    m = torch.nn.Linear(3, 3).eval()
    x = torch.ones(2, 3)
    with torch.no_grad():
        assert epilogue.applies(x, m)
        assert not epilogue.applies(x.double(), m)
        m.kernels = "reference"
        assert not epilogue.applies(x, m)
        m.kernels = "portable"
        assert not epilogue.applies(x, m.train())
        m.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not epilogue.applies(x, m)
    assert not epilogue.applies(x, m)  # autograd on


def count_fused(monkeypatch) -> list:
    calls = []
    real = epilogue.linear_weights
    monkeypatch.setattr(epilogue, "linear_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("config", [TINY, SMALL96], ids=["tiny", "small96"])
def test_model_inference_takes_it_and_matches_float64(config, monkeypatch):
    """Eval, no grad, fp32 on a CPU: every block's five linears are fused (qkv or q, proj, fc1 as two halves,
    fc2), and the output is as close to the float64 model as the plain fp32 reference."""
    torch.manual_seed(0)
    ref = RGT(**config, kernels="reference").double().eval()
    with torch.no_grad():  # weights away from the init, so that every block contributes
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.rand(2, 3, 20, 24, generator=gen(f"epilogue-model-{config['embed_dim']}"), dtype=torch.float64)
    ref32, port = copy.deepcopy(ref).float(), copy.deepcopy(ref).float()
    port.set_kernels("portable")
    calls = count_fused(monkeypatch)
    with torch.inference_mode():
        exact, plain = ref(x), ref32(x.float())
        assert not calls  # the reference kernels keep the plain ops
        out = port(x.float())
    assert len(calls) == 5 * sum(config["depth"])
    assert rel(out, exact) <= MODEL_REL and rel(plain, exact) <= MODEL_REL


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # deprecated, still what TorchScript export runs
def test_training_and_export_see_the_plain_ops(monkeypatch):
    model = RGT(**TINY, kernels="portable")
    calls = count_fused(monkeypatch)
    x = torch.rand(1, 3, 20, 24)
    model.train()(x).sum().backward()
    with torch.no_grad():
        model.eval()(x)  # eval without grad: fused
        n = len(calls)
        assert n > 0
        torch.jit.trace(model, x, check_trace=False)
    assert len(calls) == n
