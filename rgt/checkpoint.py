"""Loading and saving RGT weights in the layouts people already have, verified on the way in.

Accepted: BasicSR `{'params': sd}` / `{'params_ema': sd}` (EMA preferred), other common wrappers, plain state
dicts, `module.` prefixes, `.pth` / `.pt` (always `torch.load(weights_only=True)`) and `.safetensors`. "Slim"
checkpoints omit the non-learned buffers (shift masks, relative-position tables), which are rebuilt: for the
official RGT-S x4 they are two thirds of the 136 MB file.

Files we write carry the model's constructor arguments (`config`: a `.pth` entry beside `params`, the
`rgt_config` metadata of a `.safetensors`), so `rgt.load_model` rebuilds exactly the saved model, slim or not,
and their shift masks are always the official img_size=64 ones (a cache the forward pass never reads), so the
official code and spandrel, which build every RGT with img_size=64, load them strictly whatever img_size the
run used.

Every file goes through `load_file`, which refuses (with `CheckpointError` naming the file) empty, truncated or
corrupt files (zip CRCs of torch files, the sha256 we store in our safetensors) and NaN/Inf tensors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger("rgt")

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "net_g")  # in order of preference
DERIVED_SUFFIXES = ("attn_mask_0", "attn_mask_1", "relative_position_index", "rpe_biases")
MASK_SUFFIXES = ("attn_mask_0", "attn_mask_1")
CONFIG_KEY = "config"  # the constructor arguments, beside "params" in our .pth files
META_CONFIG, META_SHA256 = "rgt_config", "rgt_sha256"  # safetensors metadata entries
OFFICIAL_MASK_SIZE = 64  # img_size of every official checkpoint and of spandrel's RGT
CONFIG_FIELDS = ("img_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "upscale",
                 "img_range", "resi_connection", "split_size", "c_ratio")


class CheckpointError(ValueError):
    """A checkpoint or training state that cannot be used: empty, truncated, corrupt, unsafe or with NaN/Inf
    values. The message names the file; the trainer catches it to fall back to an older state."""


def is_derived(key: str) -> bool:
    """True for buffers that are a pure function of the config (slim checkpoints drop them)."""
    return key.rsplit(".", 1)[-1] in DERIVED_SUFFIXES


def _is_mask(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in MASK_SUFFIXES


# ------------------------------------------------------------------------------------------------ reading


def _tensors(obj: Any, name: str = "") -> Iterator[tuple[str, Tensor]]:
    """(dotted name, tensor) of every tensor inside nested dicts / lists / tuples."""
    if isinstance(obj, Tensor):
        yield name, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


def _check_finite(obj: Any, path: Path) -> None:
    for name, t in _tensors(obj):
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name} has NaN/Inf values: refusing non-finite weights")


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_safetensors(path: Path) -> dict:
    """{'params': tensors, 'config'?: dict}, the layout of our .pth files; the stored sha256 is verified."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises its own SafetensorError for a bad header or short data
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    digest = meta.get(META_SHA256)
    if digest is not None and digest != tensor_digest(sd):
        raise CheckpointError(f"{path}: tensor data does not match its stored sha256: the file is corrupt")
    out: dict = {"params": sd}
    if META_CONFIG in meta:
        try:
            out[CONFIG_KEY] = json.loads(meta[META_CONFIG])
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable {META_CONFIG} metadata: {exc}") from exc
    return out


