"""Faults on the disk: a full disk while writing a checkpoint, metrics.jsonl, results.json or a plot;
a truncated or bit-flipped checkpoint; a torn last line in metrics.jsonl; an output folder that
cannot be written.

A full disk is made for real where the tests run as root (a tmpfs mounted with a size limit) and
by injection everywhere (``sdtl.atomic._write_through``, which every byte sdtl writes into a run
file passes, fails with ``OSError(ENOSPC)`` past a budget, after writing part of the data as a real
disk does).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from sdtl.engine.config import load_config
from sdtl.errors import CheckpointError, UserError

BASE = ["eval.probe_videos=0", "run.threads=1", "run.tensorboard=false", "run.deterministic=true"]


def config(data, *sets):
    return load_config("synthetic_tiny", [f"data.root={data}", *BASE, *sets])


def finetune(data, out, *sets, resume=None):
    from sdtl.engine.finetune import run_finetune

    return run_finetune(config(data, *sets), out, resume=resume)


def sdtl(capsys, *args) -> tuple[int, list[str]]:
    """``sdtl ARGS`` in this process: (exit status, the lines it printed on stderr)."""
    from sdtl.cli import main

    capsys.readouterr()
    rc = main(["-q", *map(str, args)])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epochs_logged(out: Path) -> list[int]:
    """Every line of metrics.jsonl must parse; the epochs, in order."""
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob(".*.tmp"))


def assert_checksums_match(ckpt_dir: Path) -> None:
    """Every checkpoint has its checksum file and matches it (what `sha256sum -c` checks)."""
    names = [p.name for p in ckpt_dir.glob("*.pt")]
    assert names
    for name in names:
        digest, recorded_name = (ckpt_dir / f"{name}.sha256").read_text().split()
        assert recorded_name == name
        assert hashlib.sha256((ckpt_dir / name).read_bytes()).hexdigest() == digest, name


def flip_a_bit_inside_a_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes: the file still unpickles (so only the
    checksum can tell), it just holds other weights."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda i: i.file_size)
        blob = archive.read(largest.filename)
    offset = data.find(blob)
    assert offset > 0
    data[offset + len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    load(path)  # torch itself does not notice


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def two_epochs(tiny_synth, tmp_path_factory):
    """A finished 2-epoch run: last.pt at epoch 2, prev.pt at epoch 1 (each with its checksum)."""
    out = tmp_path_factory.mktemp("two") / "run"
    finetune(tiny_synth, out, "optim.epochs=2")
    return out


@pytest.fixture
def run_copy(two_epochs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    return out


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(names, budget)``: writes into files named ``names`` fail with ENOSPC once ``budget``
    bytes were written into them (the bytes up to the budget are written, as a real disk does)."""
    import sdtl.atomic

    def install(names, budget: int = 0) -> None:
        left = {"bytes": budget}

        def write_through(path, put, data):
            if Path(path).name not in names:
                return put(data)
            if len(data) <= left["bytes"]:
                left["bytes"] -= len(data)
                return put(data)
            if left["bytes"] > 0:
                part = data[: left["bytes"]]
                left["bytes"] = 0
                return put(part)  # a short write; the next call fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(sdtl.atomic, "_write_through", write_through)

    yield install
    monkeypatch.undo()


def _mount(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


def _tmpfs(mountpoint: Path):
    """Mount a 4 MiB tmpfs at ``mountpoint`` for the duration of a fixture (skip where it cannot)."""
    mountpoint.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mountpoint))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only): a disk that really fills up. Unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; the injected full disk covers the rest")
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    yield from _tmpfs(tmp_path / "disk")


def fill(mountpoint: Path, leave: int) -> Path:
    """Fill the filesystem but ``leave`` bytes."""
    filler = mountpoint / "filler"
    st = os.statvfs(mountpoint)
    size = st.f_bavail * st.f_frsize - leave
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(size, 0))
    return filler


# ------------------------------------------------------------------------------------------------
# A full disk


