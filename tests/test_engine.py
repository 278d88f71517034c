"""The fine-tuning engine end to end on real (tiny, synthetic) video files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_helpers import free_port
from sdtl.engine import build
from sdtl.engine import finetune as ft
from sdtl.engine.config import load_config
from sdtl.errors import RunFailed, RunInterrupted, UserError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def tiny_cfg(data, *extra):
    return load_config("synthetic_tiny", [f"data.root={data}", *extra])


def sdtl_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sdtl", "-q", *args]


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_finetune_writes_everything(tiny_synth, tiny_encoder, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_synth, f"model.pretrained={tiny_encoder}", "run.tensorboard=true")
    results = ft.run_finetune(cfg, out)

    for name in ("config.yaml", "metrics.jsonl", "curves.png", "confusion.png", "results.json",
                 "checkpoints/last.pt", "checkpoints/best.pt", "probe.pt"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert not list(out.rglob("*.tmp"))

    saved = json.loads((out / "results.json").read_text())
    for key in ("video_acc1", "video_acc5", "clip_acc1", "clip_acc5", "mean_class_acc"):
        assert 0.0 <= saved[key] <= 100.0
        assert saved[key] == results[key]
    assert saved["video_acc5"] >= saved["video_acc1"]
    p = saved["protocol"]
    assert p["views"] == 2 and p["crops"] == 1 and "logits" in p["aggregation"]
    assert "test" in p["split"] and p["checkpoint"] in ("checkpoints/best.pt", "checkpoints/last.pt")
    assert saved["last"]["epoch"] == 2 and saved["selected"]["epoch"] in (1, 2)
    assert saved["num_test_videos"] == 36 and saved["num_test_clips"] == 72
    class_ind = (tiny_synth / "lists" / "classInd.txt").read_text().split()
    assert list(saved["per_class_acc"]) == class_ind[1::2]  # classInd order, every class reported

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]  # epoch 0: the diagnostics where fine-tuning starts
    assert lines[0]["feat_drift"] == 0.0 and lines[0]["param_drift"] == 0.0
    lines = lines[1:]
    for r in lines:
        for key in ("train_loss", "train_ce", "train_sd", "lr", "clips_per_s", "data_wait", "val_video_acc1",
                    "feat_drift", "feat_cka", "param_drift"):
            assert key in r, key
        assert abs(r["train_loss"] - (r["train_ce"] + r["train_sd"])) < 1e-4 * max(1.0, r["train_loss"])
        assert 0.0 <= r["data_wait"] <= 1.0
    assert lines[0]["lr"] > lines[1]["lr"]  # cosine schedule

    effective = yaml.safe_load((out / "config.yaml").read_text())
    assert effective["kind"] == "finetune" and effective["model"]["pretrained"] == str(tiny_encoder)

    # evaluate re-creates the model from the checkpoint alone and reproduces the test figures
    ev_out = tmp_path / "eval"
    proc = subprocess.run(sdtl_cmd("evaluate", "--checkpoint", str(out / saved["protocol"]["checkpoint"]),
                                   "--out", str(ev_out)), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    again = json.loads((ev_out / "results.json").read_text())
    for key in ("video_acc1", "video_acc5", "clip_acc1", "mean_class_acc"):
        assert again[key] == pytest.approx(saved[key], abs=1e-6)


def test_pretrained_encoder_is_loaded_into_the_classifier(tiny_synth, tiny_encoder):
    cfg = tiny_cfg(tiny_synth, f"model.pretrained={tiny_encoder}")
    model, report = build.build_classifier(cfg, num_classes=6)
    enc_state = torch.load(tiny_encoder, map_location="cpu", weights_only=True)["encoder"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, enc_state[key]), key
    assert report is not None


def test_lambda_zero_builds_no_teacher(tiny_synth, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a teacher was built with lambda = 0")

    import sdtl.regularizers.self_distillation as sdmod

    monkeypatch.setattr(sdmod.SelfDistillation, "snapshot", forbidden)
    monkeypatch.setattr(sdmod.SelfDistillation, "__init__", forbidden)
    cfg = tiny_cfg(tiny_synth, "regularizer.weight=0", "optim.epochs=1", "eval.probe_videos=0")
    ft.run_finetune(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "train_sd" not in record and record["train_loss"] == pytest.approx(record["train_ce"])


class _NaNAfter:
    """Stands in for torch.nn.functional inside the engine: cross-entropy turns NaN after N calls."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def cross_entropy(self, *args, **kwargs):
        self.calls -= 1
        out = torch.nn.functional.cross_entropy(*args, **kwargs)
        return out * float("nan") if self.calls < 0 else out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_synth, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_synth, "optim.epochs=3", "eval.probe_videos=0")
    steps_per_epoch = 24 // 4  # 24 training videos, batch 4, drop_last
    monkeypatch.setattr(ft, "F", _NaNAfter(steps_per_epoch + 2))
    with pytest.raises(RunFailed, match=r"'ce' became nan at epoch 2, step 3.*last.pt"):
        ft.run_finetune(cfg, out)
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _run_and_kill(cmd, out: Path, kill_when) -> None:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if kill_when(out):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)
    pytest.fail(f"run finished before the kill point: {proc.stderr.read().decode()[-2000:]}")


