"""Training-data throughput: samples/s that rgt.train's loader delivers to the device, to set against the
training step's (bench/train_step.py). The loader must keep up with the step, or the GPU waits.

For an option file's training set (default: the bundled quickstart photographs, 252 px, x2, so decoding costs
far less than for 2K DF2K images), each number of data workers and, for HR-only data, each place the bicubic
degradation runs (`degrade_on: worker` in the CPU workers, `device` in the training loop), the time to draw
batches and put (lq, gt) on the device, after the first batch (worker start-up) is excluded.

    python bench/data.py [-opt FILE.yml] [--set KEY=VALUE ...] [--workers 0,2,4] [--batches 30] [--quick]
                         [--out FILE.json]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

from rgt.train import build, load_options  # noqa: E402
from rgt.train.distributed import setup  # noqa: E402
from rgt.train.loop import batch_to_device  # noqa: E402


def measure(opt: dict, batches: int) -> dict:
    """{'samples_per_s', 'ms_per_batch', 'first_batch_s'} of the training loader of `opt` on its device."""
    d = setup(opt["num_gpu"])
    loader = build.train_loader(opt, d, start=0)
    t0 = time.perf_counter()
    batch_to_device(next(loader), opt, d.device)
    first = time.perf_counter() - t0
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        lq, _ = batch_to_device(next(loader), opt, d.device)
    if d.device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / batches
    return {"samples_per_s": lq.shape[0] / dt, "ms_per_batch": dt * 1e3, "first_batch_s": first}


def main(argv: list[str] | None = None) -> None:
    parser = _harness.arg_parser(__doc__, "data", "workers 0 only, 5 batches")
    parser.add_argument("-opt", help="BasicSR-style option file (default: the bundled quickstart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="option override")
    parser.add_argument("--workers", default="0,2,4", help="comma-separated numbers of data workers")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per case")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    # the quickstart's batch of 4 is for CPU training; time the official per-GPU batch of 8 on a GPU
    overrides = [*(["datasets.train.batch_size_per_gpu=8"] if cuda and not args.opt else []), *args.set]
    base = load_options(args.opt, overrides)
    workers = [0] if args.quick else [int(w) for w in args.workers.split(",")]
    batches = 5 if args.quick else args.batches
    places = ["worker", "device"] if base["datasets"]["train"]["type"] == "HROnlyDataset" else ["auto"]
    records = []
    for place in places:
        for w in workers:
            opt = load_options(args.opt, [*overrides, f"datasets.train.num_worker_per_gpu={w}",
                                          f"datasets.train.degrade_on={place}"])
            cfg = opt["datasets"]["train"]
            rec = {"degrade_on": place, "workers": w, "batch": int(cfg["batch_size_per_gpu"]),
                   "gt_size": int(cfg["gt_size"]), "scale": opt["scale"], **measure(opt, batches)}
            records.append(rec)
            print(f"degrade_on {place:>6}  workers {w}  batch {rec['batch']}x{rec['gt_size']}px: "
                  f"{rec['samples_per_s']:8.1f} samples/s  {rec['ms_per_batch']:7.1f} ms/batch", flush=True)
    cfg = base["datasets"]["train"]
    head = _harness.header(data=cfg["dataroot_gt"], dataset_type=cfg["type"], quick=args.quick, batches=batches,
                           device="cuda" if cuda else "cpu")
    path = _harness.result_path("data", args.out)
    _harness.save(path, head, records)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
