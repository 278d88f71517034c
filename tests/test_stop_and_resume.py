"""Mid-epoch checkpoints, stop requests and exact resume through the one training loop.

A run killed with SIGKILL at moments inside epochs (several times) and resumed each time ends
tensor-for-tensor equal to an uninterrupted run, with the same per-epoch losses; SIGTERM / SIGUSR1 /
SIGINT stop a run after the current step with its state written and exit status 75; pre-training
resumes exactly too; checkpoints written before the one-layout change still resume.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STOPPED = 75  # RunInterrupted.exit_code


def sdtl_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sdtl", "-q", *args]


def finetune_args(data, encoder, out: Path, *extra) -> list[str]:
    # SD with a teacher refreshed every 3 steps (so a mid-epoch teacher differs from both the epoch-start
    # snapshot and the model), dropout (the global RNG matters), a checkpoint after every step.
    sets = [f"data.root={data}", f"model.pretrained={encoder}", "optim.epochs=3", "run.threads=1",
            "regularizer.snapshot_every=3", "model.dropout=0.5", *extra]
    return ["finetune", "--config", "synthetic_tiny", "--deterministic", "--out", str(out),
            *[a for s in sets for a in ("--set", s)]]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def learning_record(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (which no two runs share)."""
    timing = {"clips_per_s", "data_wait", "epoch_time_s"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def mid_epoch_position(out: Path):
    """(epoch, step) of the run's last.pt if it was written inside an epoch, else None."""
    path = out / "checkpoints" / "last.pt"
    try:
        ckpt = load(path)
    except Exception:  # noqa: BLE001 - not there yet (renames are atomic, so never half a file)
        return None
    return (ckpt["epoch"], ckpt["step_in_epoch"]) if ckpt.get("step_in_epoch") else None


@pytest.fixture(scope="module")
def reference(tiny_synth, tiny_encoder, tmp_path_factory):
    """Uninterrupted runs (no mid-epoch checkpoints at all), for workers 0 and 2."""
    refs = {}
    for workers in (0, 2):
        out = tmp_path_factory.mktemp("ref") / f"w{workers}"
        subprocess.run(sdtl_cmd(*finetune_args(tiny_synth, tiny_encoder, out, f"data.workers={workers}")),
                       env=ENV, check=True)
        refs[workers] = out
    return refs


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_at_random_moments_inside_epochs_resumes_bit_exact(tiny_synth, tiny_encoder, reference, tmp_path,
                                                                 workers):
    out = tmp_path / "run"
    args = finetune_args(tiny_synth, tiny_encoder, out, f"data.workers={workers}", "run.checkpoint_every_steps=1")
    rng = random.Random(1234 + workers)  # the kill moments: random, but the same on every test run
    killed_at = []
    resume: list[str] = []

    def inside_epochs():
        return [p for p in killed_at if p is not None and p[1] > 0]

    # A kill can land just after an epoch's end was saved (position None): that resume is fine too, but it
    # does not count; go on until three kills have landed inside epochs (3 epochs x 5 steps leave room).
    while len(inside_epochs()) < 3 and len(killed_at) < 8:
        proc = subprocess.Popen(sdtl_cmd(*args, *resume), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = mid_epoch_position(out)
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            position = mid_epoch_position(out)
            if position is not None and position != start:
                time.sleep(rng.uniform(0.0, 0.15))  # somewhere in the next step(s)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at.append(mid_epoch_position(out))
                break
            time.sleep(0.01)
        else:
            pytest.fail(f"the run ended before a kill (killed so far at {killed_at}): "
                        f"{proc.stderr.read().decode()[-2000:]}")
        resume = ["--resume", "auto"]
    assert len(inside_epochs()) >= 3, killed_at  # at least three resumes start inside an epoch
    subprocess.run(sdtl_cmd(*args, "--resume", "auto"), env=ENV, check=True)

    ref = reference[workers]
    assert_same_weights(load(out / "checkpoints" / "last.pt")["model"], load(ref / "checkpoints" / "last.pt")["model"],
                        f"killed at {killed_at}")
    assert learning_record(out) == learning_record(ref)  # every epoch's losses, validation and probes
    assert json.loads((out / "results.json").read_text())["video_acc1"] == \
        json.loads((ref / "results.json").read_text())["video_acc1"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_request_writes_state_exits_75_and_resumes_exactly(tiny_synth, tiny_encoder, reference, tmp_path, sig):
    out = tmp_path / "run"
    # No periodic mid-epoch checkpoints: the stop request alone writes one.
    args = finetune_args(tiny_synth, tiny_encoder, out, "data.workers=0")
    proc = subprocess.Popen(sdtl_cmd(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)  # epoch 1 is finished: the signal lands inside epoch 2 (or at its end)
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED, stderr
    assert f"stopped by {sig}" in stderr and "--resume auto" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr  # one line, no traceback
    ckpt = load(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] >= 1 and (ckpt["epoch"], ckpt["step_in_epoch"]) != (3, 0)
    assert not (out / "results.json").exists()
    if sig != "SIGTERM":
        return  # every signal sets the same flag; the resume after it is checked once (and after kills above)

    subprocess.run(sdtl_cmd(*args, "--resume", "auto"), env=ENV, check=True)
    assert_same_weights(load(out / "checkpoints" / "last.pt")["model"],
                        load(reference[0] / "checkpoints" / "last.pt")["model"], f"stopped by {sig}")
    assert learning_record(out) == learning_record(reference[0])


def test_sigterm_to_the_whole_process_group_with_loader_workers_stops_cleanly(tiny_synth, tiny_encoder, reference,
                                                                              tmp_path):
    """Slurm's scancel / preemption and a terminal signal every process of the job, DataLoader workers
    too. The workers must leave the stop to the main process (torch's own worker handler let them die,
    and the run crashed with "DataLoader worker ... is killed by signal" and no state)."""
    out = tmp_path / "run"
    args = finetune_args(tiny_synth, tiny_encoder, out, "data.workers=2")
    proc = subprocess.Popen(sdtl_cmd(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job step is
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)  # epoch 1 is finished and the persistent workers are serving epoch 2
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED, stderr
    assert "stopped by SIGTERM" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert load(out / "checkpoints" / "last.pt")["epoch"] >= 1 and not (out / "results.json").exists()

    subprocess.run(sdtl_cmd(*args, "--resume", "auto"), env=ENV, check=True)
    assert_same_weights(load(out / "checkpoints" / "last.pt")["model"],
                        load(reference[2] / "checkpoints" / "last.pt")["model"], "SIGTERM to the process group")
    assert learning_record(out) == learning_record(reference[2])


def test_pretraining_stopped_mid_epoch_resumes_exactly(tiny_synth, tmp_path):
    common = ["pretrain", "--config", "synthetic_tiny_pretrain", "--deterministic", "--set", f"data.root={tiny_synth}",
              "--set", "optim.epochs=2", "--set", "data.batch_size=2", "--set", "run.threads=1"]
    ref = tmp_path / "ref"
    subprocess.run(sdtl_cmd(*common, "--out", str(ref)), env=ENV, check=True)
    out = tmp_path / "run"
    args = [*common, "--out", str(out), "--set", "run.checkpoint_every_steps=2"]
    proc = subprocess.Popen(sdtl_cmd(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while mid_epoch_position(out) is None:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == STOPPED, stderr
    assert mid_epoch_position(out) is not None
    subprocess.run(sdtl_cmd(*args, "--resume", "auto"), env=ENV, check=True)
    a, b = load(out / "checkpoints" / "encoder.pt"), load(ref / "checkpoints" / "encoder.pt")
    assert_same_weights(a["encoder"], b["encoder"], "pretrain encoder")
    assert_same_weights(a["head"], b["head"], "pretrain head")
    assert learning_record(out) == learning_record(ref)


def _as_version_1(payload: dict) -> dict:
    """A checkpoint in the layout sdtl wrote before the one-state change (version 1)."""
    old = {k: v for k, v in payload.items()
           if k not in ("task_state", "callback_state", "loop_state", "step_in_epoch")}
    old["version"] = 1
    old["regularizer_state"] = (payload.get("task_state") or {}).get("regularizer")
    old["probe_prev_features"] = payload["callback_state"]["forgetting"]["prev_features"]
    return old


class _Crash(BaseException):
    """Stands for a kill: nothing in the engine catches it."""


def test_a_version_1_checkpoint_resumes_to_the_same_weights(tiny_synth, tiny_encoder, reference, tmp_path,
                                                             monkeypatch):
    from sdtl.engine.config import load_config
    from sdtl.engine.finetune import run_finetune
    from sdtl.engine.loop import Loop
    from sdtl.models.checkpoints import save_checkpoint

    out = tmp_path / "run"
    cfg = load_config("synthetic_tiny", [f"data.root={tiny_synth}", f"model.pretrained={tiny_encoder}",
                                         "optim.epochs=3", "run.threads=1", "regularizer.snapshot_every=3",
                                         "model.dropout=0.5", "data.workers=0", "run.deterministic=true"])
    real_epoch = Loop.train_epoch

    def stop_before_epoch_3(self, epoch):  # the run dies at the end of epoch 2 (its checkpoint written)
        if epoch == 3:
            raise _Crash
        return real_epoch(self, epoch)

    monkeypatch.setattr(Loop, "train_epoch", stop_before_epoch_3)
    with pytest.raises(_Crash):
        run_finetune(cfg, out)
    monkeypatch.setattr(Loop, "train_epoch", real_epoch)
    last = out / "checkpoints" / "last.pt"
    save_checkpoint(_as_version_1(load(last)), last)  # as sdtl wrote it before the one-layout change
    assert load(last)["version"] == 1 and load(last)["epoch"] == 2
    run_finetune(cfg, out, resume="auto")
    assert_same_weights(load(last)["model"], load(reference[0] / "checkpoints" / "last.pt")["model"], "v1 resume")
    assert learning_record(out) == learning_record(reference[0])


def test_ddp_killed_inside_an_epoch_resumes_bit_exact(tiny_synth, tiny_encoder, tmp_path):
    """Two gloo ranks: each rank's RNG (dropout), epoch meter and position come back from the checkpoint."""
    from data_helpers import free_port

    def torchrun(out: Path, *extra, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "sdtl", "-q",
                *finetune_args(tiny_synth, tiny_encoder, out, "data.batch_size=2", "data.workers=0", *extra),
                *(["--resume", "auto"] if resume else [])]

    ref = tmp_path / "ref"
    subprocess.run(torchrun(ref), env=ENV, check=True, capture_output=True, timeout=600)
    out = tmp_path / "run"
    proc = subprocess.Popen(torchrun(out, "run.checkpoint_every_steps=1"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while (mid_epoch_position(out) or (0, 0))[0] < 1:  # inside epoch 2
        assert proc.poll() is None and time.time() < deadline, "the run ended before the kill"
        time.sleep(0.01)
    # torchrun starts its ranks in sessions of their own: kill them (and what they started), then torchrun
    ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    for pid in ranks:
        os.killpg(os.getpgid(int(pid)), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in ranks:  # the ranks are gone before anything resumes (no orphan finishes the run meanwhile)
        deadline = time.time() + 30
        while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            assert time.time() < deadline, f"rank process {pid} survived SIGKILL"
            time.sleep(0.05)
    killed_at = mid_epoch_position(out)
    assert killed_at is not None and killed_at[1] > 0
    ckpt = load(out / "checkpoints" / "last.pt")
    assert len(ckpt["ranks"]) == 2 and not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])
    subprocess.run(torchrun(out, "run.checkpoint_every_steps=1", resume=True), env=ENV, check=True,
                   capture_output=True, timeout=600)
    assert_same_weights(load(out / "checkpoints" / "last.pt")["model"], load(ref / "checkpoints" / "last.pt")["model"],
                        f"DDP killed at {killed_at}")
    assert learning_record(out) == learning_record(ref)


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return i


def test_loader_workers_outlive_an_outside_stop_signal_and_end_on_their_parents_sigterm():
    """What the engine's loaders give their workers (runtime.ignore_stop_signals): a SIGTERM / SIGUSR1 /
    SIGINT sent by anyone else (Slurm, a terminal's process group) is ignored, so the main process can
    finish its step and write its state; a SIGTERM from the parent (multiprocessing's and torch's
    shutdown, at interpreter exit too) still ends a worker at once: ignoring that one made a finished
    run hang at exit."""
    from sdtl.engine.runtime import ignore_stop_signals

    loader = torch.utils.data.DataLoader(_Numbers(), batch_size=2, num_workers=2, persistent_workers=True,
                                         worker_init_fn=ignore_stop_signals)
    it = iter(loader)
    for _ in range(2):  # batches come from the workers in turn: each has run its worker_init_fn by now
        next(it)
    workers = list(it._workers)
    for w in workers:
        for sig in ("TERM", "USR1", "INT"):
            subprocess.run(["kill", f"-{sig}", str(w.pid)], check=True)  # sent by another process
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    assert [int(x) for x in next(it)] and [int(x) for x in next(it)]  # still serving batches
    for w in workers:
        w.terminate()  # what multiprocessing's exit handler does to daemonic children before joining them
        w.join(10)
    assert not any(w.is_alive() for w in workers), "a worker ignored its parent's SIGTERM (the exit would hang)"
    assert all(w.exitcode == 0 for w in workers)
    it._shutdown_workers()
