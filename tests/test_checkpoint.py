"""Checkpoint loading and saving: BasicSR wrappers, prefixes, slim files, safetensors, strictness, safety."""

import pickle

import pytest
import torch
from _utils import TINY, gen

from rgt import RGT, load_checkpoint, save_checkpoint
from rgt.checkpoint import is_derived, read_state_dict


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(1)
    model = RGT(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen("ckpt-" + str(p.shape))))
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["plain", "params", "params_ema", "module", "both"])
def test_load_wrappers(source, tmp_path, wrap):
    sd = source.state_dict()
    obj = {
        "plain": sd,
        "params": {"params": sd},
        "params_ema": {"params_ema": sd},
        "module": {"params": {f"module.{k}": v for k, v in sd.items()}},
        "both": {"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd},  # EMA preferred
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    _assert_same(load_checkpoint(RGT(**TINY), tmp_path / "w.pth"), source)
    _assert_same(load_checkpoint(RGT(**TINY), obj), source)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("slim", [False, True])
def test_save_load_round_trip(source, tmp_path, suffix, slim):
    path = save_checkpoint(source, tmp_path / f"w{suffix}", slim=slim)
    stored = read_state_dict(path)
    assert any(is_derived(k) for k in stored) != slim
    assert all(k in stored for k in source.state_dict() if not is_derived(k))
    _assert_same(load_checkpoint(RGT(**TINY), path), source)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed away


def test_slim_checkpoints_are_much_smaller(source, tmp_path):
    full = save_checkpoint(source, tmp_path / "full.pth").stat().st_size
    slim = save_checkpoint(source, tmp_path / "slim.pth", slim=True).stat().st_size
    assert slim < full / 2


def test_ema_is_saved_beside_params(source, tmp_path):
    ema = RGT(**TINY)
    save_checkpoint(source, tmp_path / "w.pth", ema=ema)
    raw = torch.load(tmp_path / "w.pth", weights_only=True)
    assert set(raw) == {"params", "params_ema"}
    _assert_same(load_checkpoint(RGT(**TINY), tmp_path / "w.pth"), ema)


def test_strict_and_non_strict_loading(source):
    sd = dict(source.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra.weight"):
        load_checkpoint(RGT(**TINY), sd)
    del sd["extra.weight"], sd["conv_last.bias"]
    with pytest.raises(RuntimeError, match="conv_last.bias"):
        load_checkpoint(RGT(**TINY), sd)
    # BasicSR fine-tuning: x3 from x2 skips the upsampler conv of another shape; x4 from x2 misses upsample.2.
    for scale in (3, 4):
        target = RGT(**{**TINY, "upscale": scale})
        before = target.upsample[0].weight.clone()
        load_checkpoint(target, source.state_dict(), strict=False)
        torch.testing.assert_close(target.conv_first.weight, source.conv_first.weight)
        same_shape = scale == 4
        assert torch.equal(target.upsample[0].weight, source.upsample[0].weight) == same_shape
        assert torch.equal(target.upsample[0].weight, before) != same_shape


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_unsafe_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"params": _Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(RGT(**TINY), path)


def test_missing_file_and_unknown_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(RGT(**TINY), tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not a tensor"):
        load_checkpoint(RGT(**TINY), {"params": {"a": 1}})