def test_kill_and_resume_is_bit_exact(tiny_synth, tiny_encoder, tmp_path):
    common = ["finetune", "--config", "synthetic_tiny", "--deterministic", "--set", f"data.root={tiny_synth}",
              "--set", f"model.pretrained={tiny_encoder}", "--set", "optim.epochs=3",
              "--set", "data.workers=2", "--set", "run.threads=1"]
    ref = tmp_path / "ref"
    subprocess.run(sdtl_cmd(*common, "--out", str(ref)), env=ENV, check=True)
    reference = model_state(ref / "checkpoints" / "last.pt")

    def before_any_checkpoint(out: Path) -> bool:
        return (out / "config.yaml").exists()

    # (kills inside and at the end of epochs, at random moments: tests/test_stop_and_resume.py)
    for name, kill_when in (("epoch-1", before_any_checkpoint),):
        out = tmp_path / name
        _run_and_kill(sdtl_cmd(*common, "--out", str(out)), out, kill_when)
        # a second start without --resume must refuse, leaving the run untouched
        proc = subprocess.run(sdtl_cmd(*common, "--out", str(out)), env=ENV, capture_output=True, text=True)
        assert proc.returncode == 2 and "--resume auto" in proc.stderr
        subprocess.run(sdtl_cmd(*common, "--out", str(out), "--resume", "auto"), env=ENV, check=True)
        resumed = model_state(out / "checkpoints" / "last.pt")
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), f"{name}: {key} differs after resume"
        history = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert history == [0, 1, 2, 3]


