"""Loading and saving RGT weights in the layouts people already have.

Accepted: BasicSR `{'params': sd}` / `{'params_ema': sd}` (EMA preferred), other common wrappers, plain state
dicts, `module.` prefixes, `.pth` / `.pt` (always `torch.load(weights_only=True)`) and `.safetensors`. "Slim"
checkpoints omit the non-learned buffers (shift masks, relative-position tables), which are rebuilt: for the
official RGT-S x4 they are two thirds of the 136 MB file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger("rgt")

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net_g")  # in order of preference
DERIVED_SUFFIXES = ("attn_mask_0", "attn_mask_1", "relative_position_index", "rpe_biases")


def is_derived(key: str) -> bool:
    """True for buffers that are a pure function of the config (slim checkpoints drop them)."""
    return key.rsplit(".", 1)[-1] in DERIVED_SUFFIXES


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """A flat state dict from a file or a (possibly wrapped) mapping, `module.` prefixes removed."""
    if isinstance(source, Mapping):
        obj = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickle errors carry little context: name the file
                raise ValueError(f"could not read checkpoint {path} with torch.load(weights_only=True): {exc}") from exc
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor: unknown layout")
        while k.startswith("module."):
            k = k[len("module.") :]
        sd[k] = v
    return sd


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, *, strict: bool = True) -> nn.Module:
    """Load weights into `model` in place and return it.

    Missing derived buffers are taken from the model (slim checkpoints). strict=True: any other missing or
    unexpected key is an error. strict=False (BasicSR's fine-tuning mode, e.g. x4 from x2): keys that are
    missing, unexpected or of another shape are skipped with a log line.
    """
    sd = read_state_dict(source)
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd and is_derived(k):
            sd[k] = v
    if not strict:
        skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        for k in skipped:
            log.info("rgt: skipping %s: shape %s in the checkpoint, %s in the model", k, tuple(sd[k].shape),
                     tuple(own[k].shape))
            del sd[k]
    result = model.load_state_dict(sd, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.info("rgt: non-strict load: %d missing keys %s, %d unexpected keys %s", len(result.missing_keys),
                 result.missing_keys, len(result.unexpected_keys), result.unexpected_keys)
    return model


def save_checkpoint(model: nn.Module | Mapping, path: str | os.PathLike, *, slim: bool = False,
                    ema: nn.Module | Mapping | None = None) -> Path:
    """Write weights atomically. `.pth`: BasicSR layout `{'params': sd}` (+ `'params_ema'` when `ema` is given).
    `.safetensors`: one flat state dict (the EMA weights when given: the ones to run). slim=True drops the
    derived buffers (masks, position tables), which `load_checkpoint` rebuilds."""
    path = Path(path)

    def prepare(m):
        sd = m.state_dict() if isinstance(m, nn.Module) else dict(m)
        return {k: v.detach().cpu().contiguous() for k, v in sd.items() if not (slim and is_derived(k))}

    def write(tmp: str) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(prepare(ema if ema is not None else model), tmp, metadata={"format": "pt", "arch": "RGT"})
        else:
            payload = {"params": prepare(model)}
            if ema is not None:
                payload["params_ema"] = prepare(ema)
            torch.save(payload, tmp)

    return atomic_write(path, write)


TEMP_SUFFIX = ".tmp"  # atomic_write's temporary files are `.<name>.<random>.tmp`: rgt.train removes leftovers


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, flush it to disk, then rename it over `path`: a run
    killed mid-write leaves the previous file intact, never a truncated one, and the temporary file is removed
    on any error. The file gets the umask's permissions. A full disk raises OSError(ENOSPC) naming `path`:
    torch.save reports it only as "unexpected pos", so a failed write on a file system with no space left counts
    as one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created like any file (mode 0o666 less the umask; mkstemp's would be 0o600), exclusively, with a random name.
    tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}{TEMP_SUFFIX}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    full = False
    try:
        write(tmp)
        _fsync(tmp)  # the data must be on disk before the rename makes it the file (power loss)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename's durability: some file systems cannot fsync a folder
            _fsync(path.parent)
    except Exception as exc:
        if not _out_of_space(exc, path.parent):
            raise
        full = True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if full:  # raised here, without the original: its traceback holds torch's writer, whose open file keeps the
        # deleted temporary file's space in use
        raise OSError(errno.ENOSPC, f"no space left on device: could not write {path}")
    return path


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _out_of_space(exc: Exception, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or less than 1 MiB left in `folder`'s file system
    (checked while the partial temporary file still takes its room)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20
