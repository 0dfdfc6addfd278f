"""Shared test helpers: reproducible per-case generators and the paths of the shared reference material."""

import os
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RGT_SHARED", REPO.parent / "shared"))


def gen(case_id: str) -> torch.Generator:
    """A generator seeded from a stable hash of the case name (str hash() changes per process)."""
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))
