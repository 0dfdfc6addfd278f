"""Checkpoint loading and saving: BasicSR wrappers, prefixes, slim files, safetensors, strictness, safety."""

import logging
import os
import pickle
import stat
import zipfile

import pytest
import torch
from _utils import TINY, gen

import rgt
from rgt import RGT, load_checkpoint, save_checkpoint
from rgt.checkpoint import CheckpointError, atomic_write, is_derived, load_file, read_state_dict
from rgt.ops import reference


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
    assert set(raw) == {"params", "params_ema", "config"}
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


# A model no default would rebuild: 4 x 16 windows (relative_position_index 64 x 64, not 256 x 256) and
# img_size 32 (shift masks of 16 windows, not 64), as the quickstart trains.
ODD = dict(TINY, split_size=[4, 16], img_size=32)


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(2)
    return RGT(**ODD, kernels="reference").eval()


def _out(model):
    x = torch.rand(1, 3, 20, 24, generator=gen("ckpt-out"))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("slim", [False, True])
def test_load_model_rebuilds_the_stored_config(odd, tmp_path, caplog, suffix, slim):
    path = save_checkpoint(odd, tmp_path / f"w{suffix}", slim=slim)
    with caplog.at_level(logging.WARNING, logger="rgt"):
        model = rgt.load_model(path, kernels="reference")
    assert not caplog.records  # nothing assumed
    index = "layers.0.blocks.0.attn.attns.0.relative_position_index"
    assert model.state_dict()[index].shape == odd.state_dict()[index].shape == (64, 64)
    assert torch.equal(_out(model), _out(odd))


def test_slim_file_without_config_warns_what_it_assumes(odd, tmp_path, caplog):
    sd = {k: v for k, v in odd.state_dict().items() if not is_derived(k)}
    torch.save({"params": sd}, tmp_path / "old.pth")  # a slim file from before configs were stored
    with caplog.at_level(logging.WARNING, logger="rgt"):
        rgt.load_model(tmp_path / "old.pth", kernels="reference")
    assert "assuming the official split_size [8, 32]" in caplog.text


def test_saved_checkpoints_load_like_spandrel(odd, tmp_path):
    """spandrel 0.4.2 (and the official code) build RGT with img_size=64 and load the params strictly."""
    path = save_checkpoint(odd, tmp_path / "net_g_10.pth", ema=odd)
    params = torch.load(path, weights_only=True)["params"]
    official = RGT(**dict(ODD, img_size=64), kernels="reference")
    official.load_state_dict(params, strict=True)
    mask = params["layers.1.blocks.0.attn.attn_mask_1"]  # branch 1: 16 x 4 windows on the 64 x 64 grid
    assert torch.equal(mask, reference.shift_mask(64, 64, 16, 4, torch.device("cpu"), torch.float32))
    # and back into the run's own img_size (the trainer's resume), with the same output
    again = load_checkpoint(RGT(**ODD, kernels="reference").eval(), path)
    assert torch.equal(_out(again), _out(odd)) and torch.equal(_out(official.eval()), _out(odd))


def test_saved_files_get_the_umask_permissions(source, tmp_path):
    old = os.umask(0o022)
    try:
        for path in (save_checkpoint(source, tmp_path / "w.pth"), save_checkpoint(source, tmp_path / "w.safetensors"),
                     atomic_write(tmp_path / "1.state", lambda tmp: torch.save({"iter": 1}, tmp))):
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    finally:
        os.umask(old)


def _flip_tensor_byte(path):
    """Flip one byte inside the data of the largest tensor (the payload CRCs and checksums cover)."""
    if path.suffix == ".safetensors":
        header = int.from_bytes(path.read_bytes()[:8], "little")
        offset = 8 + header + 100
    else:
        with zipfile.ZipFile(path) as z:
            info = max(z.infolist(), key=lambda i: i.file_size)
        raw = path.read_bytes()
        name_len, extra_len = (int.from_bytes(raw[info.header_offset + o : info.header_offset + o + 2], "little")
                               for o in (26, 28))
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_files_are_refused(source, tmp_path, suffix):
    path = save_checkpoint(source, tmp_path / f"w{suffix}")
    _flip_tensor_byte(path)
    with pytest.raises(CheckpointError, match=f"w{suffix}.*(CRC|sha256)"):
        rgt.load_model(path)
    with pytest.raises(CheckpointError, match="CRC"):  # training states go through the same loader
        state = atomic_write(tmp_path / "5.state", lambda tmp: torch.save({"x": torch.randn(4096)}, tmp))
        _flip_tensor_byte(state)
        load_file(state)


def test_empty_and_truncated_files_are_refused(source, tmp_path):
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match="empty.pth: empty file"):
        load_checkpoint(RGT(**TINY), tmp_path / "empty.pth")
    for suffix in (".pth", ".safetensors"):
        path = save_checkpoint(source, tmp_path / f"cut{suffix}")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=f"cut{suffix}"):
            rgt.load_model(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(source, tmp_path, bad):
    sd = dict(source.state_dict())
    key = "layers.1.blocks.0.mlp.fc1.weight"
    sd[key] = sd[key].clone().index_fill_(0, torch.tensor([3]), bad)
    torch.save({"params": sd}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan.pth: tensor params.layers.1.blocks.0.mlp.fc1.weight has NaN/Inf"):
        rgt.load_model(tmp_path / "nan.pth")


def test_non_strict_load_of_another_architecture_is_an_error(source, caplog):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 3, 3))
    with pytest.raises(ValueError, match="no weight of the state dict fits Sequential"):
        load_checkpoint(other, source.state_dict(), strict=False)
    with caplog.at_level(logging.WARNING, logger="rgt"):  # a partial fit (x4 from x2) loads, with a count
        load_checkpoint(RGT(**{**TINY, "upscale": 4}), source.state_dict(), strict=False)
    assert "non-strict load of the state dict" in caplog.text and "missing keys ['upsample.2.weight'" in caplog.text
