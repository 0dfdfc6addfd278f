"""Every ```bash and ```python block of README.md runs as written, on the CPU, so the README cannot drift.

The blocks run in order, from a temporary folder laid out like the clone's root: `rgt` (a link to the package,
with the bundled photographs in rgt/assets/images) and, standing in for what the quick start trains, an
untrained model of the quickstart's architecture at the path the trainer writes. The install lines
(`pip install ...`, including the quick start's, which also starts its training) are what CI itself runs
(.ci/run installs the test extra, which holds every optional dependency), so they are the only ones left out.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _utils import REPO

import rgt
from rgt.train.config import load_options

BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^## (.+)$", re.MULTILINE)
INSTALL = re.compile(r"^pip install ")  # CI installs rgt with the test extra, which has every optional dependency
QUICKSTART_MODEL = Path("experiments/quickstart_RGT_x2/models/net_g_latest.pth")


def readme_blocks() -> list:
    """pytest params (language, code) in README order, named by their section; install lines dropped."""
    text = (REPO / "README.md").read_text()
    params, count = [], {}
    for m in BLOCK.finditer(text):
        lang, code = m[1], m[2]
        if lang == "bash":
            code = "\n".join(line for line in code.splitlines() if not INSTALL.match(line))
        if not code.strip():
            continue
        section = ([h for h in HEADING.finditer(text, 0, m.start())] or [None])[-1]
        name = section[1].split(":")[0].replace(" ", "-") if section else "top"
        count[name] = count.get(name, 0) + 1
        params.append(pytest.param(lang, code, id=f"{name}-{count[name]}"))
    return params


def test_the_blocks_are_found():
    """The README has an API example and command lines (a parser that found nothing would pass everything)."""
    langs = [p.values[0] for p in readme_blocks()]
    assert "python" in langs and "bash" in langs


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    root = tmp_path_factory.mktemp("clone")
    (root / "rgt").symlink_to(REPO / "rgt", target_is_directory=True)  # as in a clone: `import rgt` finds it
    torch.manual_seed(0)
    net_g = {k: v for k, v in load_options(None)["network_g"].items() if k != "type"}
    rgt.save_checkpoint(rgt.RGT(**net_g), root / QUICKSTART_MODEL)
    return root


@pytest.mark.parametrize("lang, code", readme_blocks())
def test_readme_block_runs(clone, lang, code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's shell, not the test's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` is this one
    command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, f"README block failed:\n{code}\n{output}"