def test_ddp_two_gloo_processes(tiny_synth, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "sdtl", "-q", "finetune", "--config", "synthetic_tiny",
           "--out", str(out), "--set", f"data.root={tiny_synth}", "--set", "data.batch_size=2",
           "--set", "run.threads=1", "--set", "optim.lp_epochs=1"]  # epoch 1: LP-FT's head-only step outside DDP
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_test_videos"] == 36  # every test video counted exactly once across 2 ranks
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all(r["world_size"] == 2 for r in records[1:])
    assert records[1]["steps"] == 24 // 2 // 2  # 24 videos sharded over 2 ranks, batch 2 per rank
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lrr=0.1"], "config key optim.lrr: unknown key"),
    (["--set", "optim.lr=fast"], "config key optim.lr: expected float"),
    (["--set", "regularizer.weight=-1"], "regularizer.weight: must be >= 0"),
    (["--set", "data.root=/nonexistent/videos"], "/nonexistent/videos"),
    (["--config", "no_such_recipe"], "no such recipe"),
    (["--set", "eval.crops=2"], "eval.crops: must be 1 or 3"),
])
def test_config_errors_exit_2_and_write_nothing(tiny_synth, tmp_path, args, message):
    out = tmp_path / "run"
    base = ["finetune", "--out", str(out)]
    if "--config" not in args:
        base += ["--config", "synthetic_tiny", "--set", f"data.root={tiny_synth}"]
    proc = subprocess.run(sdtl_cmd(*base, *args), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_output_dir_in_use_is_refused(tiny_synth, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds files"):
        ft.run_finetune(tiny_cfg(tiny_synth), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _copy_with_corrupt_train_video(src: Path, dst: Path) -> str:
    import shutil

    shutil.copytree(src, dst)
    first = (dst / "lists" / "trainlist01.txt").read_text().splitlines()[0].split()[0]
    (dst / "videos" / first).write_bytes(b"")  # zero-byte file, as a failed download leaves it
    return first


def test_corrupt_training_video_is_skipped_quarantined_and_counted(tiny_synth, tmp_path):
    data = tmp_path / "data"
    bad = _copy_with_corrupt_train_video(tiny_synth, data)
    out = tmp_path / "run"
    cfg = tiny_cfg(data, "optim.epochs=1", "data.max_corrupt_fraction=0.5", "eval.probe_videos=0",
                   "data.val_fraction=0")
    ft.run_finetune(cfg, out)
    quarantined = (out / "quarantine.txt").read_text().splitlines()
    assert len(quarantined) == 1 and quarantined[0].startswith(str(data / "videos" / Path(bad).parent))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["corrupt_skipped"] >= 1

    # with the default 1% budget the same data stops the run with a report naming the file
    with pytest.raises(RunFailed, match=Path(bad).stem):
        ft.run_finetune(tiny_cfg(data, "optim.epochs=1", "eval.probe_videos=0", "data.val_fraction=0"),
                        tmp_path / "run2")


def test_corrupt_test_video_is_refused_unless_skipped(tiny_synth, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_synth, data)
    first = (data / "lists" / "testlist01.txt").read_text().splitlines()[0].split()[0]
    (data / "videos" / first).write_text("not a video")
    out = tmp_path / "run"
    with pytest.raises(UserError, match=Path(first).stem):
        ft.run_finetune(tiny_cfg(data, "optim.epochs=1", "eval.probe_videos=0"), out)
    assert (out / "checkpoints" / "last.pt").exists() and not (out / "results.json").exists()
    # the finished training is not lost: the test can be redone with an explicit skip
    proc = subprocess.run(sdtl_cmd("evaluate", "--checkpoint", str(out / "checkpoints" / "last.pt"),
                                   "--out", str(tmp_path / "eval"), "--set", "eval.skip_corrupt=true"),
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["skipped_corrupt"] == 1 and res["num_test_videos"] == 35


def test_resume_can_extend_epochs_but_not_change_the_model(tiny_synth, tmp_path, caplog):
    out = tmp_path / "run"
    ft.run_finetune(tiny_cfg(tiny_synth, "optim.epochs=1", "eval.probe_videos=0"), out)
    with pytest.raises(UserError, match="do not fit the configured model"):
        ft.run_finetune(tiny_cfg(tiny_synth, "optim.epochs=2", "model.width=0.125", "eval.probe_videos=0"),
                        out, resume="auto")
    assert not (out / "config_changes.jsonl").exists()  # a refused resume is not recorded as a change
    with caplog.at_level("WARNING"):
        ft.run_finetune(tiny_cfg(tiny_synth, "optim.epochs=2", "eval.probe_videos=0"), out, resume="auto")
    assert "optim.epochs: 1 -> 2" in caplog.text
    changes = [json.loads(x)["changes"] for x in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [["optim.epochs: 1 -> 2"]]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_acc5_is_printed_only_where_it_can_be_below_100():
    from sdtl.engine.evaluate import accuracy_line

    metrics = {"video_acc1": 40.0, "video_acc5": 100.0, "clip_acc1": 38.5, "mean_class_acc": 39.0}
    assert "acc@5" not in accuracy_line(metrics, 5)  # top-5 of 5 classes is always right
    assert "acc@5 100.00" in accuracy_line(metrics, 6) and "video acc@1 40.00" in accuracy_line(metrics, 6)


def test_no_progress_bars_into_a_redirected_log(monkeypatch):
    import io

    from sdtl.engine.runtime import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe: the epoch lines are the log
    assert progress(10, "epoch 1/2", enabled=True).disable
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress(10, "epoch 1/2", enabled=True)
    assert not bar.disable
    bar.close()
    assert progress(10, "epoch 1/2", enabled=False).disable  # run.progress=false still wins


def test_a_pretrain_config_refused_at_setup_leaves_no_run_folder(tiny_synth, tmp_path):
    from sdtl.engine.pretrain import run_pretrain

    out = tmp_path / "pre"
    cfg = load_config("synthetic_tiny_pretrain", [f"data.root={tiny_synth}", "data.batch_size=1000"], kind="pretrain")
    with pytest.raises(UserError, match="data.batch_size"):
        run_pretrain(cfg, out)
    assert not out.exists()  # a second try with a fixed batch size is not refused as "already holds a run"


def test_run_pretrain_calls_extra_callbacks_after_its_own(tiny_synth, tmp_path):
    """Pre-training takes call-outs as fine-tuning does (a tuner, a tracker): each runs at every epoch end,
    after the run's own (the epoch's record is in metrics.jsonl by then)."""
    from sdtl.engine.callbacks import Callback
    from sdtl.engine.pretrain import run_pretrain

    out, seen = tmp_path / "pre", []

    class Spy(Callback):
        def on_epoch_end(self, loop, record):
            seen.append((record["epoch"], len((out / "metrics.jsonl").read_text().splitlines())))

    cfg = load_config("synthetic_tiny_pretrain", [f"data.root={tiny_synth}", "optim.epochs=2", "run.threads=1"],
                      kind="pretrain")
    run_pretrain(cfg, out, callbacks=(Spy(),))
    assert seen == [(1, 1), (2, 2)]


def test_run_interrupted_keeps_its_checkpoint_and_signal_through_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(RunInterrupted("stopped by SIGUSR1", checkpoint="c/last.pt", signum=10)))
    assert (str(exc), exc.checkpoint, exc.signum, exc.exit_code) == ("stopped by SIGUSR1", "c/last.pt", 10, 75)
