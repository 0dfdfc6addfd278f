"""rgt.train on CPU: options, data, EMA, quickstart smoke, checkpoints, fine-tuning, NaN stop."""

import logging
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

import rgt
from rgt.train import DataError, OptionError, TrainingDiverged, load_options, train
from rgt.train.build import degrade_on_device
from rgt.train.cli import main
from rgt.train.dataset import InfiniteSampler, SRDataset, collate, context_window, dihedral, patches_from_windows
from rgt.train.distributed import setup
from rgt.train.ema import EMA
from rgt.train.loop import Trainer
from rgt.train.validate import validate

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(rgt.__file__).parent / "assets"
TINY_RUN = ("num_gpu=0", "kernels=reference", "datasets.train.gt_size=32", "datasets.train.batch_size_per_gpu=2",
            "datasets.train.num_worker_per_gpu=0", "val.val_freq=1000", "logger.print_freq=1")


def tiny_opt(tmp_path: Path, *overrides: str) -> dict:
    """The quickstart with 16-px LR patches, batch 2, no validation set unless asked."""
    return load_options(None, [*TINY_RUN, f"path.experiments_root={tmp_path / 'exp'}", "datasets.val=~",
                               *overrides])


# ------------------------------------------------------------------------------------------------ options


def test_official_configs_parse():
    opt = load_options(REPO / "configs" / "train_RGT_S_x4.yml")
    assert opt["network_g"]["depth"] == [6] * 6 and opt["network_g"]["upscale"] == 4
    assert opt["datasets"]["train"]["gt_size"] == 256 and opt["datasets"]["train"]["filename_tmpl"] == "{}x4"
    assert opt["train"]["scheduler"]["milestones"] == [250000, 400000, 450000, 475000]
    assert opt["path"]["strict_load_g"] is False and opt["path"]["pretrain_network_g"].endswith("RGT_S_x2.pth")
    assert opt["val"]["val_freq"] == 5000 and opt["val"]["metrics"]["psnr"]["crop_border"] == 4
    for name in ("RGT", "RGT_S"):
        for s in (2, 3, 4):
            o = load_options(REPO / "configs" / f"train_{name}_x{s}.yml")
            assert o["scale"] == s and o["datasets"]["train"]["gt_size"] == 64 * s
            assert len(o["network_g"]["depth"]) == (8 if name == "RGT" else 6)
    assert (REPO / "configs" / "quickstart.yml").read_text() == (ASSETS / "quickstart.yml").read_text()


def test_overrides():
    opt = load_options(REPO / "configs" / "train_RGT_x2.yml",
                       ["train.total_iter=1000", "train.optim_g.lr=1e-4", "train.scheduler.milestones=[500, 800]",
                        "datasets.train.dataroot_gt=/data/HR"])
    assert opt["train"]["total_iter"] == 1000 and opt["train"]["optim_g"]["lr"] == 1e-4
    assert opt["train"]["scheduler"]["milestones"] == [500, 800]
    assert opt["datasets"]["train"]["dataroot_gt"] == "/data/HR"


@pytest.mark.parametrize("doc, key", [
    ({"train": {"optim_g": {"lrr": 1}}}, "train.optim_g.lrr"),
    ({"trian": {}}, "trian"),
    ({"network_g": {"type": "RGT", "embed_dims": 60}}, "network_g.embed_dims"),
    ({"datasets": {"val_1": {"dataroot_gt": "x", "gt_size": 64}}}, "datasets.val_1.gt_size"),
    ({"val": {"metrics": {"psnr": {"crop": 4}}}}, "val.metrics.psnr.crop"),
])
def test_unknown_keys_rejected(tmp_path, doc, key):
    base = yaml.safe_load((REPO / "configs" / "train_RGT_x2.yml").read_text())
    for k, v in doc.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(base.get(k), dict) else v
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(base))
    with pytest.raises(OptionError, match=f"'{key}'"):
        load_options(path)


