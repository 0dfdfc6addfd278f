"""Whole-model benchmark: RGT-S and RGT upscaling whole images (x2, x4), and a training step, per provider.

Providers run in one process on identical weights and inputs; each is checked against the first one that ran
(the reference where it fits) before it is timed:
- reference: kernels="reference" (plain PyTorch; materialises RG-SA's N x N' scores, so it is skipped where
  those would exceed --max-scores-gb);
- portable: kernels="portable" (rgt.ops.portable: chunked SDPA attentions, the F.conv2d recursion);
- auto: kernels="auto" (the fused Triton attentions where they run, the C++ recursive dwconv; on a CPU the
  attentions are the portable ones);
- <provider>+compile: torch.compile of the above (with --compile; always on a GPU);
- official: spandrel's verbatim copy of the official code, when spandrel imports (it needs torchvision);
  skipped with a note otherwise, and skipped like the reference where its scores would not fit;
- official+heap (CPU inference): the official code with its residual groups inside rgt's heap policy, as RGT's
  own forward runs them on a CPU (rgt.heap), to show how much of the gain over it is the allocator.

Timing: providers are interleaved, one call each per round, so load from other processes hits them alike;
ms per image is the median over rounds (CUDA: do_bench). Peak memory: CUDA max_memory_allocated; on a CPU the
process RSS sampled every 2 ms during the check call (peak, and above the RSS before it; the allocator may keep
earlier providers' memory, so the peak of one provider can include what another left).

    python bench/model.py [--quick] [--models rgt_s rgt] [--scales 2 4] [--sizes 64x64 256x256 750x1000]
                          [--providers official official+heap reference portable auto] [--compile]
                          [--rounds N] [--out FILE]
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

import rgt  # noqa: E402
from rgt import heap  # noqa: E402
from rgt.arch.rgsa import recursion_depth  # noqa: E402
from rgt.inference.upscaler import is_out_of_memory  # noqa: E402

PROVIDERS = ("reference", "portable", "auto", "official", "official+heap")
TINY = dict(embed_dim=36, depth=[2, 2], num_heads=[6, 6], mlp_ratio=2, split_size=[8, 32], c_ratio=0.5)
FP32_TOL = 1e-4  # max relative output error between providers in fp32 (measured: see the JSON records)


def model_kwargs(name: str, scale: int) -> dict:
    return dict(TINY, upscale=scale) if name == "tiny" else rgt.models.config(name, scale)


def official_class():
    """spandrel's copy of the official RGT class, or the reason it cannot be imported."""
    try:
        from spandrel.architectures.RGT.__arch.rgt import RGT as Official
    except Exception as exc:  # ImportError, or torchvision failing inside spandrel's imports
        return None, f"spandrel not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return Official, None


def scores_gb(kwargs: dict, H: int, W: int, batch: int = 1) -> float:
    """GB that the reference's largest attention scores take (RG-SA's B x heads x N x N' in fp32)."""
    t = recursion_depth(H, W, False)
    n_rep = (H // 4**t) * (W // 4**t)
    return batch * kwargs["num_heads"][0] * H * W * n_rep * 4 / 1e9


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled by a thread (Linux /proc)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self.before = interval_s, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.before = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def call_with_peak(fn, device: torch.device):
    """(fn(), peak-memory fields): CPU: RSS sampled during this very call, so the check call measures it; CUDA:
    max_memory_allocated of a second call (cheap there)."""
    if device.type == "cuda":
        return fn(), _harness.peak_memory_gb(fn)
    if not Path("/proc/self/statm").exists():
        return fn(), {}
    with PeakRSS() as m:
        out = fn()
    return out, {"peak_rss_gb": m.peak / 2**30, "extra_rss_gb": (m.peak - m.before) / 2**30}


def build_providers(kwargs: dict, names: list[str], compile_: bool, device: torch.device, H: int, W: int,
                    max_scores_gb: float) -> tuple[dict, dict]:
    """({provider: model}, {provider: why skipped}) on identical seeded weights."""
    torch.manual_seed(0)
    base = rgt.RGT(**kwargs, kernels="reference").to(device)
    models, skipped = {}, {}
    too_big = scores_gb(kwargs, H, W) > max_scores_gb
    for name in names:
        if name in ("reference", "official", "official+heap") and too_big:
            skipped[name] = (f"its RG-SA scores need {scores_gb(kwargs, H, W):.1f} GB (> --max-scores-gb "
                             f"{max_scores_gb})")
            continue
        if name.startswith("official"):
            cls, why = official_class()
            if cls is None:
                skipped[name] = why
                continue
            net = cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}).to(device)
            net.load_state_dict(base.state_dict(), strict=True)
            if name == "official+heap":
                net.forward_features = with_heap_policy(net.forward_features)
        else:
            net = copy.deepcopy(base)
            net.set_kernels(name)
        models[name] = net
    if compile_:
        for name in [n for n in models if not n.startswith("official")]:
            models[f"{name}+compile"] = torch.compile(models[name])
    return models, skipped


