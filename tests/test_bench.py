"""The benchmark scripts run end to end (`--quick`, on whatever device is here) and write well-formed results.

On a CPU-only machine this is attention's correctness-only pass through the Triton interpreter, the dwconv
timing of the C++ kernel against the F.conv2d chain, and the tiny-config training step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    # as typed on a command line: conftest's TRITON_INTERPRET would send the training step through the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    result = json.loads(out.read_text())
    head = result["header"]
    assert head["torch"] == torch.__version__ and head["hardware"] and head["utc"]
    assert result["records"]
    return result


def test_attention_bench(tmp_path):
    result = run_bench("attention", tmp_path)
    ops = {r["op"] for r in result["records"] if "op" in r}
    assert {"rgsa_attention", "rwin_attention"} <= ops
    for r in result["records"]:
        assert r["status"].startswith("ok"), r
    fused = [r for r in result["records"] if r["provider"] == "fused"]
    assert fused and all(max(r["max_rel_err"].values()) < 1e-5 for r in fused)


def test_dwconv_bench(tmp_path):
    result = run_bench("dwconv", tmp_path)
    providers = {r["provider"] for r in result["records"]}
    assert {"reference", "fused"} <= providers
    for r in result["records"]:
        assert r["ms_p50"] > 0, r
        tol = {"reference": 0.0, "fp32": 1e-5, "bf16": 2e-2}[r["provider"] if r["provider"] == "reference"
                                                            else r["dtype"]]  # bf16: against bf16 F.conv2d
        assert max(r["max_rel_err_vs_reference"].values()) <= tol, r


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU pass times RGT-S at batch 8: a benchmark, not a test")
def test_train_step_bench(tmp_path):
    result = run_bench("train_step", tmp_path)
    assert {r["kernels"] for r in result["records"]} == {"reference", "auto"}
    assert all(r["it_per_s"] > 0 and r["batch"] == 2 for r in result["records"])


def test_model_bench(tmp_path):
    """Whole-model providers on identical weights: each checked against the first (the reference) before timing."""
    result = run_bench("model", tmp_path)
    records = {(r["mode"], r["provider"]): r for r in result["records"]}
    for mode in ("inference", "train"):
        for provider in ("reference", "portable", "auto"):
            r = records[(mode, provider)]
            assert r["status"] == "ok" and r["ms_p50"] > 0 and r["images_per_s"] > 0, r
            assert r["max_rel_err"] <= 1e-4, r  # fp32 vs the fp32 reference; measured <= 2.3e-7
            assert r["peak_rss_gb"] > 0 or torch.cuda.is_available(), r
        assert records[(mode, "official")]["status"].startswith(("ok", "skipped")), records[(mode, "official")]
    heap = records[("inference", "official+heap")]
    assert heap["status"] == records[("inference", "official")]["status"], heap
    assert ("train", "official+heap") not in records  # the heap policy is rgt's inference path


def test_data_bench(tmp_path):
    result = run_bench("data", tmp_path)
    assert [r["degrade_on"] for r in result["records"]] == ["worker", "device"]  # the quickstart is HR only
    assert all(r["samples_per_s"] > 0 and r["workers"] == 0 for r in result["records"])
