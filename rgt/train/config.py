"""Training options: BasicSR-style YAML, checked against a schema, with command-line overrides.

The official RGT option files (`options/train/train_RGT*_x*.yml`) load unchanged apart from the dataset paths.
Every key is checked: a misspelt key is an error naming it, not a silently ignored option. Keys BasicSR uses
but this trainer has no use for (`io_backend`, `prefetch_mode`, `wandb`, ...) are accepted and ignored.

    opt = load_options("configs/train_RGT_x2.yml", ["train.total_iter=1000", "datasets.train.batch_size_per_gpu=4"])
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ANY = object()  # a leaf whose value is free-form (e.g. a dict the trainer passes on)
ASSETS_PREFIX = "assets://"  # paths inside the installed package's rgt/assets folder

_DATASET = {
    "name": "train",
    "type": "PairedImageDataset",  # or "HROnlyDataset": LR made on the fly with MATLAB-exact bicubic
    "task": ANY,
    "dataroot_gt": None,
    "dataroot_lq": None,  # None: HR only, degraded on the fly
    "degrade_on": "auto",  # HR only: where the bicubic runs, "worker" (CPU), "device" or "auto" (device on GPUs)
    "filename_tmpl": "{}",
    "io_backend": ANY,
    "meta_info_file": None,
    "gt_size": 128,
    "use_hflip": True,
    "use_rot": True,
    "use_shuffle": True,
    "num_worker_per_gpu": 4,
    "batch_size_per_gpu": 8,
    "dataset_enlarge_ratio": 1,
    "prefetch_mode": ANY,
    "pin_memory": ANY,
}
_VAL_DATASET = {k: _DATASET[k] for k in ("name", "type", "task", "dataroot_gt", "dataroot_lq", "filename_tmpl",
                                         "io_backend", "meta_info_file")}
DEGRADE_ON = ("auto", "worker", "device")
_METRIC = {"type": "calculate_psnr", "crop_border": None, "test_y_channel": True, "better": "higher"}

SCHEMA: dict[str, Any] = {
    "name": "rgt_train",
    "model_type": "RGTModel",
    "scale": 4,
    "num_gpu": "auto",
    "manual_seed": 10,
    "kernels": "auto",  # model ops: "auto" (fused where available), "reference" or "fused"
    "num_threads": None,  # CPU intra-op threads per process (torch.set_num_threads); None: torch's default
    "is_train": ANY,
    "dist": ANY,
    "datasets": {"train": _DATASET},  # plus any number of val* / test* entries (see _VAL_DATASET)
    "network_g": ANY,  # {type: RGT, **constructor kwargs}, checked against rgt.RGT's signature
    "path": {
        "pretrain_network_g": None,
        "param_key_g": "params",
        "strict_load_g": True,
        "resume_state": None,
        "experiments_root": None,  # default: experiments/<name>
    },
    "train": {
        "optim_g": {"type": "Adam", "lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.99]},
        "scheduler": {"type": "MultiStepLR", "milestones": [], "gamma": 0.5},
        "total_iter": 500000,
        "warmup_iter": -1,
        "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"},
        "ema_decay": 0.0,
        "grad_clip": 0.0,  # max global gradient norm; 0 = off
        "accumulate": 1,  # micro-batches per optimizer step
        "amp": None,  # None or "bf16"
        "compile": False,
    },
    "val": {"val_freq": 5000, "save_img": False, "suffix": ANY, "pbar": ANY, "metrics": ANY},
    "logger": {
        "print_freq": 100,
        "save_checkpoint_freq": 5000,
        "use_tb_logger": False,
        "wandb": ANY,
    },
    "dist_params": {"backend": ANY, "port": ANY},
}


class OptionError(ValueError):
    """An option file or override that does not fit the schema: the message names the key."""


def _is_eval_set(key: str) -> bool:
    return key.startswith(("val", "test"))


def _check(value: Any, schema: Any, where: str) -> None:
    """Raise OptionError at the first key of `value` that `schema` does not know."""
    if where == "val.metrics" and isinstance(value, Mapping):  # {metric name: {type, crop_border, ...}}
        for name, metric in value.items():
            _check(metric or {}, _METRIC, f"{where}.{name}")
        return
    if schema is ANY or not isinstance(schema, dict):
        return
    if not isinstance(value, Mapping):
        raise OptionError(f"option {where!r} must be a mapping, got {type(value).__name__}: {value!r}")
    for key, sub in value.items():
        path = f"{where}.{key}" if where else str(key)
        if where == "datasets" and key != "train" and sub is None:
            continue  # `--set datasets.val=~` removes a validation set
        if where == "datasets" and _is_eval_set(str(key)):
            _check(sub, _VAL_DATASET, path)
        elif key in schema:
            _check(sub, schema[key], path)
        else:
            known = sorted(schema) + (["val*", "test*"] if where == "datasets" else [])
            raise OptionError(f"unknown option {path!r}; known keys here: {', '.join(known)}")


def _defaults(schema: Any) -> Any:
    if schema is ANY:
        return None
    if isinstance(schema, dict):
        return {k: _defaults(v) for k, v in schema.items()}
    return copy.deepcopy(schema)


def _merge(base: dict, update: Mapping) -> dict:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def apply_override(opt: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML: 1e-4, [1, 2], true, ~) set in place; the key must exist."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise OptionError(f"--set expects KEY=VALUE with a dotted key, got {assignment!r}")
    value = yaml.safe_load(raw) if raw.strip() else None
    node = opt
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise OptionError(f"--set {key}: {part!r} is not a mapping")
    node[parts[-1]] = value
    _check({parts[0]: opt[parts[0]]}, SCHEMA, "")


def _resolve_paths(opt: dict) -> None:
    """`assets://x` -> the packaged file; `~` and environment variables expanded everywhere."""
    assets = resources.files("rgt") / "assets"

    def fix(v):
        if not isinstance(v, str) or not v:
            return v
        if v.startswith(ASSETS_PREFIX):
            return str(Path(str(assets)) / v[len(ASSETS_PREFIX):])
        return os.path.expanduser(os.path.expandvars(v))

    for ds in opt["datasets"].values():
        for k in ("dataroot_gt", "dataroot_lq", "meta_info_file"):
            ds[k] = fix(ds.get(k))
    for k in ("pretrain_network_g", "resume_state", "experiments_root"):
        opt["path"][k] = fix(opt["path"].get(k))


def _check_network(net: Any) -> dict:
    """network_g without `type`, its keys checked against rgt.RGT's constructor."""
    from rgt.arch import RGT

    if not isinstance(net, Mapping):
        raise OptionError("option 'network_g' is required: {type: RGT, upscale: ..., embed_dim: ...}")
    net = dict(net)
    kind = net.pop("type", "RGT")
    if kind != "RGT":
        raise OptionError(f"network_g.type must be RGT, got {kind!r}")
    known = set(inspect.signature(RGT.__init__).parameters) - {"self", "kwargs", "act_layer", "norm_layer"}
    for key in net:
        if key not in known:
            raise OptionError(f"unknown option 'network_g.{key}'; rgt.RGT accepts: {', '.join(sorted(known))}")
    return net


