"""Config detection from checkpoint keys and shapes (`rgt.detect`, `rgt.load_model`)."""

import ast

import pytest
import torch
from _utils import REPO, TINY, gen

import rgt
from rgt.checkpoint import is_derived
from rgt.detect import detect_config, official_name, resolve_config
from rgt.ops import reference

LAYOUTS = REPO / "tests" / "data" / "state_dict"
OFFICIAL = {f"{name.replace('_', '-')}_x{s}.tsv": (name, s) for name in ("rgt_s", "rgt") for s in (2, 3, 4)}


def _derived(key: str, split=(8, 32)) -> torch.Tensor:
    """The constant buffers of the official layout (branch 0: 8 x 32 windows, branch 1: 32 x 8; masks 64 x 64)."""
    leaf = key.rsplit(".", 1)[-1]
    branch = int(key.split("attns.")[1][0]) if "attns." in key else int(leaf[-1])
    hs, ws = reference.branch_geometry(split, branch)
    if leaf == "rpe_biases":
        return reference.relative_offsets(hs, ws)
    if leaf == "relative_position_index":
        return reference.relative_position_index(hs, ws, torch.device("cpu"))
    return reference.shift_mask(64, 64, hs, ws, torch.device("cpu"), torch.float32)


def layout_state_dict(tsv: str) -> dict[str, torch.Tensor]:
    """Random weights with the shapes of a checked-in layout, the constant buffers as the official code has them."""
    g = gen(tsv)
    sd = {}
    for line in (LAYOUTS / tsv).read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        shape = ast.literal_eval(shape)
        sd[key] = _derived(key) if is_derived(key) else torch.randn(shape, generator=g).to(getattr(torch, dtype))
        assert tuple(sd[key].shape) == shape, key
    return sd


@pytest.mark.parametrize("tsv", sorted(OFFICIAL))
def test_official_layouts(tsv):
    name, scale = OFFICIAL[tsv]
    sd = layout_state_dict(tsv)
    expected = rgt.models.config(name, scale)
    for slim in (False, True):
        config = detect_config({k: v for k, v in sd.items() if not (slim and is_derived(k))})
        assert official_name(config) == name
        for key, value in expected.items():
            assert config[key] == (list(value) if isinstance(value, tuple) else value), (key, slim)
        assert config["qkv_bias"] is True and config["img_size"] == 64


def test_tiny_layout_builds_and_loads():
    sd = layout_state_dict("tiny_x2.tsv")
    config = detect_config(sd)
    assert official_name(config) is None
    assert {k: config[k] for k in TINY} == TINY
    model = rgt.load_model({"params": sd}, kernels="reference")
    assert model.upscale == 2 and not model.training
    assert torch.equal(model.state_dict()["conv_last.weight"], sd["conv_last.weight"])


@pytest.mark.parametrize("fmt", ["pth", "slim.safetensors", "module.pth"])
def test_load_model_files(tmp_path, fmt):
    ref = rgt.RGT(**TINY, kernels="reference").eval()
    path = tmp_path / f"net_g_5000.{fmt.split('.')[-1]}"
    if fmt == "module.pth":  # a DataParallel save, BasicSR-wrapped
        torch.save({"params": {"module." + k: v for k, v in ref.state_dict().items()}}, path)
    else:
        rgt.save_checkpoint(ref, path, slim=fmt.startswith("slim"))
    model = rgt.load_model(path, kernels="reference")
    x = torch.rand(1, 3, 20, 24, generator=gen(f"load-{fmt}"))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(upscale=3),
        dict(upscale=4, resi_connection="3conv"),
        dict(upscale=1, split_size=[4, 16], mlp_ratio=1.5),
        dict(split_size=[16, 8], embed_dim=48, c_ratio=0.25, num_heads=[4, 2], in_chans=1),
    ],
    ids=["x3", "x4-3conv", "x1-split4x16", "split16x8-gray"],
)
def test_other_configs(overrides):
    config = dict(TINY, **overrides)
    sd = rgt.RGT(**config).state_dict()
    detected = detect_config(sd)
    assert {k: detected[k] for k in config} == config
    # the window from relative_position_index alone (order included), when rpe_biases are absent
    no_offsets = {k: v for k, v in sd.items() if not k.endswith("rpe_biases")}
    assert detect_config(no_offsets)["split_size"] == config["split_size"]


def test_bad_inputs():
    sd = rgt.RGT(**TINY).state_dict()
    with pytest.raises(ValueError, match="x2 model.*scale 4"):
        resolve_config(sd, scale=4)
    with pytest.raises(ValueError, match="does not fit"):
        rgt.load_model(sd, model="rgt_s")
    with pytest.raises(ValueError, match="unknown model"):
        resolve_config(sd, model="swinir")
    dat_like = {k.replace(".mlp.", ".ffn."): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="not an RGT checkpoint.*DAT"):
        detect_config(dat_like)