@pytest.mark.parametrize("override, message", [
    ("train.optim_g.lr=fast", "train.optim_g.lr must be a number > 0, got 'fast'"),
    ("train.optim_g.lr=-0.001", "train.optim_g.lr must be a number > 0, got -0.001"),
    ("datasets.train.batch_size_per_gpu=0", "datasets.train.batch_size_per_gpu must be an integer >= 1, got 0"),
    ("datasets.train.batch_size_per_gpu=2.5", "datasets.train.batch_size_per_gpu must be an integer >= 1, got 2.5"),
    ("val.val_freq=0", "val.val_freq must be an integer >= 1, got 0"),
    ("logger.save_checkpoint_freq=0", "logger.save_checkpoint_freq must be an integer >= 1, got 0"),
    ("train.pixel_opt.loss_weight=-1", "train.pixel_opt.loss_weight must be a number > 0, got -1"),
    ("train.total_iter=[5]", "train.total_iter must be an integer >= 1, got [5]"),
    ("train.ema_decay=1", "train.ema_decay must be a number >= 0 and < 1, got 1"),
    ("train.optim_g.betas=[0.9]", "train.optim_g.betas must be a list of 2, got [0.9]"),
    ("train.scheduler.milestones=[100, x]", "train.scheduler.milestones[1] must be an integer >= 1, got 'x'"),
    ("scale=true", "scale must be an integer >= 1, got True"),
])
def test_bad_numbers_rejected_in_one_line(capsys, override, message):
    """Strings where numbers go, out-of-range values (a negative loss weight would maximise the error, val_freq 0
    divided by zero after the first iteration): exit 2 with one line naming the option, before any work."""
    with pytest.raises(SystemExit) as exc:
        main(["--set", override])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == f"rgt.train: error: <quickstart>: option {message}\n"


def test_numbers_as_basicsr_writes_them():
    opt = load_options(None, ["train.optim_g.lr='2e-4'", "train.total_iter=5e3", "train.grad_clip=~",
                              "num_threads=~"])
    assert opt["train"]["optim_g"]["lr"] == 2e-4 and opt["train"]["total_iter"] == 5000
    assert opt["train"]["grad_clip"] == 0.0 and opt["num_threads"] is None


def test_override_unknown_key_rejected():
    with pytest.raises(OptionError, match="'train.totl_iter'"):
        load_options(None, ["train.totl_iter=5"])
    with pytest.raises(OptionError, match="KEY=VALUE"):
        load_options(None, ["train.total_iter"])


# --------------------------------------------------------------------------------------------------- data


def _window_item(hr: Tensor, scale: int, top: int, left: int, p: int) -> dict:
    """An HR-only training item (no flips) for the LR patch at (top, left) of the whole HR image."""
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    (t0, th), (l0, tw) = context_window(h, top, p), context_window(w, left, p)
    window = hr[:, scale * t0:scale * (t0 + th), scale * l0:scale * (l0 + tw)]
    return {"hr": window, "offset": torch.tensor((top - t0, left - l0)), "flips": torch.zeros(3, dtype=torch.bool)}


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_hr_only_patch_equals_crop_of_degraded_image(scale):
    """Degrading a window of patch + margin gives exactly the crop of the whole degraded image, at the borders
    (where the window slides inside the image) and in an image shorter than the window (whole axis)."""
    gen = torch.Generator().manual_seed(scale)
    photo = SRDataset(ASSETS / "images" / "val", None, scale)._whole(0)["gt"]
    short = photo[:, : scale * 20, : scale * 45]  # 20 LR rows < p + 2 * MARGIN
    p = 16
    for hr in (photo, short):
        whole = rgt.data.bicubic_degrade(torch.round(hr * 255).to(torch.uint8), scale).float() / 255
        hh, ww = whole.shape[-2:]
        corners = [(0, 0), (hh - p, ww - p), (1, ww - p - 2), (hh - p - 1, 2)]
        corners += [tuple(int(torch.randint(0, n - p + 1, (), generator=gen)) for n in (hh, ww)) for _ in range(4)]
        items = [_window_item(hr, scale, top, left, p) for top, left in corners]
        assert len({tuple(i["hr"].shape) for i in items}) == 1  # fixed window size: one batched resize
        lq, gt = patches_from_windows(collate(items), scale, p)
        for k, (top, left) in enumerate(corners):
            assert torch.equal(lq[k], whole[:, top:top + p, left:left + p]), (top, left)
            assert torch.equal(gt[k], hr[:, scale * top:scale * (top + p), scale * left:scale * (left + p)])


