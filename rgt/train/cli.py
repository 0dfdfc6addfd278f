r"""Train RGT super-resolution models (BasicSR-style options; one CPU to many GPUs through torchrun).

    python -m rgt.train                                   # bundled quickstart: small RGT, bundled photos, CPU ok
    python -m rgt.train -opt configs/train_RGT_S_x2.yml --set datasets.train.dataroot_gt=/data/DF2K/HR
    torchrun --nproc_per_node=4 -m rgt.train -opt configs/train_RGT_x2.yml --amp bf16 --auto-resume

Multi-node: the same command on every node with torchrun's rendezvous, e.g.
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=rgt \
        -m rgt.train -opt configs/train_RGT_x2.yml
"""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml
from tqdm import tqdm

from rgt._cli import KERNEL_MODES
from rgt.checkpoint import atomic_write
from rgt.train import distributed as dist_util
from rgt.train import state
from rgt.train.config import OptionError, load_options
from rgt.train.dataset import DataError
from rgt.train.experiment import ExperimentBusy
from rgt.train.loop import TrainingDiverged, experiment_root, session
from rgt.train.state import StateError
from rgt.train.validate import format_metrics

log = logging.getLogger("rgt.train")


class _TqdmHandler(logging.Handler):
    """Console log lines that do not break the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    head, _, examples = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m rgt.train", description=head,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples)
    p.add_argument("-opt", "--opt", default=None, help="BasicSR-style YAML (default: the bundled quickstart)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an option, e.g. --set train.total_iter=1000 (repeatable; YAML values)")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast (train.amp)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    p.add_argument("--kernels", choices=KERNEL_MODES, default=None,
                   help="model ops (default: the option file's `kernels`, else auto: fused where available)")
    p.add_argument("--auto-resume", "--auto_resume", action="store_true",
                   help="continue from the latest training state of this experiment, if any")
    p.add_argument("--resume", default=None, help="a training state to continue from (path.resume_state)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    # BasicSR compatibility: torchrun's environment decides; these are accepted and ignored.
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm"], default="none", help=argparse.SUPPRESS)
    p.add_argument("--local-rank", "--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _options(args: argparse.Namespace) -> dict:
    overrides = list(args.overrides)
    if args.amp:
        overrides.append(f"train.amp={args.amp}")
    if args.compile:
        overrides.append("train.compile=true")
    if args.kernels:
        overrides.append(f"kernels={args.kernels}")
    if args.cpu:
        overrides.append("num_gpu=0")
    if args.resume:
        overrides.append(f"path.resume_state={args.resume}")
    return load_options(args.opt, overrides)


def _setup_logging(main: bool) -> logging.handlers.MemoryHandler | None:
    """Console (INFO on rank 0, WARNING elsewhere) and, on rank 0, a buffer that `_log_to_file` empties into the
    log file once the experiment folder is settled (locked, archived); undone by _reset_logging."""
    logger = logging.getLogger("rgt")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = _TqdmHandler(logging.INFO if main else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers = [console]
    if not main:
        return None
    buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
    logger.addHandler(buffer)
    return buffer


def _log_to_file(buffer: logging.handlers.MemoryHandler, root: Path, name: str) -> Path:
    """Replace the buffer by the DEBUG log file `root/train_<name>.log`, with the buffered lines first."""
    path = root / f"train_{name}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    buffer.setTarget(handler)
    buffer.close()  # flushes into the file
    logger = logging.getLogger("rgt")
    logger.removeHandler(buffer)
    logger.addHandler(handler)
    return path


def _reset_logging() -> None:
    logger = logging.getLogger("rgt")
    for handler in logger.handlers:
        handler.close()
    logger.handlers, logger.propagate = [], True
    logger.setLevel(logging.NOTSET)


def _report(root: Path, result, log_file: Path | None, seconds: float) -> None:
    lines = [f"done: iteration {result.last_iter} reached in {seconds / 60:.1f} min; everything is in {root}"]
    if result.checkpoint:
        lines.append(f"  final weights:   {result.checkpoint}  (rgt.load_checkpoint(model, path))")
        lines.append(f"  training state:  {state.state_path(root, result.last_iter)}  (--auto-resume continues)")
    lines.append(f"  log:             {log_file}")
    lines.append(f"  options:         {root / 'options.yml'}")
    for name, values in result.metrics.items():
        lines.append(f"  validation {name}: {format_metrics(values)}")
    log.info("\n".join(lines))


class Interrupted(Exception):
    """Ctrl-C (SIGINT): the message says where the run stopped and how to continue."""


def run(args: argparse.Namespace) -> None:
    start = time.time()
    opt = _options(args)
    d = dist_util.setup(opt["num_gpu"])
    buffer, trainer = _setup_logging(d.is_main), None
    root = experiment_root(opt)
    try:
        log.info("experiment %s -> %s (%d process(es) on %s, %d x %d samples per step)", opt["name"], root, d.world,
                 d.device, opt["datasets"]["train"]["batch_size_per_gpu"] * d.world, opt["train"]["accumulate"])
        with session(opt, d, opt["path"]["resume_state"], args.auto_resume) as trainer:
            log_file = None
            if d.is_main:
                log_file = _log_to_file(buffer, root, opt["name"])
                text = yaml.safe_dump(opt, sort_keys=False)
                atomic_write(root / "options.yml", lambda tmp: Path(tmp).write_text(text))
            result = trainer.run()
        if d.is_main:
            _report(root, result, log_file, time.time() - start)
    except KeyboardInterrupt:
        newest = state.saved_states(root)
        where = f"at iteration {trainer.iter}" if trainer is not None else "before the first iteration"
        raise Interrupted(f"interrupted {where}; " + (
            f"the newest checkpoint is {newest[0]}: rerun with --auto-resume to continue from it" if newest
            else "no checkpoint was saved yet")) from None
    finally:
        _reset_logging()
        dist_util.cleanup(d)


def _one_line(exc: Exception) -> str:
    """The message of `exc`. An error re-raised from a data worker carries the worker's traceback, its own
    message last ('rgt.train.dataset.DataError: cannot read image ...'): that last line's message."""
    lines = str(exc).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(exc)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except Interrupted as exc:
        print(f"rgt.train: {exc}", file=sys.stderr)
        raise SystemExit(130) from None
    except (OptionError, DataError, StateError, TrainingDiverged, ExperimentBusy, FileNotFoundError) as exc:
        print(f"rgt.train: error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(2 if isinstance(exc, OptionError) else 1) from None
    except OSError as exc:  # the machine's doing, not a bug: a full disk, a path that cannot be written
        what = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
        if exc.errno == errno.ENOSPC:
            what += "; the previous checkpoint is intact: free some space and rerun with --auto-resume"
        elif exc.filename is None:
            raise
        print(f"rgt.train: error: {what}", file=sys.stderr)
        raise SystemExit(1) from None