# Numeric options: (dotted key, int or float, bounds as (operator, limit) pairs). A value may be written as a
# string that parses (YAML 1.1 reads 1e-4 without a dot as a string; BasicSR files write !!float for that reason),
# and an int option accepts an integral float (5e3). `_OPTIONAL` gives the value ~ stands for, where it is allowed.
_NUMBERS: tuple[tuple[str, type, tuple[tuple[str, float], ...]], ...] = (
    ("scale", int, ((">=", 1),)),
    ("manual_seed", int, ((">=", 0),)),
    ("num_threads", int, ((">=", 1),)),
    ("datasets.train.gt_size", int, ((">=", 1),)),
    ("datasets.train.batch_size_per_gpu", int, ((">=", 1),)),
    ("datasets.train.num_worker_per_gpu", int, ((">=", 0),)),
    ("datasets.train.dataset_enlarge_ratio", int, ((">=", 1),)),
    ("train.total_iter", int, ((">=", 1),)),
    ("train.accumulate", int, ((">=", 1),)),
    ("train.warmup_iter", int, ()),
    ("train.optim_g.lr", float, ((">", 0),)),
    ("train.optim_g.weight_decay", float, ((">=", 0),)),
    ("train.scheduler.gamma", float, ((">", 0),)),
    ("train.pixel_opt.loss_weight", float, ((">", 0),)),  # negative: training would maximise the error
    ("train.ema_decay", float, ((">=", 0), ("<", 1))),
    ("train.grad_clip", float, ((">=", 0),)),
    ("val.val_freq", int, ((">=", 1),)),
    ("logger.print_freq", int, ((">=", 1),)),
    ("logger.save_checkpoint_freq", int, ((">=", 1),)),
)
_OPTIONAL = {"num_threads": None, "train.ema_decay": 0.0, "train.grad_clip": 0.0, "train.optim_g.weight_decay": 0.0}
_LISTS = (("train.optim_g.betas", float, ((">=", 0), ("<", 1)), 2),
          ("train.scheduler.milestones", int, ((">=", 1),), None))  # (key, kind, bounds, length)
