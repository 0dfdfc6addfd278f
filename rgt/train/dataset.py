"""Training and validation data: paired HR/LR folders or HR only (LR made with MATLAB-exact bicubic).

Randomness without state: the sampler yields `(index, (seed, rank, position))` and a training sample's crop and
flips come from a generator seeded with that key. Workers keep no RNG state, so a resumed run (sampler restarted
at its position) sees exactly the samples the uninterrupted run would have, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from rgt.data import IMAGE_EXTENSIONS, bicubic_degrade, read_image

SampleKey = tuple[int, tuple[int, int, int]]  # (dataset index, (seed, rank, stream position))
MARGIN = 3  # LR pixels of context around a patch: more than the bicubic kernel's reach (2 LR px)


class DataError(ValueError):
    """A missing, unreadable or unusable image; the message names the file."""


def list_images(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {what} folder {folder}")
    return files


def _pairs(hr_dir: str, lr_dir: str | None, tmpl: str) -> list[tuple[Path, Path | None]]:
    """(HR, LR) paths; LR = lr_dir / (tmpl.format(HR stem) + HR suffix), BasicSR's folder mode."""
    hrs = list_images(hr_dir, "HR (dataroot_gt)")
    if lr_dir is None:
        return [(p, None) for p in hrs]
    if not Path(lr_dir).is_dir():
        raise DataError(f"LR (dataroot_lq) folder not found: {lr_dir}")
    pairs = []
    for hr in hrs:
        lr = Path(lr_dir) / (tmpl.format(hr.stem) + hr.suffix)
        if not lr.is_file():
            raise DataError(f"LR image missing for {hr}: expected {lr} (filename_tmpl {tmpl!r})")
        pairs.append((hr, lr))
    return pairs


def _read_rgb(path: Path) -> Tensor:
    """(3, H, W) float32 in [0, 1]; gray is repeated to RGB, alpha dropped. Errors name the file."""
    try:
        img = read_image(path).image
    except OSError as exc:
        raise DataError(str(exc)) from exc
    return img.expand(3, -1, -1).contiguous() if img.shape[0] == 1 else img


def degrade(hr: Tensor, scale: int) -> Tensor:
    """MATLAB bicubic of float [0, 1] images (..., H, W) holding 8-bit values, through uint8 (exact) -> float
    [0, 1], on hr's device."""
    hr8 = torch.round(hr * 255).to(torch.uint8)
    return bicubic_degrade(hr8, scale).float() / 255


def is_pair(lr_hw: tuple[int, int], hr_hw: tuple[int, int], scale: int) -> bool:
    """Whether an HR image of size hr_hw can belong to an LR image of size lr_hw (HR modcropped to LR * scale)."""
    return all(n * scale <= m < (n + 1) * scale for n, m in zip(lr_hw, hr_hw, strict=True))


def _check_pair(hr: Tensor, lr: Tensor, scale: int, hr_path: Path, lr_path: Path) -> Tensor:
    """HR cropped to LR * scale (BasicSR's modcrop of the GT); error if the sizes cannot be a pair."""
    (h, w), (hh, ww) = lr.shape[-2:], hr.shape[-2:]
    if not is_pair((h, w), (hh, ww), scale):
        raise DataError(f"{lr_path} is {h}x{w} but {hr_path} is {hh}x{ww}: not a x{scale} pair")
    return hr[:, : h * scale, : w * scale]


def dihedral(x: Tensor, hflip: bool, vflip: bool, transpose: bool) -> Tensor:
    """One of the 8 dihedral transforms of (C, H, W)."""
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if transpose:
        x = x.transpose(-1, -2)
    return x.contiguous()


