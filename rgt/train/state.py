"""Experiment folder, checkpoints and exact-resume training states.

    experiments/<name>/
      models/net_g_<iter>.pth          {'params': sd, 'params_ema': sd?}: loads in the official code and spandrel
      models/net_g_latest.pth          the final weights
      training_states/<iter>.state     optimizer, scheduler, RNG states of every rank, sampler position, iteration
      train_<name>.log, options.yml

Every file is written to a temporary name and renamed, the model file before its state: a run killed at any moment
leaves the previous complete checkpoint as the latest one.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from rgt.checkpoint import atomic_write, load_file, save_checkpoint


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


def save(root: Path, it: int, model: torch.nn.Module, ema: torch.nn.Module | None, training: dict) -> Path:
    """Write models/net_g_<it>.pth, then training_states/<it>.state; returns the model file."""
    path = model_path(root, it)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, ema=ema)
    atomic_save({"iter": it, **training}, state_path(root, it))
    return path


def latest_state(root: Path) -> Path | None:
    """The training state with the highest iteration whose model file exists (for --auto-resume)."""
    folder = root / "training_states"
    if not folder.is_dir():
        return None
    its = sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.state", p.name)))
    for it in reversed(its):
        if model_path(root, it).is_file():
            return state_path(root, it)
    return None


def load_state(path: str | os.PathLike) -> tuple[dict, Path]:
    """(training state, its model file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume state not found: {path}")
    state = load_file(path)
    model_file = model_path(path.parent.parent, state["iter"])
    if not model_file.is_file():
        raise FileNotFoundError(f"{path} belongs to iteration {state['iter']} but {model_file} is missing")
    return state, model_file
