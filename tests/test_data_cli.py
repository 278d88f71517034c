"""`sdtl data check|bench`, called through their own argparse registration."""
from __future__ import annotations

import argparse
import json

import pytest
from data_helpers import numbered_frames

from sdtl.data import cli as data_cli
from sdtl.data.video_io import write_video


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="sdtl")
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    code = args.func(args)
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def small_ucf(tmp_path_factory):
    """UCF101-layout dataset with a custom list: 3 good videos, a corrupt one, an AVI with B-frames, a missing one."""
    root = tmp_path_factory.mktemp("small")
    frames = numbered_frames(24, 32, 48)
    write_video(root / "Run/v_Run_g01_c01.avi", frames, codec="mpeg4")
    write_video(root / "Run/v_Run_g02_c01.mp4", frames)  # listed as .avi: matched by stem
    write_video(root / "Walk/v_Walk_g01_c01.avi", frames, codec="mpeg4", bframes=2)
    write_video(root / "Walk/v_Walk_g02_c01.avi", frames, codec="mpeg4")
    (root / "Walk/v_Walk_g03_c01.avi").write_bytes(b"\x00" * 1000)
    lists = root / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 Run\r\n2 Walk\r\n")
    (lists / "trainlist01.txt").write_bytes(b"Run/v_Run_g01_c01.avi 1\r\nWalk/v_Walk_g01_c01.avi 2\r\n"
                                            b"Walk/v_Walk_g03_c01.avi 2\r\nRun/v_Run_g09_c01.avi 1\r\n")
    (lists / "testlist01.txt").write_bytes(b"Run/v_Run_g02_c01.avi\r\nWalk/v_Walk_g02_c01.avi\r\n")
    return root


def test_check_json(small_ucf, capsys):
    code, out = run(["data", "check", "--dataset", "ucf101", "--root", str(small_ucf), "--lists-dir",
                     str(small_ucf / "lists"), "--decode", "--workers", "2", "--json"], capsys)
    rep = json.loads(out)
    assert code == 1  # problems found
    assert (rep["classes"], rep["train"], rep["test"]) == (2, 3, 2)
    assert rep["missing"] == ["Run/v_Run_g09_c01.avi"]
    assert [c["path"].endswith("v_Walk_g03_c01.avi") for c in rep["corrupt"]] == [True]
    assert [s["path"].endswith("v_Walk_g01_c01.avi") for s in rep["sequential"]] == [True]
    assert rep["decoded"] == 5


def test_check_text_without_decode(small_ucf, capsys):
    code, out = run(["data", "check", "--dataset", "ucf101", "--root", str(small_ucf), "--lists-dir",
                     str(small_ucf / "lists")], capsys)
    assert "classes: 2" in out and "train:   3" in out and "missing: 1" in out and "v_Run_g09_c01" in out
    assert "corrupt" not in out  # nothing decoded without --decode


def test_bench_reports_every_figure(small_ucf, capsys):
    code, out = run(["data", "bench", "--dataset", "ucf101", "--root", str(small_ucf), "--lists-dir",
                     str(small_ucf / "lists"), "--subset", "test", "--clips", "4", "--workers", "1",
                     "--batch-size", "1", "--clip-len", "8", "--stride", "2", "--size", "16", "--backend", "pyav",
                     "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["videos"] == 2 and res["construct_seconds"] >= 0
    assert (res["clip_len"], res["stride"]) == (8, 2)
    figures = res["backends"]["pyav"]
    assert set(figures) == {"decode_clips_per_s", "decode_transform_clips_per_s", "loader_1w_clips_per_s"}
    assert all(v > 0 for v in figures.values())


def test_check_on_a_wrong_root_says_so(tmp_path, capsys):
    """An empty folder, or the folder above the class folders: one hint, not 13,320 'missing' lines."""
    code, out = run(["data", "check", "--dataset", "ucf101", "--root", str(tmp_path)], capsys)
    assert code == 2
    assert "missing: 13320" in out and len(out.splitlines()) < 15
    assert f"none of the 101 class folders named in the lists is in {tmp_path}" in out
    assert f"expected at {tmp_path / 'ApplyEyeMakeup'}/" in out
    # the class folders one level down: the hint names the folder to pass
    for cls in ("ApplyEyeMakeup", "ApplyLipstick", "Archery"):
        (tmp_path / "UCF-101" / cls).mkdir(parents=True)
    code, out = run(["data", "check", "--dataset", "hmdb51", "--root", str(tmp_path), "--json"], capsys)
    assert code == 2 and json.loads(out)["root_problem"]["present_folders"] == 0
    from sdtl.data import datasets as D

    classes, subsets, root = D.read_lists("ucf101", tmp_path)
    entries = [e for e in subsets["train"] if e.relpath.split("/")[0] in ("ApplyEyeMakeup", "ApplyLipstick",
                                                                          "Archery")]
    problem = D.root_problem(root, entries, entries)
    assert problem["suggested_root"] == str(tmp_path / "UCF-101")
    assert f"did you mean the root {tmp_path / 'UCF-101'}" in D.describe_root_problem(problem)


def test_check_flags_a_root_missing_most_videos(small_ucf, tmp_path, capsys):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Run\n2 Walk\n")
    (lists / "trainlist01.txt").write_text("Run/v_Run_g01_c01.avi 1\nRun/gone1.avi 1\nWalk/gone2.avi 2\n")
    (lists / "testlist01.txt").write_text("Walk/gone3.avi\n")
    code, out = run(["data", "check", "--dataset", "ucf101", "--root", str(small_ucf), "--lists-dir",
                     str(lists)], capsys)
    assert code == 1 and "3 of 4 listed videos are missing (2 of 2 class folders found)" in out
    code, out = run(["data", "check", "--dataset", "ucf101", "--root", str(small_ucf), "--lists-dir",
                     str(small_ucf / "lists")], capsys)
    assert code == 1 and "looks wrong" not in out  # 1 of 6 missing: a few files, not a wrong root


def test_every_option_of_check_and_bench_has_help(capsys):
    parser = argparse.ArgumentParser(prog="sdtl")
    sub = parser.add_subparsers(dest="command")
    data_cli.register(sub)
    data = sub.choices["data"]
    commands = data._subparsers._group_actions[0].choices
    for name in ("check", "bench"):
        p = commands[name]
        assert p.description and len(p.description) > 40, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, f"data {name} {action.option_strings[0]}"
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "bench", "--help"])
    out = capsys.readouterr().out
    assert "--stride" in out and "temporal stride" in out and "single frames" in out