class SRDataset(Dataset):
    """Training: random aligned (LR patch, HR patch) with dihedral augmentation; validation: whole images.

    Items are dicts: `lq` (3, h, w) and `gt` (3, s*h, s*w), float32 in [0, 1], and `name`. With
    `degrade_on_device`, HR-only training items instead carry the undegraded HR context window, which
    `patches_from_windows` turns into the very same `lq`/`gt` on the training device: `hr` (3, s*wh, s*ww),
    `offset` (2,) the LR patch's top-left inside the window, `flips` (3,) the dihedral transform; HR-only whole
    images come without `lq`, which `degrade` makes where the image is.

    Args:
        hr_dir, lr_dir: folders; lr_dir None = HR only, LR made on the fly (MATLAB-exact bicubic, from 8 bits).
        scale: SR factor. filename_tmpl: LR name from the HR stem, e.g. "{}x4".
        gt_size: HR patch side (training); the LR patch is gt_size // scale. None: whole images (validation).
        hflip, rot: augmentations (rot = vertical flip and transpose, so all 8 dihedral transforms).
        degrade_on_device: HR only: leave the bicubic degradation to the training loop or the validation.
    """

    def __init__(self, hr_dir: str, lr_dir: str | None, scale: int, *, filename_tmpl: str = "{}",
                 gt_size: int | None = None, hflip: bool = True, rot: bool = True,
                 degrade_on_device: bool = False):
        if gt_size is not None and (gt_size % scale or gt_size < scale):
            raise DataError(f"gt_size {gt_size} must be a positive multiple of the scale {scale}")
        self.pairs = _pairs(hr_dir, lr_dir, filename_tmpl)
        self.scale, self.gt_size, self.hflip, self.rot = scale, gt_size, hflip, rot
        self.degrade_on_device = degrade_on_device and lr_dir is None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | SampleKey) -> dict:
        if self.gt_size is None:
            return self._whole(int(key))
        index, entropy = key
        rng = np.random.default_rng(entropy)
        name, p = self.pairs[index][0].stem, self.gt_size // self.scale
        hr, lr, (top, left) = self._crop(index, rng)
        flips = rng.random(3) < 0.5
        t = (bool(flips[0]) and self.hflip, bool(flips[1]) and self.rot, bool(flips[2]) and self.rot)
        if lr is not None:
            s = self.scale
            lq, gt = lr[:, top:top + p, left:left + p], hr[:, s * top:s * (top + p), s * left:s * (left + p)]
            return {"lq": dihedral(lq, *t), "gt": dihedral(gt, *t), "name": name}
        item = {"hr": hr, "offset": torch.tensor((top, left)), "flips": torch.tensor(t), "name": name}
        if self.degrade_on_device:
            return item
        lq, gt = patches_from_windows(collate([item]), self.scale, p)
        return {"lq": lq[0], "gt": gt[0], "name": name}

    def _whole(self, index: int) -> dict:
        hr_path, lr_path = self.pairs[index]
        hr, s = _read_rgb(hr_path), self.scale
        if lr_path is None:
            h, w = hr.shape[-2] // s * s, hr.shape[-1] // s * s
            if h == 0 or w == 0:
                raise DataError(f"{hr_path} ({hr.shape[-2]}x{hr.shape[-1]}) is smaller than the scale {s}")
            hr = hr[:, :h, :w]
            return {"gt": hr, "name": hr_path.stem} | ({} if self.degrade_on_device else {"lq": degrade(hr, s)})
        lr = _read_rgb(lr_path)
        return {"lq": lr, "gt": _check_pair(hr, lr, s, hr_path, lr_path), "name": hr_path.stem}

    def _crop(self, index: int, rng: np.random.Generator) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """A random LR patch position. Paired: (HR, LR, (top, left)) whole images. HR only: (HR context window,
        None, patch position inside the window), the window from `context_window` along each axis."""
        hr_path, lr_path = self.pairs[index]
        s, p = self.scale, self.gt_size // self.scale
        hr = _read_rgb(hr_path)
        lr = _read_rgb(lr_path) if lr_path is not None else None
        h, w = (lr.shape[-2:] if lr is not None else (hr.shape[-2] // s, hr.shape[-1] // s))
        if h < p or w < p:
            raise DataError(f"{lr_path or hr_path} gives a {h}x{w} LR image, smaller than the {p}x{p} "
                            f"LR patch (gt_size {self.gt_size} / scale {s})")
        top, left = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
        if lr is not None:
            return _check_pair(hr, lr, s, hr_path, lr_path), lr, (top, left)
        (t0, th), (l0, tw) = context_window(h, top, p), context_window(w, left, p)
        return hr[:, s * t0:s * (t0 + th), s * l0:s * (l0 + tw)].contiguous(), None, (top - t0, left - l0)


def context_window(n: int, start: int, p: int) -> tuple[int, int]:
    """(first, length) in LR pixels of the stretch of an n-pixel axis to degrade for the patch [start, start + p).

    Bicubic downscaling reads 2 LR pixels beyond each output pixel and mirrors the image at its own border, so
    degrading the patch plus MARGIN pixels gives exactly the whole degraded image's pixels, provided each side
    of the stretch is either MARGIN away from the patch or the image's border. The stretch has the fixed length
    p + 2 * MARGIN (slid inside the image near a border), so windows from one dataset batch into one tensor;
    only an image shorter than that gives its whole length.
    """
    length = min(p + 2 * MARGIN, n)
    return min(max(start - MARGIN, 0), n - length), length


def collate(items: list[dict]) -> dict:
    """Batch training items. `lq`/`gt`, `offset`, `flips` are stacked; HR windows are stacked when their sizes
    agree (the rule) and kept as a list otherwise (an image shorter than the window)."""
    if "lq" in items[0]:
        return {"lq": torch.stack([i["lq"] for i in items]), "gt": torch.stack([i["gt"] for i in items])}
    hr = [i["hr"] for i in items]
    same = all(x.shape == hr[0].shape for x in hr)
    return {"hr": torch.stack(hr) if same else hr, "offset": torch.stack([i["offset"] for i in items]),
            "flips": torch.stack([i["flips"] for i in items])}


def patches_from_windows(batch: dict, scale: int, patch: int,
                         device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """HR-only batch -> (lq (B, 3, p, p), gt (B, 3, s*p, s*p)) on `device` (default: where the windows are).

    MATLAB-exact bicubic of each HR window (from 8 bits, in float64), then the patch crop and its dihedral
    transform. The same function serves the data workers (CPU) and the training loop (GPU); the resize is
    bit-identical on both, so where it runs changes nothing but speed.
    """
    s, p = scale, patch
    hr = batch["hr"]
    windows = [hr.to(device, non_blocking=True)] if isinstance(hr, Tensor) else [x[None].to(device) for x in hr]
    lrs = [lr for w in windows for lr in degrade(w, s)]
    hrs = [x for w in windows for x in w]
    lqs, gts = [], []
    for lr, x, (t, l), flips in zip(lrs, hrs, batch["offset"].tolist(), batch["flips"].tolist(), strict=True):
        lqs.append(dihedral(lr[:, t:t + p, l:l + p], *flips))
        gts.append(dihedral(x[:, s * t:s * (t + p), s * l:s * (l + p)], *flips))
    return torch.stack(lqs), torch.stack(gts)


class InfiniteSampler(Sampler):
    """An endless stream of `(index, (seed, rank, position))` for one rank, like DistributedSampler over epochs.

    Epoch e is a permutation of `enlarge` copies of the dataset (seeded by (seed, e); identical on all ranks),
    padded to a multiple of world and dealt round-robin. `start` skips the first positions (resume).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 enlarge: int = 1, start: int = 0):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.shuffle, self.total, self.start = shuffle, size * max(enlarge, 1), start
        self.per_rank = math.ceil(self.total / world)

    def _epoch(self, epoch: int) -> np.ndarray:
        order = (np.random.default_rng((self.seed, epoch)).permutation(self.total) if self.shuffle
                 else np.arange(self.total))
        order = np.resize(order, self.per_rank * self.world)  # pad by wrapping around
        return order[self.rank::self.world] % self.size

    def __iter__(self) -> Iterator[SampleKey]:
        pos, epoch, order = self.start, -1, None
        while True:
            e, k = divmod(pos, self.per_rank)
            if e != epoch:
                epoch, order = e, self._epoch(e)
            yield int(order[k]), (self.seed, self.rank, pos)
            pos += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62