_COMPARE = {">=": float.__ge__, ">": float.__gt__, "<": float.__lt__}


def _number(value: Any, kind: type, bounds: tuple[tuple[str, float], ...], key: str) -> int | float:
    """`value` as `kind` within `bounds`, else OptionError naming the key, the constraint and the value."""
    want = " and ".join(f"{op} {limit:g}" for op, limit in bounds)
    what = f"option {key} must be {'an integer' if kind is int else 'a number'}{' ' + want if want else ''}"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"{what}, got {value!r}") from None
    if not all(_COMPARE[op](number, float(limit)) for op, limit in bounds):
        raise OptionError(f"{what}, got {value!r}")
    return int(number) if kind is int else number


def _check_numbers(opt: dict) -> None:
    """Convert and range-check every numeric option in place (see _NUMBERS)."""
    def node(key: str) -> tuple[dict, str]:
        *parents, leaf = key.split(".")
        d = opt
        for part in parents:
            d = d[part]
        return d, leaf

    for key, kind, bounds in _NUMBERS:
        d, leaf = node(key)
        if d.get(leaf) is None and key in _OPTIONAL:
            d[leaf] = _OPTIONAL[key]
        else:
            d[leaf] = _number(d.get(leaf), kind, bounds, key)
    for key, kind, bounds, length in _LISTS:
        d, leaf = node(key)
        value = d.get(leaf)
        if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
            raise OptionError(f"option {key} must be a list{f' of {length}' if length else ''}, got {value!r}")
        d[leaf] = [_number(v, kind, bounds, f"{key}[{i}]") for i, v in enumerate(d[leaf])]


def finalize(opt: dict) -> dict:
    """Fill defaults and check what the schema cannot: numbers and their ranges, network keys, metric types."""
    opt = _merge(_defaults(SCHEMA), opt)
    opt["datasets"] = {k: v for k, v in opt["datasets"].items() if v is not None}
    for key, ds in opt["datasets"].items():
        if key != "train":
            opt["datasets"][key] = _merge(_defaults(_VAL_DATASET), ds)
    _check_numbers(opt)
    opt["network_g"] = _check_network(opt.get("network_g"))
    scale = opt["network_g"].setdefault("upscale", opt["scale"])
    if scale != opt["scale"]:
        raise OptionError(f"network_g.upscale ({scale}) differs from scale ({opt['scale']})")
    metrics = opt["val"]["metrics"] or {"psnr": {"type": "calculate_psnr"}}
    opt["val"]["metrics"] = {name: _merge(_defaults(_METRIC), m or {}) for name, m in metrics.items()}
    for name, m in opt["val"]["metrics"].items():
        if m["type"] not in ("calculate_psnr", "calculate_ssim"):
            raise OptionError(f"val.metrics.{name}.type must be calculate_psnr or calculate_ssim, got {m['type']!r}")
    if opt["datasets"]["train"]["degrade_on"] not in DEGRADE_ON:
        raise OptionError(f"datasets.train.degrade_on must be one of {', '.join(DEGRADE_ON)}, "
                          f"got {opt['datasets']['train']['degrade_on']!r}")
    if opt["train"]["amp"] not in (None, "bf16"):
        raise OptionError(f"train.amp must be ~ or bf16, got {opt['train']['amp']!r}")
    return opt


def load_options(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML option file (None: the bundled quickstart), apply `a.b=value` overrides, check, fill defaults."""
    if path is None:
        text = (resources.files("rgt") / "assets" / "quickstart.yml").read_text()
        source = Path("<quickstart>")
    else:
        source = Path(path)
        if not source.is_file():
            raise OptionError(f"option file not found: {source}")
        text = source.read_text()
    try:
        opt = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:  # one line: the problem and where (str(exc) quotes the text over 3-6 lines)
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise OptionError(f"{source}: not valid YAML{where}: {problem}") from None
    try:
        _check(opt, SCHEMA, "")
        for assignment in overrides:
            apply_override(opt, assignment)
        opt = finalize(opt)
    except OptionError as exc:
        raise OptionError(f"{source}: {exc}") from exc
    _resolve_paths(opt)
    return opt
