"""Fault injection for rgt.train: kills, Ctrl-C, full disks, corrupt files, concurrent runs, bad input.

Kills run `main()` in a forked child (no interpreter start-up: ~14 s on a loaded 2-core machine) that SIGKILLs
itself at a chosen point; one real `python -m rgt.train` process takes an external SIGINT and holds the folder
lock against a second run. Every run is the quickstart model with 16-px LR patches and a batch of 2.
"""

import errno
import multiprocessing
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_train import TINY_RUN, tiny_opt

import rgt
from rgt.train import TrainingDiverged, train
from rgt.train import state as state_mod
from rgt.train.cli import main
from rgt.train.distributed import setup
from rgt.train.experiment import LOCK_NAME, ExperimentLock, remove_leftovers
from rgt.train.loop import Trainer

SAVE_EVERY = ("logger.save_checkpoint_freq=2",)


def cli_args(root: Path, total: int, *extra: str) -> list[str]:
    sets = [*TINY_RUN, f"path.experiments_root={root}", "datasets.val=~", f"train.total_iter={total}", *SAVE_EVERY]
    return [a for s in sets for a in ("--set", s)] + list(extra)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) == {"params", "params_ema", "config"} and wa["config"] == wb["config"]
    for key in ("params", "params_ema"):
        assert all(torch.equal(wa[key][k], wb[key][k]) for k in wa[key]), (a, b, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run (checkpoints at 2, 4, 6): its experiment folder."""
    tmp = tmp_path_factory.mktemp("reference")
    train(tiny_opt(tmp, "train.total_iter=6", *SAVE_EVERY))
    return tmp / "exp"


# --------------------------------------------------------------------------------------------------- kills


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_when(owner, attr: str, hit) -> None:
    """Patch owner.attr to SIGKILL the process when hit(*args) holds, before the call."""
    real = getattr(owner, attr)

    def patched(*args, **kwargs):
        if hit(*args):
            _kill_self()
        return real(*args, **kwargs)

    setattr(owner, attr, patched)


def kill_at_rename(name: str) -> None:
    """SIGKILL when a complete temporary file is about to be renamed onto `name`."""
    kill_when(os, "replace", lambda src, dst: Path(dst).name == name)


def kill_before_state(it: int) -> None:
    """SIGKILL after models/net_g_<it>.pth is in place, before training_states/<it>.state is written."""
    kill_when(state_mod, "atomic_save", lambda obj, path: Path(path).name == f"{it}.state")


def kill_in_iteration(it: int) -> None:
    """SIGKILL in the middle of iteration it + 1 (its batch drawn, no optimizer step yet)."""
    real = Trainer.step

    def step(self, batches):
        loss = real(self, batches)
        if self.iter == it:
            _kill_self()
        return loss

    Trainer.step = step


def _child(argv: list[str], hook, log: str) -> None:
    torch.set_num_threads(1)  # no OpenMP team inherited half-alive from the parent (the runs use one thread)
    sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 (the child ends with the process)
    os.dup2(sys.stderr.fileno(), 2)
    if hook is not None:
        hook()
    main(argv)


def fork_main(argv: list[str], tmp: Path, hook=None) -> tuple[int, str]:
    """(exit code, stderr) of main(argv) in a forked child with `hook()` applied first (-9: SIGKILLed)."""
    log = tmp / f"child_{time.monotonic_ns()}.err"
    p = multiprocessing.get_context("fork").Process(target=_child, args=(argv, hook, str(log)))
    p.start()
    p.join(timeout=300)
    assert p.exitcode is not None, "child still running after 300 s"
    return p.exitcode, log.read_text()


def test_kills_at_chosen_points_then_auto_resume_match_uninterrupted_run(tmp_path, reference):
    """SIGKILL with a complete temporary file not yet renamed, between a model file and its state, and in the
    middle of an iteration; each relaunch with --auto-resume removes the leftover and the final weights equal
    the uninterrupted run's bit for bit."""
    root = tmp_path / "exp"
    code, _ = fork_main(cli_args(root, 6), tmp_path, lambda: kill_at_rename("net_g_4.pth"))
    assert code == -signal.SIGKILL
    leftovers = [p.name for p in (root / "models").iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".net_g_4.pth.") and leftovers[0].endswith(".tmp")
    assert sorted(p.name for p in (root / "training_states").iterdir()) == ["2.state"]

    code, err = fork_main(cli_args(root, 6, "--auto-resume"), tmp_path, lambda: kill_before_state(4))
    assert code == -signal.SIGKILL
    assert f"removed {root / 'models' / leftovers[0]}, left by an interrupted write" in err
    assert "resumed from" in err and "2.state" in err
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]
    assert (root / "models" / "net_g_4.pth").is_file() and not (root / "training_states" / "4.state").exists()

    code, err = fork_main(cli_args(root, 6, "--auto-resume"), tmp_path, lambda: kill_in_iteration(4))
    assert code == -signal.SIGKILL and "2.state" in err  # the model file without a state is not a resume point
    assert (root / "training_states" / "4.state").is_file()

    code, err = fork_main(cli_args(root, 6, "--auto-resume"), tmp_path)
    assert code == 0 and "4.state (iteration 4" in err
    assert_same_weights(root / "models" / "net_g_6.pth", reference / "models" / "net_g_6.pth")


