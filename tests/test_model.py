"""Model behaviour beyond the golden numbers: recursion depth, input validation, layouts, precision, caching,
kernel switching and gradient checkpointing."""

import copy

import pytest
import torch
from _utils import TINY, deterministic_fill, gen, spec_input

import rgt.arch.rgsa as rgsa_module
from rgt import RGT
from rgt.arch.rgsa import recursion_depth
from rgt.ops import reference


@pytest.fixture(scope="module")
def tiny64():
    model = RGT(**TINY, kernels="reference").double().eval()
    deterministic_fill(model)
    return model


# side: (train T, eval T), measured with the official code (spec section 4).
RECURSION = {16: (1, 2), 64: (2, 2), 128: (2, 2), 255: (2, 2), 256: (3, 2), 1024: (4, 3), 15: (0, None)}


@pytest.mark.parametrize("side", sorted(RECURSION))
def test_recursion_depth_table(side):
    train, eval_ = RECURSION[side]
    assert recursion_depth(side, side, training=True) == train
    if eval_ is None:
        with pytest.raises(ValueError, match="16"):
            recursion_depth(side, side, training=False)
    else:
        assert recursion_depth(side, side, training=False) == eval_


@pytest.mark.parametrize("H,W,training", [(16, 1024, False), (63, 1024, False), (16, 1100, False), (15, 64, True),
                                          (16, 256, True), (63, 256, True), (3, 64, True)])
def test_recursion_depth_rejects_what_the_official_code_crashes_on(H, W, training):
    with pytest.raises(ValueError, match=r"too elongated|>= 4 px"):
        recursion_depth(H, W, training)


@pytest.mark.parametrize("H,W", [(64, 1024), (64, 1040)])
def test_recursion_depth_accepts_long_images_that_work_officially(H, W):
    assert recursion_depth(H, W, training=False) == 3


def test_model_uses_train_and_eval_recursion(monkeypatch):
    seen = []

    def spy(x, w, b, times, kernels=None):
        seen.append(times)
        return reference.recursive_dwconv(x, w, b, times)

    monkeypatch.setattr(rgsa_module, "recursive_dwconv", spy)
    model = RGT(**TINY, drop_path_rate=0.0, kernels="reference")
    with torch.no_grad():
        for training, side, expected in [(True, 64, 2), (False, 64, 2), (True, 16, 1), (False, 16, 2), (True, 32, 1)]:
            seen.clear()
            model.train(training)(torch.rand(1, 3, side, side))
            assert seen == [expected, expected]  # one RG-SA block per group


@pytest.mark.parametrize("x,exc,match", [
    (torch.rand(1, 3, 15, 40), ValueError, "at least 16x16"),
    (torch.rand(1, 3, 16, 1100), ValueError, "too elongated"),
    (torch.rand(1, 1, 32, 32), ValueError, "3 input channels"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
    (torch.rand(3, 32, 32), ValueError, "4-D"),
    (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
])
def test_bad_inputs_raise_clear_errors(x, exc, match):
    model = RGT(**TINY).eval()
    with pytest.raises(exc, match=match), torch.no_grad():
        model(x)


@torch.no_grad()
def test_batch_and_memory_layouts_agree(tiny64):
    x = spec_input(20, 24, B=2)
    out = tiny64(x)
    for b in range(2):
        torch.testing.assert_close(out[b:b + 1], tiny64(x[b:b + 1]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiny64(x.contiguous(memory_format=torch.channels_last)), out, rtol=1e-12, atol=1e-12)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    assert not transposed.is_contiguous()
    torch.testing.assert_close(tiny64(transposed), out, rtol=1e-12, atol=1e-12)


@torch.no_grad()
@pytest.mark.parametrize("H,W", [(16, 16), (32, 64), (64, 64), (33, 17)])
def test_padding_edge_sizes(tiny64, H, W):
    x = spec_input(H, W)
    out = tiny64(x)
    assert out.shape == (1, 3, 2 * H, 2 * W) and torch.isfinite(out).all()


# Max error relative to max |out| against float64; measured 1.0e-6 / 1.4e-3 / 1.7e-2 (fp32 / fp16 / bf16), ~3x here.
@torch.no_grad()
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 4e-6), (torch.float16, 5e-3), (torch.bfloat16, 5e-2)])
def test_reduced_precision_at_a_size_that_does_not_pad_to_64(tiny64, dtype, tol):
    """The official code crashes here (float32 on-the-fly mask in a half model); 20x70 pads to 32x96."""
    x = spec_input(20, 70)
    expected = tiny64(x)
    got = copy.deepcopy(tiny64).to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    err = (got.double() - expected).abs().max().item()
    assert err < tol * expected.abs().max().item(), err


@torch.no_grad()
def test_masks_and_tables_are_built_once_per_size(tiny64):
    x = spec_input(20, 70)
    tiny64(x)
    masks, index = reference.shift_mask.cache_info().misses, reference.relative_position_index.cache_info().misses
    tiny64(x)
    assert reference.shift_mask.cache_info().misses == masks
    assert reference.relative_position_index.cache_info().misses == index


def test_kernel_modes(monkeypatch):
    with pytest.raises(ValueError, match="kernels must be one of"):
        RGT(**TINY, kernels="fast")
    monkeypatch.setenv("RGT_KERNELS", "reference")
    model = RGT(**TINY)
    assert model.kernels == "reference" and all(b.attn.kernels == "reference" for g in model.layers for b in g.blocks)
    model.set_kernels("fused")
    assert all(b.attn.kernels == "fused" for g in model.layers for b in g.blocks)
    monkeypatch.setenv("RGT_KERNELS", "turbo")
    with pytest.raises(ValueError, match="RGT_KERNELS"):
        RGT(**TINY)


def test_fused_mode_without_usable_kernels_raises(monkeypatch):
    """On CPU without the Triton interpreter no attention kernel can run: 'fused' must say so, 'auto' falls back."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.rand(1, 3, 20, 24, generator=gen("fused-mode"))
    model = RGT(**TINY, kernels="fused").eval()
    with pytest.raises((NotImplementedError, RuntimeError), match="kernels='fused'"), torch.no_grad():
        model(x)
    model.set_kernels("auto")
    with torch.no_grad():
        auto = model(x)
    model.set_kernels("reference")
    with torch.no_grad():
        torch.testing.assert_close(auto, model(x), rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.rand(1, 3, 20, 24, generator=gen("use_chk"), dtype=torch.float64)
    grads = []
    for use_chk in (False, True):
        torch.manual_seed(0)
        model = RGT(**TINY, use_chk=use_chk, drop_path_rate=0.0, kernels="reference").double().train()
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
