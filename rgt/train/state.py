"""Experiment folder, checkpoints and exact-resume training states.

    experiments/<name>/
      models/net_g_<iter>.pth          {'params': sd, 'params_ema': sd?}: loads in the official code and spandrel
      models/net_g_latest.pth          the final weights
      training_states/<iter>.state     optimizer, scheduler, RNG states of every rank, sampler position, iteration
      train_<name>.log, options.yml, train.lock (see rgt.train.experiment)

Every file is written to a temporary name and renamed, the model file before its state: a run killed at any moment
leaves the previous complete checkpoint as the latest one. Weights that are not finite are never saved, and a
resume checks what it loads: readable, a training state (not a model file), finite weights.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rgt.checkpoint import atomic_write, is_derived, load_file, save_checkpoint

log = logging.getLogger("rgt.train")

# What torch.load(weights_only=True) raises today for truncated, zero-byte, corrupt or non-tensor pickle files.
_LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError)


class StateError(ValueError):
    """A training state or model file that a run cannot resume from; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded, checked resume point: `training` from `state_file`, `weights` ({'params', 'params_ema'?}) from
    `model_file`."""

    state_file: Path
    model_file: Path
    training: dict
    weights: dict


def model_path(root: Path, it: int | str) -> Path:
    return root / "models" / f"net_g_{it}.pth"


def state_path(root: Path, it: int) -> Path:
    return root / "training_states" / f"{it}.state"


def atomic_save(obj: object, path: Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy, random): drop path and anything else random.
    numpy's key array is stored as a tensor so that the state loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key whose floating-point tensor holds a NaN or an Inf, else None."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def save(root: Path, it: int, model: torch.nn.Module, ema: torch.nn.Module | None, training: dict) -> Path:
    """Write models/net_g_<it>.pth, then training_states/<it>.state; returns the model file."""
    path = model_path(root, it)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, ema=ema)
    atomic_save({"iter": it, **training}, state_path(root, it))
    return path


def saved_states(root: Path) -> list[Path]:
    """The experiment's training states, newest first (unchecked)."""
    folder = root / "training_states"
    if not folder.is_dir():
        return []
    its = sorted((int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.state", p.name))),
                 reverse=True)
    return [state_path(root, it) for it in its]


def read_file(path: Path, what: str) -> dict:
    """torch.load(weights_only=True) of a dict; StateError naming `path` (and `what` it is) when that fails."""
    if not path.is_file():
        raise StateError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4" for foreign pickles: the error says it
            warnings.simplefilter("ignore", UserWarning)
            obj = load_file(path)  # zip CRCs and finite values checked; CheckpointError is a ValueError
    except _LOAD_ERRORS as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise StateError(f"{path}: cannot read this {what}, truncated or corrupt ({reason})") from None
    if not isinstance(obj, dict):
        raise StateError(f"{path}: not a {what} (a {type(obj).__name__})")
    return obj


def load_state(path: str | os.PathLike) -> Checkpoint:
    """Load and check a training state and its model file; StateError names the file at fault."""
    path = Path(path)
    training = read_file(path, "training state")
    if "iter" not in training or "optimizers" not in training:
        if "params" in training or "params_ema" in training or all(isinstance(v, torch.Tensor)
                                                                  for v in training.values()):
            raise StateError(f"{path} is a model file (weights), not a training state: --resume takes "
                             "experiments/<name>/training_states/<iter>.state; to start a new run from these "
                             "weights, set path.pretrain_network_g")
        raise StateError(f"{path} is not a training state of rgt.train (keys: {', '.join(map(str, training))})")
    model_file = model_path(path.parent.parent, training["iter"])
    weights = read_file(model_file, "model file")
    if not isinstance(weights.get("params"), dict):
        raise StateError(f"{model_file}: no 'params' entry, not a model file written by rgt.train")
    for key in ("params", "params_ema"):
        if (bad := non_finite(weights.get(key, {}))) is not None:
            raise StateError(f"{model_file}: {key}.{bad} holds NaN or Inf: these weights diverged")
    return Checkpoint(path, model_file, training, weights)


def latest_state(root: Path) -> Checkpoint | None:
    """The newest training state of the experiment that loads and passes load_state's checks (--auto-resume);
    newer unusable ones are skipped with a warning naming each."""
    skipped = []
    for path in saved_states(root):
        try:
            found = load_state(path)
        except StateError as exc:
            log.warning("--auto-resume: skipping %s", exc)
            skipped.append(path)
            continue
        if skipped:
            log.warning("--auto-resume: falling back to %s (iteration %d) past %d unusable newer state(s)",
                        path, found.training["iter"], len(skipped))
        return found
    if skipped:
        log.warning("--auto-resume: no usable training state in %s: starting from scratch", root)
    return None


def mismatch(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> str | None:
    """How `params` (learned tensors; derived buffers are rebuilt) fail to fit `model`, in a few words, or None:
    '12 tensors differ, e.g. conv_first.weight (36, 3, 3, 3) there, (48, 3, 3, 3) here'."""
    own = {k: v for k, v in model.state_dict().items() if not is_derived(k)}
    theirs = {k: v for k, v in params.items() if not is_derived(k)}
    differ = sorted(k for k in own.keys() | theirs.keys()
                    if k not in own or k not in theirs or own[k].shape != theirs[k].shape)
    if not differ:
        return None
    k = differ[0]
    there, here = (tuple(sd[k].shape) if k in sd else "absent" for sd in (theirs, own))
    return f"{len(differ)} tensors differ, e.g. {k} {there} there, {here} here"


def check_same_network(model: torch.nn.Module, params: dict[str, torch.Tensor], model_file: Path) -> None:
    """StateError in one line when `params` do not fit `model`: a run with other network_g options."""
    if (differ := mismatch(model, params)) is not None:
        raise StateError(f"{model_file} was trained with other network_g options: {differ}. Resume with that "
                         f"run's options ({model_file.parent.parent / 'options.yml'}), or start from its weights "
                         "with path.pretrain_network_g and strict_load_g: false")
