"""Recognise an RGT checkpoint and rebuild its constructor arguments from the keys and tensor shapes alone.

Works on every layout `rgt.checkpoint.read_state_dict` reads (official `{'params': sd}`, BasicSR
`net_g_*.pth`, our `.safetensors`, full or slim), so no config file is needed:

- in_chans, embed_dim C: `conv_first.weight` (C, in, 3, 3).
- depth: block indices per `layers.{g}`; num_heads[g]: 2 x rows of `pos.pos3.2.weight` (each L-SA branch has
  heads // 2), +1 when only the odd count divides C (and C * c_ratio).
- mlp_ratio: `mlp.fc1` out / in; c_ratio: RG-SA `attn.conv` out / in; qkv_bias: `attn.qkv.bias` present.
- resi_connection: `conv_after_body.weight` ('1conv') or `conv_after_body.0.weight` ('3conv').
- upscale: the upsampler convs, n x (256, 64, 3, 3) for 2^n, one (576, 64, 3, 3) for 3, none for 1.
- split_size: from the contents of `attns.0.rpe_biases`, the (dh, dw) offsets of an s0 x s1 window (so the
  order is exact, where shapes alone leave [8, 32] vs [32, 8] open), else from `relative_position_index`
  (N = s0 s1, M = (2 s0 - 1)(2 s1 - 1) and the row step of its entries). Slim checkpoints have neither: the
  learned weights do not depend on the window (the position-bias MLP takes raw offsets), so the official
  [8, 32] is assumed, which every released model uses. Pass `split_size=` to `load_model` otherwise.
- num_heads caveat: an odd count (2 hb + 1) is chosen only when the even one cannot split the channels; the
  weights are the same for both, so a model trained with odd heads needs `num_heads=` (none is released).
- img_size: from the stored shift masks (nW, N, N), which cover the padded img_size^2; 64 when absent.

Files written by `rgt.save_checkpoint` store their constructor config, which `load_model` uses instead of
guessing; detection is for everyone else's files. When it must assume (a slim file without a config), it warns.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from rgt.arch import RGT
from rgt.checkpoint import load_checkpoint, read_checkpoint
from rgt.models import CONFIGS

log = logging.getLogger("rgt")

REQUIRED_KEYS = (
    "conv_first.weight",
    "before_RG.1.weight",
    "norm.weight",
    "layers.0.blocks.0.gamma",
    "layers.0.blocks.0.attn.qkv.weight",
    "layers.0.blocks.0.attn.attns.0.pos.pos3.2.weight",
    "layers.0.blocks.0.mlp.fc1.weight",
    "conv_before_upsample.0.weight",
    "conv_last.weight",
)
OFFICIAL_SPLIT = (8, 32)
OFFICIAL_IMG_SIZE = 64
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_UPSAMPLE = re.compile(r"^upsample\.(\d+)\.weight$")


def _check_rgt(sd: Mapping[str, Tensor]) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing:
        hint = " (it has `ffn` MLPs: a DAT checkpoint?)" if any(".ffn." in k for k in sd) else ""
        raise ValueError(f"not an RGT checkpoint{hint}: missing {', '.join(missing[:4])}")


def _ratio(out: int, c: int) -> float:
    """r with int(c * r) == out, as the model computes the width (out / c can round just below)."""
    r = out / c
    return r if int(c * r) == out else math.nextafter(r, math.inf)


def _depths(sd: Mapping[str, Tensor]) -> list[int]:
    blocks: dict[int, int] = {}
    for k in sd:
        m = _BLOCK.match(k)
        if m:
            g, b = int(m[1]), int(m[2])
            blocks[g] = max(blocks.get(g, 0), b + 1)
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"RGT checkpoint has non-contiguous residual groups {sorted(blocks)}")
    return [blocks[g] for g in range(len(blocks))]


def _heads(sd: Mapping[str, Tensor], g: int, c: int, cr: int) -> int:
    """L-SA branches have heads // 2 each, so the count is 2 hb or 2 hb + 1; keep the one RG-SA can split."""
    hb = sd[f"layers.{g}.blocks.0.attn.attns.0.pos.pos3.2.weight"].shape[0]
    for h in (2 * hb, 2 * hb + 1):
        if c % h == 0 and cr % h == 0:
            return h
    return 2 * hb


def _upscale(sd: Mapping[str, Tensor]) -> int:
    convs = sorted(int(m[1]) for k in sd if (m := _UPSAMPLE.match(k)))
    if not convs:
        return 1
    out = sd[f"upsample.{convs[0]}.weight"].shape[0]
    num_feat = sd["conv_before_upsample.0.weight"].shape[0]
    if out == 9 * num_feat and len(convs) == 1:
        return 3
    if out == 4 * num_feat:
        return 2 ** len(convs)
    raise ValueError(f"unrecognised upsampler: {len(convs)} conv(s) with {out} outputs for {num_feat} features")


def _split_size(sd: Mapping[str, Tensor]) -> tuple[int, int] | None:
    """(s0, s1) of branch 0 from the position tables, None for slim checkpoints."""
    prefix = "layers.0.blocks.0.attn.attns.0."
    offsets = sd.get(prefix + "rpe_biases")
    if offsets is not None and offsets.ndim == 2 and offsets.shape[1] == 2:
        return int(offsets[:, 0].max().item()) + 1, int(offsets[:, 1].max().item()) + 1
    index = sd.get(prefix + "relative_position_index")
    if index is None:
        return None
    n = index.shape[0]  # s0 * s1; the largest index is M - 1 = (2 s0 - 1)(2 s1 - 1) - 1
    m = int(index.max().item()) + 1
    total = (4 * n + 1 - m) // 2  # s0 + s1, from m = 4 n - 2 (s0 + s1) + 1
    a = (total - math.isqrt(max(total * total - 4 * n, 0))) // 2
    # Tokens are row-major: token w starts the window's second row, one step down from token 0, which moves
    # the table row by 2 w - 1. That tells s0 x s1 from s1 x s0.
    row0 = index[0]
    return next(((h, w) for h, w in ((a, total - a), (total - a, a)) if w < n and row0[0] - row0[w] == 2 * w - 1),
                (a, total - a))