def test_each_writer_turns_a_full_disk_into_one_error_and_leaves_the_old_file_whole(tmp_path, full_disk, caplog):
    from sdtl.atomic import append_text, atomic_savefig, atomic_write_text
    from sdtl.errors import NoSpaceError
    from sdtl.models.checkpoints import checkpoint_problem, save_checkpoint

    ckpt = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(1000)}, ckpt, checksum=True)
    atomic_write_text(tmp_path / "results.json", '{"old": true}\n')
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')

    full_disk({"last.pt"}, budget=100)
    with pytest.raises(NoSpaceError) as caught:  # torch.save used to say "unexpected pos ..."
        save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, ckpt, checksum=True)
    message = str(caught.value)
    assert str(ckpt) in message and "no space left" in message and "free space" in message
    assert "resume='auto'" in message and "\n" not in message and caught.value.path == ckpt  # the Python argument
    assert "--resume auto" in caught.value.for_cli()  # the flag, as the command line prints it
    assert load(ckpt)["epoch"] == 1 and checkpoint_problem(ckpt) is None  # the old file and its checksum
    assert sorted(os.listdir(ckpt.parent)) == ["last.pt", "last.pt.sha256"]  # no temp file left

    full_disk({"results.json"}, budget=100)
    with pytest.raises(NoSpaceError, match="results.json"):
        atomic_write_text(tmp_path / "results.json", json.dumps({"new": "x" * 500}))
    assert (tmp_path / "results.json").read_text() == '{"old": true}\n'

    full_disk({"metrics.jsonl"}, budget=100)
    with pytest.raises(NoSpaceError, match="metrics.jsonl"):  # 100 bytes of it were written, then cut back
        append_text(tmp_path / "metrics.jsonl", json.dumps({"epoch": 2, "pad": "x" * 500}) + "\n")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full_disk({"curves.png"}, budget=100)
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    with caplog.at_level("WARNING", logger="sdtl"):
        assert atomic_savefig(fig, tmp_path / "curves.png") is None  # a figure warns, it does not stop a run
    plt.close(fig)
    assert "curves.png: no space left" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "metrics.jsonl", "results.json"]


@pytest.mark.parametrize("target", ["last.pt", "metrics.jsonl", "results.json"])
def test_a_run_that_fills_the_disk_stops_with_one_line_and_resume_auto_finishes_it(run_copy, full_disk, capsys,
                                                                                 target):
    out = run_copy
    # metrics.jsonl: its rewrite from the checkpoint's history fits, the next epoch's line does not
    budget = {"last.pt": 4096, "results.json": 500,
              "metrics.jsonl": (out / "metrics.jsonl").stat().st_size + 100}[target]
    full_disk({target}, budget=budget)
    rc, err = sdtl(capsys, "finetune", "--out", out, "--resume", "auto", "--set", "optim.epochs=3")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("sdtl: error: ") and target in err[0]
    assert "no space left" in err[0] and "free space" in err[0] and "--resume auto" in err[0]
    assert temp_files(out) == []  # no half-written file anywhere
    assert_checksums_match(out / "checkpoints")
    epoch = load(out / "checkpoints" / "last.pt")["epoch"]
    assert epoch == (3 if target == "results.json" else 2)  # a failed checkpoint leaves the previous one
    assert epochs_logged(out)[:2] == [1, 2]  # parses: no partial line
    if target == "results.json":
        assert json.loads((out / "results.json").read_text())["last"]["epoch"] == 2  # the old one, whole

    full_disk(set())  # space freed
    stale = out / "checkpoints" / ".last.pt.999999999.0badc0de.tmp"  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half")
    rc, err = sdtl(capsys, "finetune", "--out", out, "--resume", "auto", "--set", "optim.epochs=3")
    assert rc == 0, err
    assert epochs_logged(out) == [1, 2, 3]  # each epoch exactly once
    assert json.loads((out / "results.json").read_text())["last"]["epoch"] == 3
    assert not stale.exists() and temp_files(out) == []
    assert_checksums_match(out / "checkpoints")


