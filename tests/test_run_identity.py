"""A run's stored config is its identity: resume keeps it, explicit changes are recorded; paths are
stored absolute so a run can be resumed or evaluated from any directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

TINY = ["--set", "optim.epochs=1", "--set", "eval.probe_videos=0", "--set", "run.threads=1"]


def _sdtl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sdtl", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_relative_paths_are_stored_absolute_and_resume_keeps_the_stored_config(tiny_synth, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(tiny_synth)
    res = _sdtl("finetune", "--config", "synthetic_tiny", "--out", "run", "--deterministic",
                "--set", "data.root=data", *TINY, cwd=work)
    assert res.returncode == 0, res.stderr[-2000:]
    stored = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert stored["data"]["root"] == str(work / "data") and stored["run"]["deterministic"] is True
    assert f"at {work / 'data'}," in (work / "run" / "train.log").read_text()  # shown absolute too
    before = (work / "run" / "config.yaml").read_text()

    # resume from another directory, naming the recipe again but not --deterministic: the stored
    # config wins (it used to be rewritten with deterministic: false), nothing is recorded as changed
    other = tmp_path / "elsewhere"
    other.mkdir()
    res = _sdtl("finetune", "--config", "synthetic_tiny", "--out", str(work / "run"), "--resume", "auto", cwd=other)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "run" / "config.yaml").read_text() == before
    assert not (work / "run" / "config_changes.jsonl").exists()

    # an explicit --set on resume is applied, warned and recorded
    res = _sdtl("finetune", "--out", str(work / "run"), "--resume", "auto", "--set", "optim.epochs=2", cwd=other)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "differs from the checkpoint" in res.stderr
    changes = [json.loads(line) for line in (work / "run" / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changes"] == ["optim.epochs: 1 -> 2"] and changes[-1]["epoch"] == 1
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["run"]["deterministic"] is True


def test_train_log_keeps_the_console_lines(tiny_synth, tmp_path):
    res = _sdtl("finetune", "--config", "synthetic_tiny", "--out", "run", "--set", f"data.root={tiny_synth}",
                "--set", "optim.epochs=2", "--set", "run.threads=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 1/2" in log and "epoch 2/2" in log and "eta=" in log and "test (selected" in log


def test_resuming_a_run_made_before_keys_were_added_records_only_real_changes(tmp_path, caplog):
    """A checkpoint's config written by an older sdtl lacks keys added since (``run.trackers``,
    ``run.checkpoint_every_steps``, a pretrain's ``task`` section): they are not changes of the run.
    Only what really differs is warned and recorded."""
    import logging
    from types import SimpleNamespace

    from sdtl.engine import config as cfgmod
    from sdtl.engine.rundir import record_config_changes

    info = SimpleNamespace(is_main=True)
    logger = logging.getLogger("sdtl.test")
    for kind, recipe, added in (("finetune", "synthetic_tiny", ("run", ("trackers", "checkpoint_every_steps"))),
                                ("pretrain", "synthetic_tiny_pretrain", (None, ("task",)))):
        cfg = cfgmod.load_config(recipe, [f"data.root={tmp_path}"], kind=kind)
        old = cfgmod.to_dict(cfg)
        section, keys = added
        for key in keys:
            (old[section] if section else old).pop(key)
        out = tmp_path / kind
        out.mkdir()
        state = {"config": old, "sdtl_format": kind, "epoch": 1}
        assert record_config_changes(cfg, state, out, out / "last.pt", info, logger) == []
        assert not (out / "config_changes.jsonl").exists()

        cfg.optim.epochs += 1  # a real change is still named and recorded
        changed = record_config_changes(cfg, state, out, out / "last.pt", info, logger)
        assert changed == [f"optim.epochs: {cfg.optim.epochs - 1} -> {cfg.optim.epochs}"]
        record = json.loads((out / "config_changes.jsonl").read_text())
        assert record["changes"] == changed and record["epoch"] == 1
