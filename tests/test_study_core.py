"""The studies' shared core (sdtl.studies.core): claiming an output folder, the executors, collecting
and summarising finished runs, and the fixes found as a new user (interrupt hints, chance lines,
wall time over invocations, demo seeds never shrinking, wise.md's terms)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from sdtl.errors import RunFailed, UserError
from sdtl.studies import core, plots


def fake_run(root: Path, name: str, seed: int, test: float, val_by_epoch: dict[int, float], selected: int,
             classes: int = 5, finished: bool = True, method: str | None = None, point=None) -> core.RunSpec:
    """A run folder as `sdtl finetune` leaves it (results.json, metrics.jsonl), without training."""
    spec = core.RunSpec(name, root / "runs" / name, "synthetic_tiny", [f"run.seed={seed}"], seed, method,
                        dict(point or {}))
    spec.dir.mkdir(parents=True)
    history = [{"epoch": e, "val_video_acc1": v, "epoch_time_s": 2.0, "retention_acc": 50.0 + e}
               for e, v in val_by_epoch.items()]
    (spec.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (spec.dir / "config.yaml").write_text("kind: finetune\n")
    if finished:
        (spec.dir / "results.json").write_text(json.dumps({
            "video_acc1": test, "mean_class_acc": test - 1, "video_acc5": 100.0, "eval_time_s": 1.5,
            "per_class_acc": {f"c{i}": test for i in range(classes)},
            "selected": {"epoch": selected}, "last": {"video_acc1": test - 2}}))
    return spec


# ---------------------------------------------------------------------------------- claim_out
def test_claim_out_new_empty_and_own_folders(tmp_path):
    from sdtl.engine.runlock import LOCK_NAME

    assert core.claim_out(tmp_path / "new", "sweep", "sweep.json", {"a": 1}) is None
    assert not (tmp_path / "new").exists()  # claiming writes nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("")  # a lock file left by an earlier process does not make it foreign
    assert core.claim_out(empty, "sweep", "sweep.json", {"a": 1}) is None
    own = tmp_path / "own"
    own.mkdir()
    (own / "sweep.json").write_text(json.dumps({"identity": {"a": [1, 2]}, "extra": "kept"}))
    assert core.claim_out(own, "sweep", "sweep.json", {"a": (1, 2)})["extra"] == "kept"  # tuples compare as JSON
    with pytest.raises(UserError, match=r"other settings \(a: \[1, 2\] -> 3\)"):
        core.claim_out(own, "sweep", "sweep.json", {"a": 3})


def test_claim_out_never_takes_a_foreign_folder(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("important")
    (foreign / "summary.md").write_text("mine")
    before = {p.name: p.read_text() for p in foreign.iterdir()}
    with pytest.raises(UserError, match=r"not an sdtl demo folder \(it holds summary.md, thesis.tex but no demo.json\)"
                                         r".*--force") as err:
        core.claim_out(foreign, "demo", "demo.json", {}, force=False)
    assert "--force" not in str(core_refusal(foreign, force=None))  # a study without --force does not offer it
    # --force adds the study's files to a foreign folder, but never writes over one it did not write
    assert core.claim_out(foreign, "demo", "demo.json", {}, force=True) is None
    with pytest.raises(UserError, match="already holds summary.md, which the demo would write over"):
        core.claim_out(foreign, "demo", "demo.json", {}, force=True, writes={"summary.md", "runs"})
    assert {p.name: p.read_text() for p in foreign.iterdir()} == before
    assert "thesis" in str(err.value)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        core.claim_out(afile, "sweep", "sweep.json")
    assert afile.read_text() == "x"


def core_refusal(out: Path, force) -> UserError:
    with pytest.raises(UserError) as err:
        core.claim_out(out, "sweep", "sweep.json", force=force)
    return err.value


def test_claim_out_write_once_study_and_custom_identity_check(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "wise.json").write_text("{}")
    with pytest.raises(UserError, match=r"already holds wise.json \(a finished `sdtl wise`\)") as err:
        core.claim_out(out, "wise", "wise.json", reuse=False)
    assert "sweep" not in str(err.value)  # wise called its own report "a finished sweep"
    seen = []

    def check(where, old, new, extend):
        seen.append((where, old, new, extend))

    (out / "s.json").write_text(json.dumps({"identity": {"seeds": 2}}))
    core.claim_out(out, "sweep", "s.json", {"seeds": 3}, extend=True, check=check)
    assert seen == [(out, {"seeds": 2}, {"seeds": 3}, True)]


def test_study_folder_locks_and_leaves_nothing_behind_on_bad_input(tmp_path):
    from sdtl.engine.runlock import LOCK_NAME

    out = tmp_path / "new"
    with pytest.raises(UserError, match="bad"):
        with core.study_folder(out, "sweep", lambda: core.claim_out(out, "sweep", "sweep.json")):
            assert (out / LOCK_NAME).exists()
            raise UserError("bad")
    assert not out.exists()
    kept = tmp_path / "kept"  # a folder that existed before is never removed
    kept.mkdir()
    with pytest.raises(UserError):
        with core.study_folder(kept, "sweep", lambda: core.claim_out(kept, "sweep", "sweep.json")):
            raise UserError("bad")
    assert kept.is_dir()
    claims = []
    with core.study_folder(out, "sweep", lambda: claims.append(1) or {"m": 1}) as marker:
        assert marker == {"m": 1}
    assert len(claims) == 2  # once before the lock file is written, once under the lock


# ------------------------------------------------------------------------------ summarise / fmt
def test_stat_and_fmt():
    assert core.fmt(core.stat([1.0, 2.0, 3.0])) == "2.0 ± 1.0"
    assert core.fmt(core.stat([1.0, 2.0, 3.0]), 2) == "2.00 ± 1.00"
    assert core.fmt(core.stat([4.0])) == "4.0 ± 0.0"
    assert core.fmt(core.stat([])) == "—"
    assert core.fmt(core.stat([1.0, float("nan")])) == "—"  # a NaN mean is no number to print
    assert core.fmt(core.stat([1.0, float("nan"), 3.0], drop_nan=True)) == "2.0 ± 1.4"
    s = core.stat([1.0, 3.0])
    assert s == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "values": [1.0, 3.0]}


def test_collect_and_summarise_finished_runs(tmp_path):
    runs = [fake_run(tmp_path, "a/seed0", 0, 60.0, {1: 40.0, 2: 55.0, 3: 50.0}, selected=2, point={"w": "1"}),
            fake_run(tmp_path, "a/seed1", 1, 70.0, {1: 45.0, 2: 65.0}, selected=2, point={"w": "1"}),
            fake_run(tmp_path, "b/seed0", 0, 30.0, {1: 20.0}, selected=1, point={"w": "2"}),
            fake_run(tmp_path, "b/seed1", 1, 0.0, {1: 10.0}, selected=1, point={"w": "2"}, finished=False)]
    c = core.collect(runs[0])
    assert c["val"] == 55.0 and c["epoch"] == 2  # the validation value of the epoch that was selected
    assert c["test"] == 60.0 and c["test_last"] == 58.0 and c["test_mean_class"] == 59.0
    assert c["num_classes"] == 5 and c["seconds"] == 3 * 2.0 + 1.5
    assert core.final(c["history"], "retention_acc") == 53.0 and math.isnan(core.final(c["history"], "nope"))
    rows = core.summarise(runs, {"val": lambda c: c["val"], "test": lambda c: c["test"]},
                          by=lambda r: r.point["w"], failed={"a/seed1": "diverged"}, root=tmp_path)
    assert list(rows) == ["1", "2"]
    a, b = rows["1"], rows["2"]
    # a failed run is not summarised even if it left a results.json; an unfinished one counts as failed
    assert a["failed"] == {"a/seed1": "diverged"} and a["finished"] == 1 and a["runs"] == 2
    assert a["test"]["values"] == [60.0] and a["dirs"] == ["runs/a/seed0"] and a["seeds"] == [0]
    assert b["failed"] == {"b/seed1": "not finished"} and b["val"]["values"] == [20.0]
    assert core.num_classes_of(runs) == 5


def test_wall_time_adds_up_over_invocations():
    first = core.accumulate_wall_time({}, {"total_s": 60.0, "data_s": 5.0})
    assert first == {"total_s": 60.0, "data_s": 5.0, "invocations": 1}
    second = core.accumulate_wall_time(first, {"total_s": 0.5, "data_s": 0.0})
    assert second == {"total_s": 60.5, "data_s": 5.0, "invocations": 2}
    # a folder made before invocations were counted: its recorded time is one invocation
    assert core.accumulate_wall_time({"total_s": 10.0}, {"total_s": 1.0})["invocations"] == 2


# ------------------------------------------------------------------------------------ executors
def test_in_process_executor_runs_in_order_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    import sdtl.engine.finetune as finetune

    calls = []

    def fake_run_finetune(cfg, out_dir, resume):
        calls.append((Path(out_dir).name, cfg.run.seed, resume))
        if cfg.run.seed == 1:
            raise RunFailed("loss is NaN")

    monkeypatch.setattr(finetune, "run_finetune", fake_run_finetune)
    specs = [core.RunSpec(f"r{s}", tmp_path / f"r{s}", "synthetic_tiny", [f"run.seed={s}"], s) for s in (2, 1, 0)]
    failed = core.InProcess("test").run(specs)
    assert calls == [("r2", 2, "auto"), ("r1", 1, "auto"), ("r0", 0, "auto")]  # the order given
    assert failed == {"r1": "loss is NaN"}
    assert isinstance(core.make_executor("x", 1, tmp_path), core.InProcess)
    assert isinstance(core.make_executor("x", 3, tmp_path), core.SubprocessPool)
    with pytest.raises(UserError, match="--parallel 0"):
        core.make_executor("x", 0, tmp_path)


def test_subprocess_pool_really_runs_runs(tiny_synth, tmp_path):
    sets = [f"data.root={tiny_synth}", "optim.epochs=1", "eval.probe_videos=0", "eval.num_clips=1",
            "run.threads=1", "run.seed=3"]
    good = core.RunSpec("good/seed3", tmp_path / "good", "synthetic_tiny", sets, 3)
    bad = core.RunSpec("bad", tmp_path / "bad", "synthetic_tiny", [*sets, "optim.lr=-1"], 3)
    cfgs = core.build_configs([good], "test")
    failed = core.run_all([good, bad], [cfgs[0], cfgs[0]], core.SubprocessPool("test", 2, tmp_path / "logs", 0.1),
                          "test")
    res = json.loads((good.dir / "results.json").read_text())
    assert res["video_acc1"] >= 0 and "seed: 3" in (good.dir / "config.yaml").read_text()
    assert list(failed) == ["bad"] and failed["bad"].startswith("exit 2:") and "optim.lr" in failed["bad"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["bad.log", "good__seed3.log"]
    with pytest.raises(UserError, match=r"test run bad: .*optim.lr"):
        core.build_configs([bad], "test")


def test_run_all_says_what_it_reuses_and_refuses_another_config(tmp_path, caplog):
    done = fake_run(tmp_path, "done", 0, 50.0, {1: 50.0}, 1)
    ran = []

    class Recorder(core.Executor):
        def run(self, todo):
            ran.extend(s.name for s in todo)
            return {}

    from sdtl.engine.config import load_config

    cfg = load_config("synthetic_tiny", [])
    (done.dir / "config.yaml").unlink()  # no stored config: nothing to compare
    todo = core.RunSpec("todo", tmp_path / "runs" / "todo", "synthetic_tiny", [], 0)
    with caplog.at_level(logging.INFO, logger="sdtl.studies"):
        core.run_all([done, todo], [cfg, cfg], Recorder(), "demo")
    assert ran == ["todo"]
    assert "demo: 2 runs: 1 finished earlier (reused as they are: done), 1 to run" in caplog.text
    (done.dir / "config.yaml").write_text("kind: finetune\noptim:\n  epochs: 99\n")
    with pytest.raises(UserError, match=r"done: this run was made with other settings"):
        core.run_all([done], [cfg], Recorder(), "demo")


# ----------------------------------------------------------------------------- the fixed problems
@pytest.mark.parametrize("command", [["demo"], ["sweep", "--config", "c", "--grid", "a=1", "--out", "s"],
                                     ["compare"], ["wise", "--finetuned", "f", "--out", "w"]])
def test_studies_say_how_to_continue_after_an_interrupt(command):
    from sdtl.cli import build_parser

    hint = build_parser().parse_args(command).resume_hint
    assert "--resume" not in hint  # these commands have no such flag
    assert "re-run the same command" in hint


def test_every_command_s_interrupt_hint_names_only_flags_it_has():
    """``(resume with --resume auto)`` only where the command has ``--resume`` (finetune, pretrain);
    evaluate, probe, synth, data ... are re-run (``sdtl evaluate --resume auto`` is an argparse error)."""
    import argparse

    from sdtl.cli import RERUN_HINT, build_parser

    def commands(parser, path=()):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(path), parser
        for action in subs:
            for name, child in action.choices.items():
                yield from commands(child, (*path, name))

    seen = {}
    for name, parser in commands(build_parser()):
        hint = parser.get_default("resume_hint") or RERUN_HINT
        has_resume = any("--resume" in a.option_strings for a in parser._actions)
        assert ("--resume" in hint) == has_resume, (name, hint)
        seen[name] = has_resume
    assert seen["finetune"] and seen["pretrain"] and not seen["evaluate"] and len(seen) > 10


def test_an_interrupted_evaluate_is_told_to_run_again(tmp_path, monkeypatch, capsys):
    from sdtl import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["evaluate"].set_defaults(func=interrupted)
    assert cli.main(["evaluate", "--checkpoint", "c.pt", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "sdtl: interrupted (run the same command again)"


def _record_chance(monkeypatch) -> list:
    calls = []
    real = plots.chance_line

    def spy(ax, num_classes, *a, **kw):
        calls.append(num_classes)
        return real(ax, num_classes, *a, **kw)

    monkeypatch.setattr(plots, "chance_line", spy)
    return calls


def test_sweep_and_wise_plots_draw_the_chance_line(tmp_path, monkeypatch):
    from sdtl.studies import sweep, wise

    calls = _record_chance(monkeypatch)
    row = {"point": {"regularizer.weight": "1"}, "best_on_val": True,
           "val": core.stat([50.0, 60.0]), "test": core.stat([40.0, 45.0])}
    sweep.plot({"grid": {"regularizer.weight": ["1"]}, "points": [row], "num_classes": 5}, tmp_path / "sweep.png")
    assert calls == [5, 5] and (tmp_path / "sweep.png").stat().st_size > 0  # validation and test panels
    calls.clear()
    rows = [{"alpha": a, "val": {"video_acc1": 50.0 + a}, "test": {"video_acc1": 40.0 + a}} for a in (0.0, 1.0)]
    wise.plot({"results": rows, "selected": {"alpha": 1.0, "val_video_acc1": 51.0}, "num_classes": 101},
              tmp_path / "wise.png")
    assert calls == [101] and (tmp_path / "wise.png").stat().st_size > 0
    fig_ax = plots.pyplot().subplots()
    assert plots.chance_line(fig_ax[1], 5) == 20.0 and plots.chance_line(fig_ax[1], None) is None


def test_wise_markdown_defines_a_and_b():
    from sdtl.studies.wise import markdown

    row = {"alpha": 1.0, **{p: {"video_acc1": 1.0, "clip_acc1": 1.0, "mean_class_acc": 1.0} for p in ("val", "test")}}
    report = {"method": "WiSE-FT", "finetuned": "/r/best.pt", "finetuned_epoch": 3, "pretrained": "/p/enc.pt",
              "pretrained_format": "sdtl-pretrain", "pretrained_from": "the fine-tuned run's model.pretrained",
              "theta0": "encoder of A with B's classification head", "formula": "f", "alphas": [1.0],
              "selected": {"alpha": 1.0, "rule": "r"}, "results": [row],
              "protocol": {"val": {"validation_part": "v", "views": 1},
                           "test": {"split": "s", "views": 1, "crops": 1, "aggregation": "mean"}}}
    md = markdown(report)
    assert "- B, the fine-tuned checkpoint (--finetuned), gives θ₁ (α = 1): `/r/best.pt`" in md
    assert "- A, the pre-trained checkpoint (the fine-tuned run's model.pretrained), gives θ₀ (α = 0): `/p/enc.pt`" in md
    assert md.index("- B, the fine-tuned") < md.index("B's classification head")  # defined before used


def test_demo_seeds_never_shrink_a_folder(tmp_path, caplog):
    from sdtl.studies import demo

    plan = demo.QUICK
    out = tmp_path / "d"
    out.mkdir()
    demo._write_marker(out, plan, 5, {"total_s": 600.0, "invocations": 1})
    listing = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=r"--seeds 3: .* holds a 5-seed demo summary.*--seeds 5 or more"):
        demo.run_demo(out, seeds=3, plan=plan, data_dir=str(tmp_path / "none"))  # (if not refused: a fast error)
    assert sorted(p.name for p in out.iterdir()) == listing  # refused before anything was written
    marker = demo.claim(out, plan)
    assert demo._seeds_for(out, plan, None, marker) == 5  # no --seeds: the folder's seeds, not the default 3
    assert demo._seeds_for(out, plan, 7, marker) == 7  # more seeds extend it
    with caplog.at_level(logging.INFO, logger="sdtl.demo"):
        demo._say_seeds(out, plan, None, 5, 5)
        demo._say_seeds(out, plan, 7, 5, 7)
    assert "keeping all 5 seeds" in caplog.text and "extending the 5-seed demo" in caplog.text
    assert demo._earlier_wall_time(out, plan, marker) == {"total_s": 600.0, "invocations": 1}
    # a folder written before demo.json recorded seeds and wall time: read from its summary
    (out / "demo.json").write_text(json.dumps({"plan": "quick", "identity": demo._plan_identity(plan)}))
    (out / "summary.json").write_text(json.dumps({"seeds": [0, 1, 2, 3], "wall_time_s": {"total_s": 99.0}}))
    marker = demo.claim(out, plan)
    assert demo._recorded_seeds(out, plan, marker) == 4
    assert demo._earlier_wall_time(out, plan, marker) == {"total_s": 99.0}
    with pytest.raises(UserError, match="4-seed"):
        demo._seeds_for(out, plan, 2, marker)


def test_a_child_stopped_on_request_stops_the_study_and_its_other_runs(tmp_path):
    import sys
    import time

    class Scripted(core.RunSpec):
        def __init__(self, name, code):
            super().__init__(name, tmp_path / name, "synthetic_tiny", [], 0)
            self.code = code

        def command(self):
            return [sys.executable, "-c", self.code]

    ready = tmp_path / "other-is-running"
    # exits as a run does after SIGTERM/SIGUSR1 (once the other run is up)
    stopped = Scripted("stopped", f"import pathlib, sys, time\nwhile not pathlib.Path({str(ready)!r}).exists():\n"
                                  f"    time.sleep(0.01)\nsys.exit(75)")
    # the other child must get SIGTERM (its state written) instead of being left behind or counted as failed
    marker = tmp_path / "other-saved-its-state"
    other = Scripted("other", "import pathlib, signal, sys, time\n"
                              f"def stop(*a):\n    pathlib.Path({str(marker)!r}).touch()\n    sys.exit(75)\n"
                              f"signal.signal(signal.SIGTERM, stop)\npathlib.Path({str(ready)!r}).touch()\n"
                              "time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(core.RunInterrupted, match="stopped"):
        core.SubprocessPool("test", 2, tmp_path / "logs", 0.1).run([other, stopped])
    assert marker.exists()  # the other run got SIGTERM and was waited for (it writes its state then)
    assert time.monotonic() - t0 < 30


def test_sigterm_to_a_parallel_study_stops_its_children_with_their_state(tmp_path):
    import os
    import signal
    import sys
    import threading

    ready, marker = tmp_path / "child-is-running", tmp_path / "child-saved-its-state"

    class Scripted(core.RunSpec):
        def command(self):
            return [sys.executable, "-c", "import pathlib, signal, sys, time\n"
                    f"def stop(*a):\n    pathlib.Path({str(marker)!r}).touch()\n    sys.exit(75)\n"
                    f"signal.signal(signal.SIGTERM, stop)\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)"]

    def scheduler_stops_the_study():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # what Slurm or `kill PID` does to the study process

    import time

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=scheduler_stops_the_study, daemon=True).start()
    with pytest.raises(core.RunInterrupted, match="SIGTERM"):
        core.SubprocessPool("test", 2, tmp_path / "logs", 0.05).run([Scripted("a", tmp_path / "a", "x", [], 0)])
    assert marker.exists()  # the child was asked to stop and waited for, not killed with the study
    assert signal.getsignal(signal.SIGTERM) is before  # the study's handler is gone again