def test_a_real_full_filesystem_stops_the_run_cleanly_and_resume_auto_finishes_it(tiny_synth, small_fs, capsys):
    out = small_fs / "run"
    # TensorBoard on: its event files fill the disk too
    finetune(tiny_synth, out, "optim.epochs=1", "run.tensorboard=true")
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    filler = fill(small_fs, leave=150_000)  # room for the small files, not for a 0.5 MB checkpoint
    rc, err = sdtl(capsys, "finetune", "--out", out, "--resume", "auto", "--set", "optim.epochs=2")
    assert rc == 2 and len(err) == 1, err
    assert str(last) in err[0] and "no space left" in err[0] and "--resume auto" in err[0], err
    assert last.read_bytes() == before and load(last)["epoch"] == 1  # the previous last.pt is intact
    assert_checksums_match(out / "checkpoints")
    assert temp_files(out) == []

    filler.unlink()
    rc, err = sdtl(capsys, "finetune", "--out", out, "--resume", "auto", "--set", "optim.epochs=2")
    assert rc == 0, err
    assert epochs_logged(out) == [1, 2] and load(last)["epoch"] == 2
    assert json.loads((out / "results.json").read_text())["last"]["epoch"] == 2


# ------------------------------------------------------------------------------------------------
# Torn and corrupted checkpoints


@pytest.mark.parametrize("damage, resume", [("bit flip", "auto"), ("truncated", "path"),
                                            ("truncated, no checksum files (older sdtl)", "auto")])
def test_a_damaged_last_pt_falls_back_to_prev_pt_and_says_so(run_copy, tiny_synth, caplog, damage, resume):
    out, ckpt = run_copy, run_copy / "checkpoints"
    assert load(ckpt / "prev.pt")["epoch"] == 1 and load(ckpt / "last.pt")["epoch"] == 2
    if "older sdtl" in damage:
        for sidecar in ckpt.glob("*.sha256"):
            sidecar.unlink()
    flip_a_bit_inside_a_tensor(ckpt / "last.pt") if damage == "bit flip" else truncate(ckpt / "last.pt")
    damaged = (ckpt / "last.pt").read_bytes()

    with caplog.at_level("INFO", logger="sdtl"):
        finetune(tiny_synth, out, "optim.epochs=3", resume="auto" if resume == "auto" else str(ckpt / "last.pt"))
    # with its checksum file the damage is caught by the checksum; without it, by reading the file
    why = "not a readable PyTorch checkpoint" if "older sdtl" in damage else "checksum mismatch"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"{ckpt / 'last.pt'}: ") and why in m and "last.pt.corrupt" in m for m in warned), warned
    assert any(f"resuming from {ckpt / 'prev.pt'} instead, at the end of epoch 1" in m for m in warned), warned
    assert (ckpt / "last.pt.corrupt").read_bytes() == damaged  # kept for inspection, never read again
    assert load(ckpt / "last.pt")["epoch"] == 3 and load(ckpt / "prev.pt")["epoch"] == 2
    assert epochs_logged(out) == [1, 2, 3]  # epoch 2 trained again, logged once
    assert [r["epoch"] for r in load(ckpt / "last.pt")["history"]] == [1, 2, 3]
    assert_checksums_match(ckpt)


def test_a_damaged_mid_epoch_checkpoint_falls_back_to_the_step_before_and_ends_bit_identical(tiny_synth, tmp_path,
                                                                                           caplog):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    finetune(tiny_synth, out, "optim.epochs=1", "run.checkpoint_every_steps=1")
    steps = load(ckpt / "last.pt")["history"][-1]["steps"]
    prev = load(ckpt / "prev.pt")  # mid-epoch checkpoints go through the same rotation
    assert (prev["epoch"], prev["step_in_epoch"]) == (0, steps - 1)
    assert_checksums_match(ckpt)
    reference = load(ckpt / "last.pt")["model"]
    flip_a_bit_inside_a_tensor(ckpt / "last.pt")
    with caplog.at_level("WARNING", logger="sdtl"):
        finetune(tiny_synth, out, "optim.epochs=1", "run.checkpoint_every_steps=1", resume="auto")
    assert f"at epoch 1, step {steps - 1} (0 epoch(s) completed)" in caplog.text
    resumed = load(ckpt / "last.pt")
    assert resumed["epoch"] == 1 and reference.keys() == resumed["model"].keys()
    for key, value in reference.items():  # the last step trained again from prev.pt: the same weights
        assert torch.equal(value, resumed["model"][key]), key
    assert epochs_logged(out) == [1]


