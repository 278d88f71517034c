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
                     "--batch-size", "1", "--clip-len", "8", "--size", "16", "--backend", "pyav", "--json"], capsys)
    res = json.loads(out)
    assert code == 0 and res["videos"] == 2 and res["construct_seconds"] >= 0
    figures = res["backends"]["pyav"]
    assert set(figures) == {"decode_clips_per_s", "decode_transform_clips_per_s", "loader_1w_clips_per_s"}
    assert all(v > 0 for v in figures.values())
