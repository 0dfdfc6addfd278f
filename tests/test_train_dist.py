"""Distributed and fused-path training on CPU: 2-process DDP over Gloo, fused vs reference training steps."""

import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from _utils import TINY, deterministic_fill, gen

import rgt
from rgt.ops import dwconv, rgsa, rwin
from rgt.train import load_options

WORKER = textwrap.dedent("""
    import os, sys, torch
    from rgt.train import load_options, train
    result = train(load_options(None, sys.argv[2:]))
    sd = {k: v.clone() for k, v in result.model.state_dict().items()}
    torch.save({"params": sd, "losses": result.losses}, os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(mode: str, args: list[str], env: dict) -> list[subprocess.Popen]:
    """torchrun: one agent with 2 processes, or two agents ('nodes') with 1 each meeting through the c10d
    rendezvous, as the README's multi-node command does across machines."""
    run = [sys.executable, "-m", "torch.distributed.run"]
    if mode == "standalone":
        return [subprocess.Popen([*run, "--standalone", "--nproc_per_node=2", *args], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_id=rgt_test",
            f"--rdzv_endpoint=127.0.0.1:{_free_port()}"]
    return [subprocess.Popen([*run, *rdzv, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]


@pytest.mark.parametrize("mode", ["standalone", "two_nodes"])
def test_ddp_two_processes_gloo(tmp_path, mode):
    """2 CPU processes under torchrun (one agent, or two agents joined by the c10d rendezvous): DDP keeps every
    rank's parameters identical; rank 0 alone checkpoints."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    root = tmp_path / "exp"
    overrides = ["num_gpu=0", "kernels=reference", "datasets.train.gt_size=32", "datasets.train.batch_size_per_gpu=1",
                 "datasets.train.num_worker_per_gpu=0", "datasets.val=~", "train.total_iter=3", "train.accumulate=2",
                 "logger.save_checkpoint_freq=3", f"path.experiments_root={root}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = _launch(mode, [str(script), str(tmp_path), *overrides], env)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["losses"] == r1["losses"] and sorted(r0["losses"]) == [1, 2, 3]  # the mean over ranks
    ckpt = torch.load(root / "models" / "net_g_3.pth", weights_only=True)["params"]
    torch.manual_seed(10)  # the quickstart's manual_seed: the initial weights of the run
    start = rgt.RGT(**load_options(None)["network_g"])
    moved = False
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
        # the file's shift masks are the img_size=64 ones (spandrel loads them), not the run's cache
        assert k.rsplit(".", 1)[-1] in ("attn_mask_0", "attn_mask_1") or torch.equal(v, ckpt[k]), k
        moved |= not torch.equal(v, start.state_dict()[k])
    assert moved
    assert sorted(p.name for p in (root / "training_states").iterdir()) == ["3.state"]


def _fused_reasons() -> dict[str, str | None]:
    x = torch.empty(1)
    return {op.name: ("not implemented yet" if op.fused is None else op.unavailable(x))
            for op in (rwin.OP, rgsa.OP, dwconv.OP)}


def test_fused_training_steps_match_reference():
    """An Adam step on the tiny config: the fused path's loss and gradients equal the reference's, and so does
    the loss after the step."""
    reasons = _fused_reasons()
    if all(r is not None for r in reasons.values()):
        pytest.skip(f"no fused op can run here: {reasons}")
    torch.manual_seed(0)
    ref = rgt.RGT(**{**TINY, "depth": [2], "num_heads": [6]}, drop_path_rate=0.0, kernels="reference")
    deterministic_fill(ref)
    fused = copy.deepcopy(ref)
    fused.set_kernels("auto")
    g = gen("train_fused_vs_reference")
    lq, gt = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 3, 32, 32, generator=g)
    losses = []
    for model in (ref, fused):
        loss = torch.nn.functional.l1_loss(model(lq), gt)
        loss.backward()
        losses.append(loss.detach())
        torch.optim.Adam(model.parameters(), 1e-3).step()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    with torch.no_grad():
        after = [torch.nn.functional.l1_loss(model(lq), gt) for model in (ref, fused)]
    torch.testing.assert_close(after[1], after[0], rtol=1e-5, atol=1e-6)