def _check_zip(path: Path) -> None:
    """torch.save's zip archive: every entry's CRC-32 (torch.load itself never checks them)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint archive: {exc}") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: CRC mismatch in {bad}: the file is corrupt")


def load_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint or training state file, verified. The one loader of the package.

    `.safetensors` comes back as `{'params': tensors, 'config': ...}` like our `.pth` files; anything else
    through `torch.load(weights_only=True)` after checking its zip CRCs. Every float tensor must be finite.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, truncated, corrupt, unsafe (pickled code) or non-finite; names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        if zipfile.is_zipfile(path):
            _check_zip(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors carry little context: name the file
            raise CheckpointError(
                f"{path}: could not read it with torch.load(weights_only=True) (truncated, corrupt or not a "
                f"checkpoint): {exc}") from exc
    _check_finite(obj, path)
    return obj


def read_checkpoint(source: str | os.PathLike | Mapping) -> tuple[dict[str, Tensor], dict | None]:
    """(flat state dict with `module.` prefixes removed, stored constructor config or None) of a file or a
    (possibly wrapped) mapping."""
    obj = source if isinstance(source, Mapping) else load_file(source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    config = obj.get(CONFIG_KEY) if isinstance(obj.get(CONFIG_KEY), Mapping) else None
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
    return sd, _checked_config(config, source)


def _checked_config(config: Mapping | None, source: object) -> dict | None:
    if config is None:
        return None
    unknown = sorted(set(config) - set(CONFIG_FIELDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown model config entries {unknown} (known: {list(CONFIG_FIELDS)})")
    return dict(config)


def read_state_dict(source: str | os.PathLike | Mapping) -> dict[str, Tensor]:
    """A flat state dict from a file or a (possibly wrapped) mapping, `module.` prefixes removed."""
    return read_checkpoint(source)[0]


def load_checkpoint(model: nn.Module, source: str | os.PathLike | Mapping, *, strict: bool = True) -> nn.Module:
    """Load weights into `model` in place and return it.

    Derived buffers come from the model when the checkpoint lacks them (slim) or has shift masks of another
    img_size (they are a cache). strict=True: any other missing or unexpected key is an error. strict=False
    (BasicSR's fine-tuning mode, e.g. x4 from x2): keys that are missing, unexpected or of another shape are
    skipped with a warning that counts them; a checkpoint of which no tensor fits is an error (another
    architecture, not a fine-tuning start).
    """
    sd = read_state_dict(source)
    own = model.state_dict()
    skipped: list[str] = []
    for k, v in own.items():
        if is_derived(k) and (k not in sd or (_is_mask(k) and sd[k].shape != v.shape)):
            sd[k] = v
    if not strict:
        skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
        for k in skipped:
            log.info("rgt: skipping %s: shape %s in the checkpoint, %s in the model", k, tuple(sd[k].shape),
                     tuple(own[k].shape))
            del sd[k]
        loaded = [k for k in sd if k in own and not is_derived(k)]
        if not loaded:
            raise ValueError(f"no weight of {_name(source)} fits {type(model).__name__} (0 of {len(own)} "
                             "tensors with the same name and shape): another architecture?")
    result = model.load_state_dict(sd, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys or skipped):
        log.warning("rgt: non-strict load of %s: %d tensors loaded, %d of another shape skipped, %d missing keys "
                    "%s, %d unexpected keys %s", _name(source), len(loaded), len(skipped), len(result.missing_keys),
                    result.missing_keys, len(result.unexpected_keys), result.unexpected_keys)
    return model


def _name(source: object) -> str:
    return "the state dict" if isinstance(source, Mapping) else str(source)


# ------------------------------------------------------------------------------------------------ writing


def model_config(model: nn.Module | Mapping) -> dict | None:
    """JSON-able constructor arguments of an RGT (module or full state dict), None when they cannot be told
    (another module, or a slim state dict whose window size is gone)."""
    from rgt.arch import RGT
    from rgt.detect import detect_config

    sd = model.state_dict() if isinstance(model, nn.Module) else model
    if not isinstance(model, RGT) and not any(k.endswith("rpe_biases") for k in sd):
        return None
    try:
        config = detect_config(sd)
    except ValueError:
        return None
    if isinstance(model, RGT):  # what shapes alone leave open
        config["img_range"] = float(model.img_range)
        config["num_heads"] = [int(layer.blocks[0].attn.num_heads) for layer in model.layers]
    return config


def official_masks(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`sd` with every shift mask replaced by the img_size=64 one of its window (read from the sibling
    `attns.{i}.rpe_biases`), the buffers the official code and spandrel expect."""
    from rgt.ops import reference

    out = dict(sd)
    for k, v in sd.items():
        if not _is_mask(k):
            continue
        prefix, branch = k.rsplit(".attn_mask_", 1)
        offsets = sd.get(f"{prefix}.attns.{branch}.rpe_biases")
        if offsets is None:
            continue
        hs, ws = int(offsets[:, 0].max()) + 1, int(offsets[:, 1].max()) + 1
        hp, wp = reference.padded_size(OFFICIAL_MASK_SIZE, OFFICIAL_MASK_SIZE, (hs, ws))
        out[k] = reference.shift_mask(hp, wp, hs, ws, torch.device("cpu"), v.dtype)
    return out


def save_checkpoint(model: nn.Module | Mapping, path: str | os.PathLike, *, slim: bool = False,
                    ema: nn.Module | Mapping | None = None, config: Mapping | None = None) -> Path:
    """Write weights atomically, with the model's constructor config (given or derived from `model`).

    `.pth`: BasicSR layout `{'params': sd, 'config': dict}` (+ `'params_ema'` when `ema` is given).
    `.safetensors`: one flat state dict (the EMA weights when given: the ones to run), with the config and a
    sha256 of the tensors as metadata. slim=True drops the derived buffers (masks, position tables), which
    `load_checkpoint` rebuilds; full files store the official 64x64 shift masks whatever the model's img_size.
    """
    path = Path(path)
    config = dict(config) if config is not None else model_config(model)

    def prepare(m):
        sd = m.state_dict() if isinstance(m, nn.Module) else dict(m)
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items() if not (slim and is_derived(k))}
        return official_masks(sd)

    def write(tmp: str) -> None:
        if path.suffix == ".safetensors":
            from safetensors.torch import save

            sd = prepare(ema if ema is not None else model)
            meta = {"format": "pt", "arch": "RGT", META_SHA256: tensor_digest(sd)}
            if config is not None:
                meta[META_CONFIG] = json.dumps(config)
            with open(tmp, "wb") as f:  # into atomic_write's file, keeping its mode (save_file would make 0600)
                f.write(save(sd, metadata=meta))
        else:
            payload: dict = {"params": prepare(model)}
            if ema is not None:
                payload["params_ema"] = prepare(ema)
            if config is not None:
                payload[CONFIG_KEY] = config
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