def test_stale_lock_of_a_killed_run_does_not_block(tmp_path):
    root = tmp_path / "exp"
    code, _ = fork_main([], tmp_path, lambda: (ExperimentLock.acquire(root), _kill_self()))
    assert code == -signal.SIGKILL and (root / LOCK_NAME).read_text().strip().isdigit()
    ExperimentLock.acquire(root).release()


# ---------------------------------------------------------------------- Ctrl-C and concurrent runs (real process)


def test_sigint_and_concurrent_run(tmp_path, capsys):
    """A real `python -m rgt.train` run holds the folder: a second run with the same experiment exits 1 naming
    the folder and the pid. SIGINT then stops the first with one line and exit code 130; --auto-resume continues
    from the newest checkpoint."""
    root = tmp_path / "exp"
    log = tmp_path / "first.err"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "rgt.train", "--cpu", *cli_args(root, 100000)],
                                stderr=stderr, cwd=tmp_path,
                                # a shell may start background jobs with SIGINT ignored, which Python inherits
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (root / "training_states" / "2.state").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        with pytest.raises(SystemExit) as exc:
            main(["--cpu", *cli_args(root, 4)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 1
        assert err[-1] == (f"rgt.train: error: experiment folder {root} is in use by another rgt.train run "
                           f"(pid {proc.pid}); wait for it to end, or choose another name (--set name=...)")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rgt.train: interrupted at iteration ") and "rerun with --auto-resume" in last, err
    newest = state_mod.saved_states(root)[0]
    assert f"the newest checkpoint is {newest}" in last
    it = int(newest.stem)
    main(["--cpu", *cli_args(root, it + 1, "--auto-resume")])
    assert f"resumed from {newest} (iteration {it}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- archive


def test_rerun_without_resume_archives_the_previous_run(tmp_path, capsys):
    root = tmp_path / "exp"
    main(["--cpu", *cli_args(root, 2)])
    first = (root / "models" / "net_g_2.pth").read_bytes()
    capsys.readouterr()
    main(["--cpu", *cli_args(root, 2, "--set", "manual_seed=11")])
    archives = sorted(tmp_path.glob("exp_archived_*"))
    assert len(archives) == 1 and len(archives[0].name) == len("exp_archived_YYYYmmdd_HHMMSS")
    assert f"the previous run in {root} was moved to {archives[0]}" in capsys.readouterr().err
    assert (archives[0] / "models" / "net_g_2.pth").read_bytes() == first  # kept, not overwritten
    assert (root / "models" / "net_g_2.pth").read_bytes() != first
    assert not (archives[0] / LOCK_NAME).exists() and (root / LOCK_NAME).is_file()
    main(["--cpu", *cli_args(root, 3, "--set", "manual_seed=11", "--auto-resume")])  # continues the new run
    assert f"resumed from {root / 'training_states' / '2.state'}" in capsys.readouterr().err
    assert len(list(tmp_path.glob("exp_archived_*"))) == 1


def test_failed_checks_leave_the_previous_run_in_place(tmp_path, capsys):
    """Bad data is found before the folder is touched: no archive, no new files, the lock file gone."""
    root = tmp_path / "exp"
    main(["--cpu", *cli_args(root, 2)])
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.raises(SystemExit):
        main(["--cpu", *cli_args(root, 2, "--set", "datasets.train.gt_size=4000")])
    assert "smaller than the 2000x2000 LR patch" in capsys.readouterr().err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before and not list(tmp_path.glob("*_archived_*"))
    fresh = tmp_path / "never"
    with pytest.raises(SystemExit):
        main(["--cpu", *cli_args(fresh, 2, "--set", "datasets.train.gt_size=4000")])
    assert not fresh.exists()


# ------------------------------------------------------------------------------------------------ full disk


def test_full_disk_at_checkpoint_save_in_process(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the state of iteration 4: one line with the path, iteration 2 intact, no temp."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("iter") == 4:
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    root = tmp_path / "exp"
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(root, 4)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1
    assert err[-1] == (f"rgt.train: error: no space left on device: could not write "
                       f"{root / 'training_states' / '4.state'}; the previous checkpoint is intact: free some space "
                       "and rerun with --auto-resume")
    assert sorted(p.name for p in (root / "training_states").iterdir()) == ["2.state"]
    assert state_mod.latest_state(root).state_file.name == "2.state"


@pytest.fixture
def tmpfs(tmp_path, reference):
    """A tmpfs that holds one checkpoint (model + state) of the tiny run and half of the next model file."""
    one = sum(p.stat().st_size for p in (reference / "models" / "net_g_2.pth", reference / "training_states" /
                                        "2.state"))
    size = one + (reference / "models" / "net_g_2.pth").stat().st_size // 2
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)]).returncode != 0:  # busy: a file there is still open
        subprocess.run(["umount", "-l", str(mnt)])  # detach it anyway, then fail
        pytest.fail("a file on the full file system was left open (its space is not freed)")