def test_when_no_checkpoint_of_the_run_is_usable_one_line_says_what_was_checked(run_copy, capsys):
    from sdtl.models.checkpoints import safe_load

    out, ckpt = run_copy, run_copy / "checkpoints"
    truncate(ckpt / "last.pt")
    (ckpt / "last.pt.sha256").unlink()  # found by reading it, then
    flip_a_bit_inside_a_tensor(ckpt / "prev.pt")  # found by its checksum only
    before = sorted(os.listdir(ckpt))
    rc, err = sdtl(capsys, "finetune", "--out", out, "--resume", "auto")
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"sdtl: error: --resume auto: no usable checkpoint of this run in {ckpt} (checked ")
    assert "last.pt: not a readable PyTorch checkpoint" in line and "prev.pt: checksum mismatch" in line
    assert "best.pt is readable" in line and str(ckpt / "best.pt") in line and "re-download" not in line
    assert sorted(os.listdir(ckpt)) == before  # nothing moved or rewritten when nothing is usable
    with pytest.raises(CheckpointError) as caught:  # a run's own file: never "re-download it"
        safe_load(ckpt / "last.pt")
    assert "re-download" not in str(caught.value) and "resume='auto' falls back" in str(caught.value)
    assert "--resume auto falls back" in caught.value.for_cli()
    with pytest.raises(CheckpointError, match="checksum mismatch"):  # evaluation reads it checked, too
        safe_load(ckpt / "prev.pt")


# ------------------------------------------------------------------------------------------------
# A torn line in metrics.jsonl


def test_a_torn_last_line_in_metrics_jsonl_is_tolerated_on_resume(run_copy, tiny_synth, caplog):
    out = run_copy
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 3, "train_loss": 0.41, "train_c')  # the machine died mid-append
    with caplog.at_level("WARNING", logger="sdtl"):
        finetune(tiny_synth, out, "optim.epochs=3", resume="auto")
    assert "metrics.jsonl: line 3 is incomplete" in caplog.text and "epochs 1-2" in caplog.text
    assert epochs_logged(out) == [1, 2, 3]  # every line parses, one record per epoch
    history = load(out / "checkpoints" / "last.pt")["history"]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"]) for r in logged] == [(r["epoch"], r["train_loss"]) for r in history]


# ------------------------------------------------------------------------------------------------
# An output folder that cannot be written


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a run gets as far as reading its data."""
    import sdtl.engine.finetune

    def refuse(*a, **k):
        raise AssertionError("the run started work before checking its output folder")

    monkeypatch.setattr(sdtl.engine.finetune, "build_datasets", refuse)


@pytest.fixture
def read_only_fs(tmp_path):
    """A tmpfs holding an empty folder and a run folder, remounted read-only (root only)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root; the injected permission error covers the rest")
    yield from _tmpfs(tmp_path / "ro")


@pytest.mark.parametrize("case", ["parent is a file", "permission denied", "read-only filesystem (new folder)",
                                  "read-only filesystem (a run to resume)"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tiny_synth, two_epochs, tmp_path,
                                                                          monkeypatch, capsys, no_work, case,
                                                                          request):
    resume: list[str] = []
    if case == "parent is a file":
        (tmp_path / "notes.txt").write_text("mine")
        out = tmp_path / "notes.txt" / "run"
        folder = tmp_path / "notes.txt"
    elif case == "permission denied":  # as for a user without write permission (root ignores chmod)
        out = folder = tmp_path / "locked"
        out.mkdir()
        import tempfile

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(tempfile, "mkstemp", denied)
    else:
        mountpoint = request.getfixturevalue("read_only_fs")
        if case.endswith("(new folder)"):
            out, folder = mountpoint / "new" / "run", mountpoint
        else:
            out = folder = mountpoint / "run"
            shutil.copytree(two_epochs, out)
            resume = ["--resume", "auto"]
        assert _mount("-o", "remount,ro", str(mountpoint)).returncode == 0
    args = resume or ["--config", "synthetic_tiny", "--set", f"data.root={tiny_synth}"]
    rc, err = sdtl(capsys, "finetune", "--out", out, *args)
    assert rc == 2 and len(err) == 1, err
    assert f"--out {out}" in err[0] and str(folder) in err[0], err
    if case == "parent is a file":
        assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(UserError):  # the library raises the same, typed
        finetune(tiny_synth, out, *(["optim.epochs=3"] if resume else []), resume="auto" if resume else None)