def _hr_only_dir(tmp_path: Path) -> Path:
    """Two photos and a crop of one that is shorter than the context window of 16-px LR patches at x2."""
    folder = tmp_path / "hr"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        rgt.data.write_image(folder / f"{name}.png", rgt.data.read_image(ASSETS / "images" / "val" / f"{name}.png")
                             .image)
    rgt.data.write_image(folder / "strip.png", rgt.data.read_image(folder / "coffee.png").image[:, 100:141, 7:200])
    return folder


def test_device_degradation_equals_worker_degradation(tmp_path):
    """degrade_on_device items, batched and degraded by the training loop's function, are bit-identical to the
    workers' (lq, gt) for the same sample keys: augmentations, borders and odd-sized windows included."""
    folder = _hr_only_dir(tmp_path)
    worker = SRDataset(folder, None, 2, gt_size=32)
    device = SRDataset(folder, None, 2, gt_size=32, degrade_on_device=True)
    keys = [(i % 3, (5, 0, i)) for i in range(12)]
    items = [device[k] for k in keys]
    assert "lq" not in items[0] and len({tuple(i["hr"].shape) for i in items}) == 2
    batch = collate(items)
    assert isinstance(batch["hr"], list)  # mixed window sizes: one resize per window
    lq, gt = patches_from_windows(batch, 2, 16, torch.device("cpu"))
    expected = collate([worker[k] for k in keys])
    assert torch.equal(lq, expected["lq"]) and torch.equal(gt, expected["gt"])
    assert batch["flips"].any() and not batch["flips"].all()  # the keys did draw augmentations
    # and each LR patch is the bicubic image of its HR patch, whatever the flips (away from the patch border,
    # where the whole image's context differs; 1 LSB for rounding ties summed in mirrored order)
    own = rgt.data.bicubic_degrade(torch.round(gt * 255).to(torch.uint8), 2).float() / 255
    assert (own - lq)[..., 3:-3, 3:-3].abs().max() <= 1.01 / 255


def test_training_with_device_degradation_matches_workers(tmp_path):
    """Two iterations with degrade_on=device (the training loop degrades) lose exactly what degrade_on=worker
    loses; auto is the worker on CPU; device is refused for paired data."""
    runs = {where: train(tiny_opt(tmp_path / where, "train.total_iter=2", f"datasets.train.degrade_on={where}"))
            for where in ("device", "worker")}
    assert runs["device"].losses == runs["worker"].losses
    opt = tiny_opt(tmp_path)
    assert not degrade_on_device(opt, torch.device("cpu")) and degrade_on_device(opt, torch.device("cuda"))
    with pytest.raises(OptionError, match="degrade_on must be one of auto, worker, device"):
        tiny_opt(tmp_path, "datasets.train.degrade_on=gpu")
    with pytest.raises(OptionError, match="degrade_on: device applies to HROnlyDataset"):
        degrade_on_device(tiny_opt(tmp_path, "datasets.train.type=PairedImageDataset",
                                   "datasets.train.degrade_on=device"), torch.device("cpu"))


