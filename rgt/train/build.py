"""Objects a run is made of, built from the checked options: model, optimizer, scheduler, loss, data loaders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rgt.arch import RGT
from rgt.checkpoint import load_checkpoint, read_state_dict
from rgt.train import state
from rgt.train.config import OptionError
from rgt.train.datacheck import check_dataset
from rgt.train.dataset import InfiniteSampler, SRDataset, collate
from rgt.train.distributed import Dist

log = logging.getLogger("rgt.train")


def model(opt: dict, device: torch.device) -> RGT:
    """rgt.RGT from network_g (official init), with path.pretrain_network_g loaded when set."""
    net = RGT(**opt["network_g"], kernels=opt["kernels"])
    path = opt["path"]
    if path["pretrain_network_g"]:
        source = Path(path["pretrain_network_g"])
        key = path["param_key_g"]
        try:
            raw = state.read_file(source, "model file") if source.suffix != ".safetensors" else None
            sd = read_state_dict(raw[key] if isinstance(raw, dict) and isinstance(raw.get(key), dict) else source)
        except ValueError as exc:  # StateError, or read_state_dict's errors: unreadable, not a state dict
            raise OptionError(f"path.pretrain_network_g: {exc}") from None
        strict = bool(path["strict_load_g"])
        if strict and (differ := state.mismatch(net, sd)) is not None:
            raise OptionError(f"path.pretrain_network_g: {source} does not fit network_g ({differ}); set "
                              "path.strict_load_g: false to load only the tensors that fit (fine-tuning)")
        log.info("loading %s (param_key_g %s, strict_load_g %s)", source, key, strict)
        load_checkpoint(net, sd, strict=strict)
    return net.to(device)


def kernel_report(net: RGT, device: torch.device) -> list[str]:
    """One line per op: which implementation kernels=<mode> runs on this device, and why."""
    from rgt.ops import dwconv, rgsa, rwin

    x = torch.empty(1, device=device)
    lines = []
    for op in (rwin.OP, rgsa.OP, dwconv.OP):
        mode = "auto" if net.kernels == "fused" else net.kernels  # "fused" would raise here, not report
        path, reason = op.path(mode, x)
        lines.append(f"{op.name}: {path}" + (f" ({reason})" if reason else ""))
    return lines


def optimizer(opt: dict, params) -> torch.optim.Optimizer:
    cfg = dict(opt["train"]["optim_g"])
    kind = cfg.pop("type")
    classes = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}
    if kind not in classes:
        raise OptionError(f"train.optim_g.type must be one of {sorted(classes)}, got {kind!r}")
    cfg["lr"], cfg["weight_decay"] = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0))
    return classes[kind](params, **cfg)


def scheduler(opt: dict, optim: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    cfg = opt["train"]["scheduler"]
    if cfg["type"] != "MultiStepLR":
        raise OptionError(f"train.scheduler.type must be MultiStepLR, got {cfg['type']!r}")
    if int(opt["train"]["warmup_iter"]) > 0:
        raise OptionError("train.warmup_iter > 0 is not supported (the official recipe has no warmup)")
    milestones = [int(float(m)) for m in cfg["milestones"]]
    return torch.optim.lr_scheduler.MultiStepLR(optim, milestones, gamma=float(cfg["gamma"]))


def loss(opt: dict) -> nn.Module:
    cfg = opt["train"]["pixel_opt"]
    classes = {"L1Loss": nn.L1Loss, "MSELoss": nn.MSELoss}
    if cfg["type"] not in classes:
        raise OptionError(f"train.pixel_opt.type must be one of {sorted(classes)}, got {cfg['type']!r}")
    base, weight = classes[cfg["type"]](reduction=cfg["reduction"]), float(cfg["loss_weight"])
    return _Weighted(base, weight)


class _Weighted(nn.Module):
    def __init__(self, base: nn.Module, weight: float):
        super().__init__()
        self.base, self.weight = base, weight

    def forward(self, out: Tensor, target: Tensor) -> Tensor:
        return self.weight * self.base(out.float(), target.float())


def _dataset(cfg: dict, scale: int, gt_size: int | None, degrade_on_device: bool = False) -> SRDataset:
    if cfg["type"] not in ("PairedImageDataset", "HROnlyDataset"):
        raise OptionError(f"dataset type must be PairedImageDataset or HROnlyDataset, got {cfg['type']!r}")
    if cfg["meta_info_file"]:
        raise OptionError("meta_info_file is not supported: point dataroot_gt/dataroot_lq at image folders")
    if not cfg["dataroot_gt"]:
        raise OptionError(f"datasets.{cfg['name']}: dataroot_gt is required")
    lq = cfg["dataroot_lq"] if cfg["type"] == "PairedImageDataset" else None
    return SRDataset(cfg["dataroot_gt"], lq, scale, filename_tmpl=cfg["filename_tmpl"], gt_size=gt_size,
                     hflip=bool(cfg.get("use_hflip", True)), rot=bool(cfg.get("use_rot", True)),
                     degrade_on_device=degrade_on_device)


def degrade_on_device(opt: dict, device: torch.device) -> bool:
    """Whether HR-only training data is degraded by the training loop on `device` rather than in the workers:
    datasets.train.degrade_on, where "auto" means on GPUs (the float64 resize is cheap there and frees the CPU
    workers, which then only decode and crop)."""
    cfg = opt["datasets"]["train"]
    if cfg["type"] != "HROnlyDataset":
        if cfg["degrade_on"] == "device":
            raise OptionError("datasets.train.degrade_on: device applies to HROnlyDataset (LR made on the fly); "
                              f"this training set is {cfg['type']}")
        return False
    return cfg["degrade_on"] == "device" or (cfg["degrade_on"] == "auto" and device.type == "cuda")


def train_set(opt: dict, device: torch.device) -> SRDataset:
    """The training dataset, every image checked (rgt.train.datacheck)."""
    cfg = opt["datasets"]["train"]
    ds = _dataset(cfg, opt["scale"], int(cfg["gt_size"]), degrade_on_device(opt, device))
    check_dataset(ds, "train")
    return ds


def train_loader(opt: dict, d: Dist, start: int, ds: SRDataset | None = None) -> Iterator[dict]:
    """An endless iterator of batches for this rank, starting at sample position `start` of the rank's stream
    (resume): {'lq': (B, 3, p, p), 'gt': (B, 3, sp, sp)}, or HR windows for `patches_from_windows` when the
    degradation runs on the device. `ds`: the training set when already built (default: build and check it)."""
    cfg = opt["datasets"]["train"]
    ds = ds if ds is not None else train_set(opt, d.device)
    sampler = InfiniteSampler(len(ds), seed=int(opt["manual_seed"]), rank=d.rank, world=d.world,
                              shuffle=bool(cfg["use_shuffle"]), enlarge=int(cfg["dataset_enlarge_ratio"]),
                              start=start)
    workers = int(cfg["num_worker_per_gpu"])
    loader = DataLoader(ds, batch_size=int(cfg["batch_size_per_gpu"]), sampler=sampler, num_workers=workers,
                        collate_fn=collate, pin_memory=d.device.type == "cuda", drop_last=True,
                        persistent_workers=False, prefetch_factor=2 if workers else None,
                        # A private generator: the loader's base seed must not consume the global RNG that
                        # drop path uses, or a resumed run would draw different masks.
                        generator=torch.Generator().manual_seed(int(opt["manual_seed"])))
    return iter(loader)


def val_sets(opt: dict, device: torch.device) -> dict[str, SRDataset]:
    """The val*/test* datasets by name, whole images, every image checked; HR-only ones are degraded on the
    device when it is CUDA."""
    sets = {}
    for key, cfg in opt["datasets"].items():
        if key != "train":
            sets[cfg["name"] or key] = ds = _dataset(cfg, opt["scale"], None, device.type == "cuda")
            check_dataset(ds, key)
    return sets
