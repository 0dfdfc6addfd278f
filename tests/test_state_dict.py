"""The state_dict is API: keys, shapes, dtypes and order equal the official layouts for every config."""

import pytest
import torch
from _utils import REPO, TINY

from rgt import RGT, models

TSV_DIR = REPO / "tests" / "data" / "state_dict"
# file stem -> (constructor kwargs, trainable parameter count measured on the official code)
CASES = {
    "rgt-s_x2": (models.config("rgt_s", 2), 10_051_055),
    "rgt-s_x3": (models.config("rgt_s", 3), 10_235_695),
    "rgt-s_x4": (models.config("rgt_s", 4), 10_198_767),
    "rgt_x2": (models.config("rgt", 2), 13_217_831),
    "rgt_x3": (models.config("rgt", 3), 13_402_471),
    "rgt_x4": (models.config("rgt", 4), 13_365_543),
    "tiny_x2": (TINY, 246_495),
}


def _read_tsv(stem: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (TSV_DIR / f"{stem}.tsv").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype))
    return rows


@pytest.mark.parametrize("stem", sorted(CASES))
def test_state_dict_layout(stem):
    cfg, n_params = CASES[stem]
    model = RGT(**cfg)
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == _read_tsv(stem)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert "mean" not in model.state_dict()


def test_strict_round_trip_and_buffers_match_official_values():
    model = RGT(**TINY)
    fresh = RGT(**TINY)
    fresh.load_state_dict(model.state_dict(), strict=True)
    sd = fresh.state_dict()
    # Values the spec quotes from the official buffers (branch 0: 8x32 windows, branch 1: 32x8).
    idx = sd["layers.0.blocks.0.attn.attns.0.relative_position_index"]
    assert [idx[0, 0].item(), idx[0, 1].item(), idx[1, 0].item(), idx[0, 32].item(), idx.max().item()] == [
        472, 471, 473, 409, 944]
    rpe0 = sd["layers.0.blocks.0.attn.attns.0.rpe_biases"]
    rpe1 = sd["layers.0.blocks.0.attn.attns.1.rpe_biases"]
    assert rpe0[:2].tolist() == [[-7, -31], [-7, -30]] and rpe0[-1].tolist() == [7, 31]
    assert rpe1[0].tolist() == [-31, -7] and rpe1[-1].tolist() == [31, 7]
    mask = sd["layers.1.blocks.0.attn.attn_mask_0"]
    assert mask.shape == (16, 256, 256) and set(mask.unique().tolist()) == {0.0, -100.0}
    # 8 x 2 grid of 8x32 windows: only those off the bottom band and the right column hold a single region.
    single = [w for w in range(16) if w // 2 < 7 and w % 2 == 0]
    assert [w for w in range(16) if mask[w].abs().sum() == 0] == single


def test_shifted_blocks_follow_the_official_pattern():
    model = models.rgt_s(4)
    shifted = sorted({k.rsplit(".attn.", 1)[0] for k in model.state_dict() if "attn_mask" in k})
    expected = [f"layers.{g}.blocks.{b}" for g in range(6) for b in ((2,) if g % 2 == 0 else (0, 4))]
    assert shifted == sorted(expected)


@pytest.mark.parametrize("bad", [dict(upscale=5), dict(depth=[2], num_heads=[2, 2]), dict(resi_connection="2conv")])
def test_bad_constructor_arguments(bad):
    with pytest.raises(ValueError):
        RGT(**{**TINY, **bad})


def test_kwargs_are_swallowed_like_the_official_constructor():
    RGT(**TINY, upsampler="pixelshuffle")
    assert torch.is_tensor(RGT(**TINY).mean)