def test_full_disk_on_a_real_file_system(tmpfs, capsys):
    """torch.save on a full tmpfs says only `unexpected pos`: still one line naming the path, no space left."""
    root = tmpfs / "exp"
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(root, 4)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err and "Logging error" not in err
    assert (f"rgt.train: error: no space left on device: could not write {root / 'models' / 'net_g_4.pth'}"
            in err.strip().splitlines()[-1])
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]
    assert state_mod.latest_state(root).state_file.name == "2.state"


# ------------------------------------------------------------------------------------------- corrupt files


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    """A finished 4-iteration run with checkpoints at 2 and 4."""
    train(tiny_opt(tmp_path, "train.total_iter=4", *SAVE_EVERY))
    return tmp_path / "exp"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte_in_largest_entry(path: Path) -> None:
    """Flip one byte inside the largest stored member of a torch zip file: the file still parses, its CRC fails."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's own
    data[info.header_offset + 30 + name_len + extra_len + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated state", "zero-byte state", "flipped state", "truncated model",
                                    "nan model"])
def test_damaged_newest_checkpoint(two_checkpoints, capsys, damage):
    """--resume names the damaged file in one line; --auto-resume falls back to iteration 2 with a warning."""
    root = two_checkpoints
    state4, model4 = root / "training_states" / "4.state", root / "models" / "net_g_4.pth"
    if damage == "truncated state":
        _truncate(state4)
    elif damage == "zero-byte state":
        state4.write_bytes(b"")
    elif damage == "flipped state":
        _flip_byte_in_largest_entry(state4)
    elif damage == "truncated model":
        _truncate(model4)
    else:
        w = weights(model4)
        next(iter(w["params_ema"].values())).fill_(float("nan"))
        torch.save(w, model4)
    bad = model4 if "model" in damage else state4
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(root, 6, "--resume", str(state4))])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err and str(bad) in err.strip().splitlines()[-1]
    main(["--cpu", *cli_args(root, 5, "--auto-resume")])
    err = capsys.readouterr().err
    assert f"--auto-resume: skipping {bad}" in err
    assert f"resumed from {root / 'training_states' / '2.state'} (iteration 2" in err


def test_resume_refuses_a_model_file_and_another_network(two_checkpoints, capsys):
    root = two_checkpoints
    with pytest.raises(SystemExit):
        main(["--cpu", *cli_args(root, 6, "--resume", str(root / "models" / "net_g_4.pth"))])
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rgt.train: error: {root / 'models' / 'net_g_4.pth'} is a model file (weights), not a training state: "
        "--resume takes experiments/<name>/training_states/<iter>.state; to start a new run from these weights, "
        "set path.pretrain_network_g")
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(root, 6, "--auto-resume", "--set", "network_g.embed_dim=48")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1 and len(err) < 10 and err[-1].startswith(
        f"rgt.train: error: {root / 'models' / 'net_g_4.pth'} was trained with other network_g options: ")
    assert "(36,) there, (48,) here" in err[-1]


def test_pickle_payload_in_a_state_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "exp" / "training_states" / "2.state"
    evil.parent.mkdir(parents=True)
    evil.write_bytes(pickle.dumps({"iter": 2, "optimizers": Payload()}))
    with pytest.raises(SystemExit):
        main(["--cpu", *cli_args(tmp_path / "exp", 3, "--resume", str(evil))])
    assert f"{evil}: cannot read this training state" in capsys.readouterr().err
    main(["--cpu", *cli_args(tmp_path / "exp", 1, "--auto-resume")])  # skipped: a fresh run, the folder archived
    err = capsys.readouterr().err
    assert f"--auto-resume: skipping {evil}: cannot read this training state" in err and "was moved to" in err
    assert not marker.exists()


def test_unusable_experiment_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(tmp_path / "file", 1)])
    assert exc.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"rgt.train: error: {tmp_path / 'file'}: File exists"


def test_yaml_payload_in_an_option_file_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    opt = tmp_path / "evil.yml"
    opt.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(SystemExit) as exc:
        main(["-opt", str(opt)])
    assert exc.value.code == 2 and capsys.readouterr().err == (
        f"rgt.train: error: {opt}: not valid YAML (line 1, column 7): could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'\n")
    assert not marker.exists()


def _copy_train_images(folder: Path) -> None:
    folder.mkdir()
    for p in (Path(rgt.__file__).parent / "assets" / "images" / "train").glob("*.png"):
        (folder / p.name).write_bytes(p.read_bytes())


@pytest.mark.parametrize("damage", ["truncated png", "truncated jpeg", "not an image", "too small"])
def test_unusable_training_image_found_before_the_first_iteration(tmp_path, capsys, damage):
    folder = tmp_path / "hr"
    _copy_train_images(folder)
    bad = folder / ("bad.jpg" if "jpeg" in damage else "bad.png")
    image = rgt.data.read_image(folder / "rocket.png").image
    rgt.data.write_image(bad, image[:, :20, :20] if damage == "too small" else image)
    if "truncated" in damage:
        _truncate(bad)
    elif damage == "not an image":
        bad.write_bytes(b"<html>404</html>")
    root = tmp_path / "exp"
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(root, 2, "--set", f"datasets.train.dataroot_gt={folder}")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert exc.value.code == 1 and last.startswith("rgt.train: error: datasets.train: ") and str(bad) in last
    assert "Traceback" not in err and "it/s" not in err and not root.exists()  # before the first iteration


def test_damage_inside_a_complete_image_named_in_one_line_from_a_worker(tmp_path, capsys):
    """The cheap check passes a PNG damaged in the middle (its end intact); decoding it in a data worker fails, and
    the error is still one line naming the file, not the worker's traceback."""
    folder = tmp_path / "hr"
    _copy_train_images(folder)
    data = bytearray((folder / "rocket.png").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    (folder / "rocket.png").write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exc:
        main(["--cpu", *cli_args(tmp_path / "exp", 4, "--set", f"datasets.train.dataroot_gt={folder}", "--set",
                                 "datasets.train.num_worker_per_gpu=1", "--set", "datasets.train.use_shuffle=false")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"rgt.train: error: cannot read image {folder / 'rocket.png'}: ")


def test_image_check_accepts_a_jpeg_with_trailing_bytes(tmp_path):
    from rgt.train.datacheck import image_size

    path = tmp_path / "a.jpg"
    rgt.data.write_image(path, torch.rand(3, 20, 30))
    path.write_bytes(path.read_bytes() + b"trailing")
    assert image_size(path) == (20, 30)


# --------------------------------------------------------------------------------------------- in-process


def test_nonfinite_weights_are_never_saved(tmp_path):
    """The step after the checkpoint of iteration 1 blows the weights up (NaN) with a finite loss: iteration 2's
    checkpoint is refused and the message names iteration 1's, whose weights are finite."""
    opt = tiny_opt(tmp_path, "train.total_iter=4", "logger.save_checkpoint_freq=1")
    trainer = Trainer(opt, setup(0))
    real = trainer.ema.update  # called right after the optimizer step

    def update(net):
        real(net)
        if trainer.iter == 1:
            with torch.no_grad():
                next(trainer.net.parameters()).fill_(float("nan"))

    trainer.ema.update = update
    with pytest.raises(TrainingDiverged, match=r"weights hold NaN or Inf .* after iteration 2, not saved.*1\.state"):
        trainer.run()
    root = tmp_path / "exp"
    assert sorted(p.name for p in (root / "training_states").iterdir()) == ["1.state"]
    assert not (root / "models" / "net_g_2.pth").exists()


def test_written_files_get_the_umask_permissions(tmp_path):
    """Checkpoints were -rw------- (mkstemp's mode) whatever the umask."""
    old = os.umask(0o022)
    try:
        rgt.checkpoint.atomic_write(tmp_path / "a.pth", lambda tmp: torch.save({}, tmp))
        os.umask(0o002)
        rgt.checkpoint.atomic_write(tmp_path / "b.pth", lambda tmp: torch.save({}, tmp))
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o664


def test_leftovers_removed_only_if_ours(tmp_path):
    root = tmp_path / "exp"
    (root / "models").mkdir(parents=True)
    (root / "training_states").mkdir()
    ours = [root / "models" / ".net_g_4.pth.0f3a9b1c2d4e.tmp", root / ".options.yml.abc123de0000.tmp",
            root / "training_states" / ".4.state.k2_9x1ab"]  # the last: mkstemp's name, earlier versions
    theirs = [root / "models" / "notes.tmp", root / ".hidden", root / "models" / "net_g_4.pth",
              root / "models" / ".draft.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"x")
    assert sorted(remove_leftovers(root)) == sorted(ours)
    assert all(p.exists() for p in theirs)

