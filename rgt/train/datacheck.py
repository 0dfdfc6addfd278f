"""Every image of a dataset checked before the first iteration, cheaply: readable header, complete file, sizes.

A truncated or unreadable image would otherwise be found on first use, possibly hours in, inside a data worker.
Full decoding of DF2K takes minutes, so PNG and JPEG files are checked from their header and their last bytes
(the IEND chunk, the JPEG end marker), which catches truncation (an interrupted copy or download); files of other
formats, and PNG/JPEG files that do not end with the marker (trailing bytes), are decoded in full. Damage inside a
complete PNG or JPEG still shows at first use, as a DataError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rgt.train.dataset import DataError, SRDataset, is_pair

_ENDS = {"PNG": b"\x00\x00\x00\x00IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) as stored (before any EXIF rotation) of a readable, complete image; DataError names the file."""
    try:
        with Image.open(path) as im:
            (w, h), end = im.size, _ENDS.get(im.format or "")
            if end is None or not _ends_with(path, end):
                im.load()  # decode in full: the only check left
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # what Pillow raises
        raise DataError(f"cannot read image {path}: {exc}") from None
    return h, w


def _ends_with(path: Path, end: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < len(end):
            return False
        f.seek(-len(end), 2)
        return f.read() == end


def check_dataset(ds: SRDataset, name: str) -> None:
    """Raise one DataError naming the first unusable image of `ds` (and how many more there are): unreadable or
    truncated, an LR image smaller than the training patch, or an HR/LR pair whose sizes are not a x`scale` pair
    (either orientation: EXIF rotation is applied only at decoding)."""
    s, p = ds.scale, (ds.gt_size // ds.scale if ds.gt_size else 1)
    problems = []
    for hr_path, lr_path in ds.pairs:
        try:
            hh, hw = image_size(hr_path)
            h, w = image_size(lr_path) if lr_path is not None else (hh // s, hw // s)
            if lr_path is not None and not (is_pair((h, w), (hh, hw), s) or is_pair((w, h), (hh, hw), s)):
                raise DataError(f"{lr_path} is {h}x{w} but {hr_path} is {hh}x{hw}: not a x{s} pair")
            if min(h, w) < p:
                raise DataError(f"{lr_path or hr_path} gives a {h}x{w} LR image, smaller than the {p}x{p} LR patch"
                                + (f" (gt_size {ds.gt_size} / scale {s})" if ds.gt_size else f" (scale {s})"))
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more unusable of {len(ds.pairs)})" if len(problems) > 1 else ""
        raise DataError(f"datasets.{name}: {problems[0]}{more}")