def _img_size(sd: Mapping[str, Tensor]) -> int:
    """The stored shift masks (nW, N, N) tile the padded img_size x img_size map."""
    mask = next((v for k, v in sd.items() if k.endswith("attn.attn_mask_0")), None)
    if mask is None:
        return OFFICIAL_IMG_SIZE
    side = math.isqrt(mask.shape[0] * mask.shape[1])
    return OFFICIAL_IMG_SIZE if side == OFFICIAL_IMG_SIZE else side


def detect_config(state_dict: Mapping[str, Tensor]) -> dict:
    """RGT constructor arguments that load `state_dict` (flat, unwrapped) strictly.

    Raises:
        ValueError: the state dict is not an RGT one (the message names the missing keys).
    """
    sd = state_dict
    _check_rgt(sd)
    c, in_chans = sd["conv_first.weight"].shape[:2]
    depth = _depths(sd)
    fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"]
    rg_conv = next((sd[k] for k in (f"layers.{g}.blocks.1.attn.conv.weight" for g in range(len(depth))) if k in sd),
                   None)
    cr = rg_conv.shape[0] if rg_conv is not None else c // 2
    split = _split_size(sd)
    if split is None:
        log.warning("rgt: a slim checkpoint without a stored config: assuming the official split_size %s (pass "
                    "split_size= if it was trained with another window)", list(OFFICIAL_SPLIT))
    return dict(
        img_size=_img_size(sd),
        img_range=1.0,  # a constant of the forward, not stored; every released model uses 1
        in_chans=int(in_chans),
        embed_dim=int(c),
        depth=depth,
        num_heads=[_heads(sd, g, c, cr) for g in range(len(depth))],
        mlp_ratio=_ratio(fc1.shape[0], fc1.shape[1]),
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
        upscale=_upscale(sd),
        resi_connection="1conv" if "conv_after_body.weight" in sd else "3conv",
        split_size=list(split or OFFICIAL_SPLIT),
        c_ratio=_ratio(cr, c),
    )


def official_name(config: Mapping) -> str | None:
    """"rgt_s" / "rgt" when `config` is an official architecture (any scale), else None."""
    for name, ref in CONFIGS.items():
        if all(list(config[k]) == list(v) if isinstance(v, tuple) else config[k] == v for k, v in ref.items()):
            return name
    return None


def resolve_config(
    state_dict: Mapping[str, Tensor],
    *,
    stored: Mapping | None = None,
    model: str | None = None,
    scale: int | None = None,
    **overrides,
) -> dict:
    """The stored config (files we write) or `detect_config`, then a preset ("rgt_s" / "rgt") and constructor
    overrides on top; `scale` is checked against the upsampler (a x2 checkpoint cannot run at x4)."""
    config = dict(stored) if stored is not None else detect_config(state_dict)
    detected = config["upscale"]
    if scale is not None and scale != detected:
        raise ValueError(f"the checkpoint is a x{detected} model (from its upsampler), but scale {scale} was asked for")
    if model is not None:
        if model not in CONFIGS:
            raise ValueError(f"unknown model {model!r}; choose one of {sorted(CONFIGS)}")
        config.update(CONFIGS[model])
    config.update(overrides)
    return config


def load_model(
    checkpoint: str | os.PathLike | Mapping,
    *,
    model: str | None = None,
    scale: int | None = None,
    device: str | torch.device = "cpu",
    kernels: str | None = None,
    **overrides,
) -> RGT:
    """Build the RGT a checkpoint was trained as (its stored config, else detected), load it strictly, and
    return it in eval mode.

    Args:
        checkpoint: a .pth/.pt/.safetensors path or a (wrapped) state dict, full or slim.
        model: "rgt_s" or "rgt" to use that preset instead of the detected architecture.
        scale: the upscale factor; it must agree with the checkpoint's upsampler (checked with a clear error).
        device: where to put the model. kernels: "auto" | "reference" | "fused" (default: RGT_KERNELS).
        **overrides: other constructor arguments (e.g. split_size for a slim checkpoint trained with another).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): empty, truncated, corrupt or non-finite file.
        ValueError: not an RGT checkpoint, or the overrides contradict its tensors.
    """
    sd, stored = read_checkpoint(checkpoint)
    return build_model(sd, resolve_config(sd, stored=stored, model=model, scale=scale, **overrides), device,
                       kernels)


def build_model(sd: Mapping[str, Tensor], config: Mapping, device: str | torch.device = "cpu",
                kernels: str | None = None) -> RGT:
    """RGT(**config) with `sd` loaded strictly, on `device`, in eval mode; a misfit is a ValueError naming
    the config."""
    try:
        net = RGT(**config, kernels=kernels)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot build RGT({dict(config)}): {e}") from e
    try:
        load_checkpoint(net, sd, strict=True)
    except RuntimeError as e:  # strict load: name the config that did not fit
        raise ValueError(f"checkpoint does not fit RGT({config}): {e}") from e
    return net.to(device).eval()
