"""The training loop: iteration-based like BasicSR, DDP through torchrun, exact resume on CPU.

    result = train(load_options("configs/train_RGT_S_x2.yml"))

One iteration = `accumulate` micro-batches of `batch_size_per_gpu` per process, one optimizer step, one
scheduler step, one EMA update. Validation and checkpoints happen on rank 0 after iterations that are multiples
of their frequencies, and after the last one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rgt.checkpoint import load_checkpoint
from rgt.train import build, state
from rgt.train import distributed as dist_util
from rgt.train.dataset import patches_from_windows
from rgt.train.ema import EMA
from rgt.train.experiment import ExperimentLock, remove_leftovers
from rgt.train.validate import format_metrics, validate

log = logging.getLogger("rgt.train")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or Inf; the last good checkpoint was kept."""


@dataclass
class TrainResult:
    root: Path
    last_iter: int
    losses: dict[int, float] = field(default_factory=dict)  # iteration -> mean loss over ranks
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # last validation
    checkpoint: Path | None = None  # the final model file
    model: nn.Module | None = None  # unwrapped, on its device
    ema: nn.Module | None = None


def batch_to_device(batch: dict, opt: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A training loader's batch as (lq, gt) on the device; HR-only windows (degrade_on device) are degraded
    there."""
    if "hr" in batch:
        scale = opt["scale"]
        return patches_from_windows(batch, scale, int(opt["datasets"]["train"]["gt_size"]) // scale, device)
    return batch["lq"].to(device, non_blocking=True), batch["gt"].to(device, non_blocking=True)


def experiment_root(opt: dict) -> Path:
    return Path(opt["path"]["experiments_root"] or Path("experiments") / opt["name"])


class Trainer:
    """Holds the run's objects; `run()` trains from the current iteration to train.total_iter."""

    def __init__(self, opt: dict, d: dist_util.Dist, resume: state.Checkpoint | str | Path | None = None):
        self.opt, self.d, self.root = opt, d, experiment_root(opt)
        if opt["num_threads"]:
            torch.set_num_threads(int(opt["num_threads"]))
        seed = int(opt["manual_seed"])
        torch.manual_seed(seed)  # identical initial weights on every rank
        self.net = build.model(opt, d.device)
        for line in build.kernel_report(self.net, d.device):
            log.info("kernels=%s: %s", self.net.kernels, line)
        on_device = build.degrade_on_device(opt, d.device)  # also rejects degrade_on: device for paired data
        if opt["datasets"]["train"]["type"] == "HROnlyDataset":
            log.info("HR-only data: MATLAB-exact bicubic LR made %s",
                     f"on {d.device} in the training loop" if on_device else "in the data workers (CPU)")
        self.optim = build.optimizer(opt, self.net.parameters())
        self.sched = build.scheduler(opt, self.optim)
        self.criterion = build.loss(opt)
        decay = float(opt["train"]["ema_decay"] or 0.0)
        self.ema = EMA(self.net, decay) if decay > 0 else None
        self.iter, self.position, self.rng = 0, 0, None  # position: training samples this rank has drawn
        if resume:
            self._resume(resume if isinstance(resume, state.Checkpoint) else state.load_state(resume))
        torch.manual_seed(seed + d.rank)  # BasicSR: per-rank randomness (drop path) from seed + rank
        if self.rng is not None:
            state.set_rng_state(self.rng)
        self.wrapped = self._wrap()
        self.train_set = build.train_set(opt, d.device)
        self.val_sets = build.val_sets(opt, d.device) if d.is_main else {}
        self.tb = None  # opened by run(): nothing is written into the folder before then

    def _wrap(self) -> nn.Module:
        """DDP (kept as self.ddp for no_sync), then torch.compile if asked: the module the steps call."""
        net, self.ddp = self.net, None
        if self.d.enabled:
            ids = [self.d.device.index] if self.d.device.type == "cuda" else None
            # RGT's buffers are constants (shift masks, position tables: ~95 MB for RGT-S): no per-step broadcast.
            net = self.ddp = DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False,
                                                     gradient_as_bucket_view=True)
        if self.opt["train"]["compile"]:
            net = torch.compile(net)
        return net

    def _resume(self, ckpt: state.Checkpoint) -> None:
        training, weights = ckpt.training, ckpt.weights
        state.check_same_network(self.net, weights["params"], ckpt.model_file)
        load_checkpoint(self.net, {"params": weights["params"]})
        if self.ema is not None:
            load_checkpoint(self.ema.module, {"params": weights.get("params_ema", weights["params"])})
        self.optim.load_state_dict(training["optimizers"][0])
        self.sched.load_state_dict(training["schedulers"][0])
        self.iter, self.position = int(training["iter"]), int(training["sampler_position"])
        rngs = training.get("rng", [])
        if len(rngs) == self.d.world:
            self.rng = rngs[self.d.rank]
        else:
            log.warning("resuming with %d processes from a state of %d: fresh RNG streams", self.d.world, len(rngs))
        log.info("resumed from %s (iteration %d, model %s)", ckpt.state_file, self.iter, ckpt.model_file)

    @property
    def samples_per_iter(self) -> int:
        return int(self.opt["datasets"]["train"]["batch_size_per_gpu"]) * self.opt["train"]["accumulate"]

    def _autocast(self):
        if self.opt["train"]["amp"] == "bf16":
            return torch.autocast(self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batches) -> torch.Tensor:
        """Forward and backward over `accumulate` micro-batches; returns this rank's loss, a 0-d tensor."""
        n = self.opt["train"]["accumulate"]
        self.optim.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.d.device)
        for k in range(n):
            lq, gt = batch_to_device(next(batches), self.opt, self.d.device)
            # gradients are all-reduced on the last micro-batch only
            sync = k == n - 1 or self.ddp is None
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                loss = self.criterion(self.wrapped(lq), gt) / n
            loss.backward()
            total += loss.detach()
        return total

    def _finish_step(self, loss: torch.Tensor) -> float:
        """Check the loss on every rank, clip, step; returns the loss averaged over ranks."""
        mean = dist_util.mean(self.d, loss).item()
        if not math.isfinite(mean):
            raise self._diverged(f"loss is {mean} at iteration {self.iter + 1}")
        clip = float(self.opt["train"]["grad_clip"] or 0.0)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        self.optim.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.net)
        return mean

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error for a NaN/Inf, naming the newest checkpoint whose weights load and are finite."""
        last = state.latest_state(self.root) if self.d.is_main else None
        return TrainingDiverged(
            f"{what}: training stopped. Last good checkpoint: "
            f"{last.state_file if last else 'none yet'} (resume with --auto-resume after lowering train.optim_g.lr "
            "or setting train.grad_clip; --amp bf16 can also overflow less than fp16 but more than fp32)"
        )

    def save(self) -> Path | None:
        """Rank 0 writes the model file and the state; every rank contributes its RNG state. Weights that are
        not finite (a blow-up the loss has not shown yet) are never saved: TrainingDiverged instead."""
        for name, module in (("weights", self.net), ("EMA weights", self.ema.module if self.ema else None)):
            if module is not None and (bad := state.non_finite(module.state_dict())) is not None:
                raise self._diverged(f"{name} hold NaN or Inf ({bad}) after iteration {self.iter}, not saved")
        rngs = [None] * self.d.world
        if self.d.enabled:
            torch.distributed.all_gather_object(rngs, state.rng_state())
        else:
            rngs = [state.rng_state()]
        path = None
        if self.d.is_main:
            training = {"optimizers": [self.optim.state_dict()], "schedulers": [self.sched.state_dict()],
                        "rng": rngs, "sampler_position": self.position}
            path = state.save(self.root, self.iter, self.net, self.ema.module if self.ema else None, training)
            if self.tb is not None:  # a killed run keeps its curves up to the checkpoint it resumes from
                self.tb.flush()
        dist_util.barrier(self.d)
        return path

    def validate(self) -> dict:
        results = {}
        if self.d.is_main and self.val_sets:
            net = self.ema.module if self.ema is not None else self.net
            results = validate(net, self.val_sets, self.opt["val"]["metrics"], self.opt["scale"], self.d.device)
            for name, values in results.items():
                log.info("val %s @ %d: %s", name, self.iter, format_metrics(values))
                if self.tb is not None:
                    for key, v in values.items():
                        self.tb.add_scalar(f"metrics/{name}/{key}", v, self.iter)
        dist_util.barrier(self.d)
        return results

    def run(self) -> TrainResult:
        total, o = self.opt["train"]["total_iter"], self.opt
        result = TrainResult(self.root, self.iter)
        self.tb = _tensorboard(o, self.root) if self.d.is_main else None
        batches = build.train_loader(o, self.d, start=self.position, ds=self.train_set)
        bar = tqdm(total=total, initial=self.iter, disable=not self.d.is_main, dynamic_ncols=True, unit="it")
        t0, it0 = time.time(), self.iter
        self.net.train()
        try:  # on any exit (Ctrl-C too) the bar ends its line and TensorBoard keeps what it has
            while self.iter < total:
                loss = self._finish_step(self.step(batches))
                self.iter, self.position = self.iter + 1, self.position + self.samples_per_iter
                result.losses[self.iter] = loss
                lr = self.optim.param_groups[0]["lr"]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                self._log(loss, lr, t0, it0, total)
                last = self.iter == total
                if last or self.iter % o["logger"]["save_checkpoint_freq"] == 0:
                    result.checkpoint = self.save()
                if last or self.iter % o["val"]["val_freq"] == 0:
                    result.metrics = self.validate() or result.metrics
                    self.net.train()
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
        result.last_iter, result.model = self.iter, self.net
        result.ema = self.ema.module if self.ema is not None else None
        return result

    def _log(self, loss: float, lr: float, t0: float, it0: int, total: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar("losses/l_pix", loss, self.iter)
            self.tb.add_scalar("lr", lr, self.iter)
        if self.iter % self.opt["logger"]["print_freq"] and self.iter != total:
            return
        rate = (self.iter - it0) / max(time.time() - t0, 1e-9)
        eta = (total - self.iter) / rate if rate > 0 else float("inf")
        log.debug("iter %d/%d loss %.5f lr %.3e %.2f it/s eta %s", self.iter, total, loss, lr, rate,
                  time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?")


def _tensorboard(opt: dict, root: Path):
    if not opt["logger"]["use_tb_logger"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logger.use_tb_logger is set but TensorBoard is not installed (pip install tensorboard)")
        return None
    return SummaryWriter(str(root / "tb"))


@contextlib.contextmanager
def session(opt: dict, d: dist_util.Dist, resume: str | Path | None = None,
            auto_resume: bool = False) -> Iterator[Trainer]:
    """A Trainer ready to run, with the experiment folder locked until exit (rank 0 holds the lock).

    Before anything is written: leftovers of interrupted writes are removed, the resume point is loaded and
    checked (`resume`, else with `auto_resume` the newest usable state), and the Trainer checks the model and
    every image. Then, when not resuming, a used folder is archived. ExperimentBusy when another run holds it.
    """
    root, lock = experiment_root(opt), None
    try:
        point = None
        if d.is_main:
            lock = ExperimentLock.acquire(root)
            for p in remove_leftovers(root):
                log.info("removed %s, left by an interrupted write", p)
            point = state.load_state(resume) if resume else state.latest_state(root) if auto_resume else None
        path = dist_util.broadcast(d, point.state_file if point else None)
        if point is None and path is not None:
            point = state.load_state(path)
        trainer = Trainer(opt, d, point)
        if lock is not None and point is None and (archived := lock.archive()) is not None:
            log.info("not resuming: the previous run in %s was moved to %s (--auto-resume continues a run)", root,
                     archived)
        dist_util.barrier(d)
        yield trainer
    finally:
        if lock is not None:
            lock.release()


def train(opt: dict, *, resume: str | Path | None = None) -> TrainResult:
    """Train with checked options (see rgt.train.config.load_options); joins torchrun's process group if any.
    Without `resume`, a previous run in the experiment folder is archived (see rgt.train.experiment)."""
    d = dist_util.setup(opt["num_gpu"])
    try:
        with session(opt, d, resume) as trainer:
            return trainer.run()
    finally:
        dist_util.cleanup(d)