def autocast(dtype: str, device: torch.device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_harness.DTYPES[dtype])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(fns: dict, device: torch.device, rounds: int, quick: bool) -> dict:
    """{name: {"ms_p50", "ms_p20", "ms_p80"}}: do_bench per provider on CUDA; on a CPU `rounds` rounds of one
    call per provider each (the check call before was the warm-up)."""
    if device.type == "cuda":
        return {n: _harness.time_ms(fn, device, quick=quick) for n, fn in fns.items()}
    times: dict = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for n, ts in times.items():
        cuts = statistics.quantiles(ts, n=100, method="inclusive") if len(ts) > 1 else [ts[0]] * 99
        out[n] = {"ms_p50": statistics.median(ts), "ms_p20": cuts[19], "ms_p80": cuts[79], "rounds": len(ts)}
    return out


def run_case(records: list, case: dict, fns: dict, skipped: dict, device: torch.device, args, batch: int):
    """Check every provider against the first that runs, time the ones that pass (interleaved), print and
    append one record per provider."""
    recs, ok, expected = [], {}, None
    tol = FP32_TOL if args.dtype == "fp32" else 2e-2
    for name, fn in fns.items():
        rec = dict(case, provider=name)
        recs.append(rec)
        try:
            t0 = time.perf_counter()
            out, peak = call_with_peak(fn, device)
            sync(device)
            check_ms = (time.perf_counter() - t0) * 1e3
            rec["checked_against"] = next(iter(ok), None)
            rec["max_rel_err"] = 0.0 if expected is None else _harness.max_rel_err(out, expected)
            expected = out if expected is None else expected
            if rec["max_rel_err"] > tol:
                rec["status"] = f"mismatch (tolerance {tol})"
                continue
            rec.update(peak, status="ok")
            ok[name] = fn
            if args.rounds == 0:  # a CPU run too long to repeat: the check calls, interleaved, are the timing
                rec.update(ms_p50=check_ms, ms_p20=check_ms, ms_p80=check_ms, rounds=0)
        except Exception as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rec["status"] = "oom" if is_out_of_memory(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
    recs += [dict(case, provider=name, status=f"skipped: {why}") for name, why in skipped.items()]
    timings = interleaved_ms(ok, device, args.rounds, args.quick) if args.rounds else {
        r["provider"]: {k: r[k] for k in ("ms_p50", "ms_p20", "ms_p80", "rounds")} for r in recs if "ms_p50" in r}
    baselines = {key: timings[name]["ms_p50"] for name, key in (("official", "speedup_vs_official"),
                 ("official+heap", "speedup_vs_official_heap")) if name in timings}
    for rec in recs:
        if rec["provider"] in timings:
            rec.update(timings[rec["provider"]])
            rec["images_per_s"] = batch / (rec["ms_p50"] / 1e3)
            rec.update({key: ms / rec["ms_p50"] for key, ms in baselines.items()})
        print(line(rec), flush=True)
    records += recs


def line(r: dict) -> str:
    timing = ""
    if "ms_p50" in r:
        mem = r.get("peak_rss_gb", r.get("peak_mem_gb"))
        timing = (f"{r['ms_p50']:10.1f} ms {r['images_per_s']:8.3f} img/s"
                  + (f" peak {mem:5.2f} GB" if mem is not None else "")
                  + (f" {r['speedup_vs_official']:5.2f}x official" if "speedup_vs_official" in r else "")
                  + (f" {r['speedup_vs_official_heap']:5.2f}x +heap" if "speedup_vs_official_heap" in r else ""))
    err = f"err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""
    return (f"{r['model']:>6} x{r['scale']} {r['mode']:>9} {r['size']:>9} {r['provider']:>18} {timing:<58} "
            f"{err:<12} {r['status']}")


def with_heap_policy(forward_features):
    """The official forward_features (its residual groups and norm) inside rgt.heap's policy, as RGT's own."""
    def wrapped(x):
        with heap.for_inference(x):
            return forward_features(x)
    return wrapped


def inference_fn(net, x: torch.Tensor, dtype: str, device: torch.device):
    def fn():
        with torch.inference_mode(), autocast(dtype, device):
            return net(x).float()
    return fn


def train_fn(net, lq: torch.Tensor, gt: torch.Tensor, dtype: str, device: torch.device):
    """One step (forward, L1, backward, SGD without momentum so every provider keeps identical weights up to
    rounding); returns the loss and the first conv's weight gradient, which are compared across providers."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)

    def fn():
        opt.zero_grad(set_to_none=True)
        with autocast(dtype, device):
            out = net(lq)
        loss = torch.nn.functional.l1_loss(out.float(), gt)
        loss.backward()
        opt.step()
        first = net._orig_mod if hasattr(net, "_orig_mod") else net
        return first.conv_first.weight.grad.detach().clone()
    return fn


def parse_size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: expected HxW such as 256x256, got {s!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> None:
    parser = _harness.arg_parser(__doc__, "model", "the tiny config at 32x32 (x2) and a training step at "
                                 "batch 1, eager providers only: a smoke run", ["fp32", "bf16"])
    parser.add_argument("--models", nargs="+", choices=("rgt_s", "rgt", "tiny"))
    parser.add_argument("--scales", nargs="+", type=int, choices=(2, 3, 4))
    parser.add_argument("--sizes", nargs="+", help="LR input sizes HxW (default: 64x64 256x256, and "
                        "750x1000 on a GPU)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--compile", action="store_true", help="add torch.compile of each (default on a GPU)")
    parser.add_argument("--rounds", type=int, help="CPU: timed calls per provider (default 1 quick, 3 else; 0: "
                        "time the check calls themselves, which are interleaved too)")
    parser.add_argument("--train-batch", type=int, help="training step batch of 64x64 LR patches "
                        "(default 8 on a GPU, 1 on a CPU)")
    parser.add_argument("--no-train", action="store_true", help="skip the training step")
    parser.add_argument("--max-scores-gb", type=float, help="skip reference/official where RG-SA scores "
                        "exceed this (default: 4 on a CPU, 40%% of GPU memory)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = args.models or (["tiny"] if args.quick else ["rgt_s", "rgt"])
    scales = args.scales or ([2] if args.quick else [2, 4])
    sizes = [parse_size(s) for s in (args.sizes or (["32x32"] if args.quick else
                                                     ["64x64", "256x256"] + (["750x1000"] if cuda else [])))]
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    compile_ = args.compile or (cuda and not args.quick)
    if args.max_scores_gb is None:
        args.max_scores_gb = 0.4 * torch.cuda.get_device_properties(0).total_memory / 1e9 if cuda else 4.0
    train_batch = args.train_batch or (8 if cuda else 1)
    patch = 32 if args.quick else 64
    official_note = official_class()[1]
    # the header is taken before the run, which can last hours on a CPU: the code (git sha) it describes
    head = _harness.header(quick=args.quick, rounds=args.rounds, compile=compile_,
                           official=official_note or "spandrel " + _version("spandrel"),
                           note=("CPU: providers interleaved per round on a shared machine; peak = sampled RSS"
                                 if not cuda else None))
    records: list[dict] = []
    g = torch.Generator().manual_seed(0)
    for name in models:
        for scale in scales:
            kwargs = model_kwargs(name, scale)
            for H, W in sizes:
                fns_models, skipped = build_providers(kwargs, args.providers, compile_, device, H, W,
                                                      args.max_scores_gb)
                x = torch.rand(1, 3, H, W, generator=g).to(device)
                fns = {p: inference_fn(m.eval(), x, args.dtype, device) for p, m in fns_models.items()}
                case = dict(model=name, scale=scale, mode="inference", size=f"{H}x{W}", batch=1, dtype=args.dtype)
                run_case(records, case, fns, skipped, device, args, 1)
                del fns, fns_models
            if args.no_train:
                continue
            # no stochastic depth, so that every provider computes the same step
            train_providers = [p for p in args.providers if p != "official+heap"]  # the policy is for inference
            fns_models, skipped = build_providers(dict(kwargs, drop_path_rate=0.0), train_providers, compile_,
                                                  device, patch, patch, 1e9)
            lq = torch.rand(train_batch, 3, patch, patch, generator=g).to(device)
            gt = torch.rand(train_batch, 3, patch * scale, patch * scale, generator=g).to(device)
            fns = {p: train_fn(m, lq, gt, args.dtype, device) for p, m in fns_models.items()}
            case = dict(model=name, scale=scale, mode="train", size=f"{train_batch}x{patch}x{patch}",
                        batch=train_batch, dtype=args.dtype)
            run_case(records, case, fns, skipped, device, args, train_batch)
            del fns, fns_models
    head["load_average_1m_at_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    path = _harness.result_path("model", args.out)
    _harness.save(path, head, records)
    print(f"wrote {path}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