def test_validation_of_hr_only_sets_degraded_on_the_device():
    """HR-only validation images handed over without LR (as on CUDA) score exactly as those the dataset
    degrades."""
    opt = load_options(None)
    torch.manual_seed(0)
    net = rgt.RGT(**opt["network_g"], kernels="reference")
    scores = []
    for on_device in (False, True):
        ds = SRDataset(ASSETS / "images" / "val", None, 2, degrade_on_device=on_device)
        assert ("lq" in ds[0]) != on_device
        scores.append(validate(net, {"val": ds}, opt["val"]["metrics"], 2, torch.device("cpu")))
    assert scores[0] == scores[1] and set(scores[0]["val"]) == {"psnr", "psnr_bicubic", "ssim", "ssim_bicubic"}


@pytest.mark.gpu
def test_device_degradation_on_cuda_equals_cpu(tmp_path):
    folder = _hr_only_dir(tmp_path)
    ds = SRDataset(folder, None, 2, gt_size=32, degrade_on_device=True)
    for keys in ([(i % 2, (7, 0, i)) for i in range(8)], [(i % 3, (7, 0, i)) for i in range(6)]):
        batch = collate([ds[k] for k in keys])
        lq, gt = patches_from_windows(batch, 2, 16, torch.device("cuda"))
        assert lq.is_cuda and gt.is_cuda
        ref_lq, ref_gt = patches_from_windows(batch, 2, 16)
        assert torch.equal(lq.cpu(), ref_lq) and torch.equal(gt.cpu(), ref_gt)


def _paired(tmp_path: Path, scale: int = 2) -> tuple[Path, Path]:
    hr_dir, lr_dir = tmp_path / "HR", tmp_path / f"X{scale}"
    hr_dir.mkdir()
    lr_dir.mkdir()
    for name in ("chelsea", "coffee"):
        hr = rgt.data.read_image(ASSETS / "images" / "val" / f"{name}.png").image
        rgt.data.write_image(hr_dir / f"{name}.png", hr)
        rgt.data.write_image(lr_dir / f"{name}x{scale}.png", rgt.data.bicubic_degrade(hr, scale))
    return hr_dir, lr_dir


def test_paired_patches_aligned_and_augmented(tmp_path):
    hr_dir, lr_dir = _paired(tmp_path)
    ds = SRDataset(hr_dir, lr_dir, 2, filename_tmpl="{}x2", gt_size=64)
    seen = set()
    for pos in range(40):
        item = ds[(pos % 2, (1, 0, pos))]
        assert item["lq"].shape == (3, 32, 32) and item["gt"].shape == (3, 64, 64)
        # aligned: the LR patch is the bicubic image of the HR patch, up to border effects and rounding
        inner = rgt.data.bicubic_degrade(item["gt"], 2, quantize=True)[:, 4:-4, 4:-4]
        assert (inner - item["lq"][:, 4:-4, 4:-4]).abs().max() < 0.02
        seen.add(tuple(item["lq"][0, :2, :2].flatten().tolist()))
    x = torch.arange(12.0).view(1, 3, 4)
    transforms = {dihedral(x, a, b, c).flatten().tolist().__repr__() for a in (0, 1) for b in (0, 1) for c in (0, 1)}
    assert len(transforms) == 8
    assert torch.equal(ds[(0, (1, 0, 5))]["lq"], ds[(0, (1, 0, 5))]["lq"])  # the key decides everything


def test_data_errors_name_the_file(tmp_path):
    hr_dir, lr_dir = _paired(tmp_path)
    (lr_dir / "coffeex2.png").unlink()
    with pytest.raises(DataError, match="coffeex2.png"):
        SRDataset(hr_dir, lr_dir, 2, filename_tmpl="{}x2", gt_size=64)
    (hr_dir / "coffee.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="coffee.png"):
        SRDataset(hr_dir, None, 2, gt_size=64)[(1, (0, 0, 0))]
    with pytest.raises(DataError, match="chelsea.png.*smaller than the 100x100"):
        SRDataset(hr_dir, None, 2, gt_size=200)[(0, (0, 0, 0))]
    with pytest.raises(DataError, match="folder not found"):
        SRDataset(tmp_path / "nope", None, 2)


def test_sampler_shards_and_resumes():
    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    ranks = [take(InfiniteSampler(10, seed=3, rank=r, world=2), 5) for r in range(2)]
    assert sorted(i for r in ranks for i, _ in r) == list(range(10))  # one epoch, disjoint shards
    full = take(InfiniteSampler(7, seed=3), 20)
    assert take(InfiniteSampler(7, seed=3, start=9), 11) == full[9:]
    assert sorted(i for i, _ in full[7:14]) == list(range(7))


# ---------------------------------------------------------------------------------------------------- EMA


def test_ema_update_rule():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(net, 0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.fill_(2.0)
    ema.update(net)
    for name, p in net.named_parameters():
        expected = 0.9 * start[name] + 0.1 * p
        torch.testing.assert_close(ema.module.state_dict()[name], expected, rtol=0, atol=1e-7)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)  # buffers copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(net, 1.0)


# ------------------------------------------------------------------------------------------------ running


def test_quickstart_cli_smoke(tmp_path, capsys):
    """`python -m rgt.train` for 2 iterations: checkpoint, state, log, validation against bicubic."""
    root = tmp_path / "exp"
    main(["--set", "train.total_iter=2", "--set", f"path.experiments_root={root}", "--cpu",
          *[a for s in TINY_RUN for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert "validation bundled_val: psnr" in err and "bicubic" in err and str(root / "models") in err
    ckpt = torch.load(root / "models" / "net_g_2.pth", weights_only=True)
    assert set(ckpt) == {"params", "params_ema", "config"}
    assert (root / "training_states" / "2.state").is_file() and (root / "train_quickstart_RGT_x2.log").is_file()
    net = rgt.RGT(**load_options(None)["network_g"])
    rgt.load_checkpoint(net, root / "models" / "net_g_2.pth")  # prefers params_ema
    for k, v in net.state_dict().items():  # the file's shift masks are the img_size=64 ones (spandrel loads them)
        assert k.rsplit(".", 1)[-1] in ("attn_mask_0", "attn_mask_1") or torch.equal(v, ckpt["params_ema"][k]), k
    assert "rwin_attention" in (root / "train_quickstart_RGT_x2.log").read_text()
    main(["--set", "train.total_iter=3", "--set", f"path.experiments_root={root}", "--cpu", "--auto-resume",
          *[a for s in TINY_RUN for a in ("--set", s)]])
    assert f"resumed from {root / 'training_states' / '2.state'}" in capsys.readouterr().err
    assert (root / "models" / "net_g_3.pth").is_file()


def test_cli_errors_are_clear(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--set", "train.optim_g.lrr=1"])
    assert exc.value.code == 2 and "unknown option 'train.optim_g.lrr'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["-opt", "missing.yml"])
    assert exc.value.code == 2 and "option file not found: missing.yml" in capsys.readouterr().err


def test_resume_reproduces_losses(tmp_path):
    """4 iterations in one go == 2 iterations, stop, resume to 4 (EMA, LR milestone, drop path, a worker)."""
    common = ("train.scheduler.milestones=[3]", "network_g.drop_path_rate=0.2", "logger.save_checkpoint_freq=2")
    full = train(tiny_opt(tmp_path / "a", "train.total_iter=4", *common))
    train(tiny_opt(tmp_path / "b", "train.total_iter=2", *common))
    root = tmp_path / "b" / "exp"
    resumed = train(tiny_opt(tmp_path / "b", "train.total_iter=4", "datasets.train.num_worker_per_gpu=1", *common),
                    resume=root / "training_states" / "2.state")
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {i: full.losses[i] for i in (3, 4)}
    assert resumed.losses[3] != full.losses[2]
    a = torch.load(tmp_path / "a" / "exp" / "models" / "net_g_4.pth", weights_only=True)
    b = torch.load(root / "models" / "net_g_4.pth", weights_only=True)
    for key in ("params", "params_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_accumulate_clip_bf16_run(tmp_path):
    result = train(tiny_opt(tmp_path, "train.total_iter=1", "train.accumulate=2", "train.grad_clip=0.01",
                            "train.ema_decay=0", "train.amp=bf16"))
    assert list(result.losses) == [1] and result.ema is None
    assert set(torch.load(result.checkpoint, weights_only=True)) == {"params", "config"}
    training = torch.load(tmp_path / "exp" / "training_states" / "1.state", weights_only=True)
    assert training["sampler_position"] == 4  # 2 micro-batches of 2


def test_tensorboard_logging(tmp_path):
    """logger.use_tb_logger: loss, learning rate and validation metrics as TensorBoard scalars."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = train(load_options(None, [*TINY_RUN, f"path.experiments_root={tmp_path / 'exp'}",
                                       "train.total_iter=2", "logger.use_tb_logger=true"]))
    events = event_accumulator.EventAccumulator(str(tmp_path / "exp" / "tb"))
    events.Reload()
    assert {"losses/l_pix", "lr", "metrics/bundled_val/psnr", "metrics/bundled_val/psnr_bicubic"} <= set(
        events.Tags()["scalars"])
    logged = events.Scalars("losses/l_pix")
    assert [e.step for e in logged] == list(result.losses)
    assert [e.value for e in logged] == pytest.approx(list(result.losses.values()), rel=1e-6)  # stored as float32
    assert events.Scalars("metrics/bundled_val/psnr")[-1].value == pytest.approx(result.metrics["bundled_val"]["psnr"])


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    opt = tiny_opt(tmp_path, "train.total_iter=4", "logger.save_checkpoint_freq=2")
    trainer = Trainer(opt, setup(0))
    real = trainer.criterion

    def poisoned(out, gt):
        return real(out, gt) * (float("nan") if trainer.iter == 2 else 1.0)

    trainer.criterion = poisoned
    with pytest.raises(TrainingDiverged, match=r"iteration 3.*2\.state"):
        trainer.run()
    assert sorted(p.name for p in (tmp_path / "exp" / "training_states").iterdir()) == ["2.state"]


@pytest.mark.parametrize("scale, skipped, missing", [
    (3, ["upsample.0.weight", "upsample.0.bias"], ["upsample.0.weight", "upsample.0.bias"]),
    (4, [], ["upsample.2.weight", "upsample.2.bias"]),
])
def test_finetune_from_x2_reports_skipped_keys(tmp_path, caplog, scale, skipped, missing):
    net_g = load_options(None)["network_g"]
    x2 = tmp_path / "x2.pth"
    rgt.save_checkpoint(rgt.RGT(**net_g), x2)
    opt = tiny_opt(tmp_path, f"scale={scale}", f"network_g.upscale={scale}", f"path.pretrain_network_g={x2}",
                   "path.strict_load_g=false", f"datasets.train.gt_size={16 * scale}")
    with caplog.at_level(logging.INFO, logger="rgt"):
        Trainer(opt, setup(0))
    text = caplog.text
    for k in skipped:
        assert f"skipping {k}" in text
    assert f"{len(missing)} missing keys {missing}" in text
    first = sorted(missing)[0]  # the message names the first differing key
    with pytest.raises(OptionError, match=rf"pretrain_network_g: {x2} does not fit network_g \(2 tensors differ, "
                       rf"e\.g\. {first} .*path.strict_load_g: false"):
        Trainer(load_options(None, [*TINY_RUN, f"scale={scale}", f"network_g.upscale={scale}",
                                    f"path.pretrain_network_g={x2}"]), setup(0))
    x2.write_bytes(x2.read_bytes()[:1000])
    with pytest.raises(OptionError, match=f"pretrain_network_g: {x2}: cannot read this model file"):
        Trainer(opt, setup(0))
