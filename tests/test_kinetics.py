"""Kinetics-400 (`data.dataset: kinetics400`): the official CSVs and the class-folder layout, missing
downloads as counts (error with a hint, or skip), `sdtl data check`, and a fine-tune config building it."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
from data_helpers import numbered_frames

from sdtl.data import DATASET_NAMES
from sdtl.data import cli as data_cli
from sdtl.data import kinetics as K
from sdtl.data.datasets import list_records
from sdtl.errors import ConfigError, DataError

FOOTBALL = "passing American football (in game)"
CLASSES = ["abseiling", "air drumming", FOOTBALL]
ODD_ID = "x-Y_z-AbC_1"  # YouTube ids hold '-' and '_': the name is split on nothing

TRAIN_CSV = f"""label,youtube_id,time_start,time_end,split,is_cc
"abseiling",aaaaaaaaaaa,0,10,train,0
"abseiling",bbbbbbbbbbb,14,24,train,0
air drumming,ccccccccccc,1,11,train,0
"air drumming",ddddddddddd,100,110,train,0
"{FOOTBALL}",eeeeeeeeeee,5,15,train,0
"{FOOTBALL}",fffffffffff,30,40,train,0
"{FOOTBALL}",{ODD_ID},7,17,train,0
"abseiling",ggggggggggg,0,10,train,0
"air drumming",hhhhhhhhhhh,0,10,train,0
"abseiling",aaaaaaaaaaa,0,10,train,0
"""
VALIDATE_CSV = f"""label,youtube_id,time_start,time_end,split
abseiling,vvvvvvvvvv1,0,10,validate
"air drumming",vvvvvvvvvv2,0,10,validate
"{FOOTBALL}",vvvvvvvvvv3,0,10,validate
abseiling,vvvvvvvvvv4,0,10,validate
"""


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One tiny real MP4 and one MKV, copied wherever a tree needs a video."""
    from sdtl.data.video_io import write_video

    d = tmp_path_factory.mktemp("clips")
    mp4 = write_video(d / "a.mp4", numbered_frames(12, 32, 48), gop=4)
    mkv = write_video(d / "a.mkv", numbered_frames(12, 32, 48, offset=50), gop=4)
    return {".mp4": mp4, ".mkv": mkv}


def put(clips, path, ext=".mp4"):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(clips[ext], path)


@pytest.fixture
def csv_tree(tmp_path, clips):
    """Official CSVs in annotations/; train/ in class folders (underscored and spaced names, one clip in
    the wrong folder, one re-encoded to .mkv), val/ flat; 2 train and 1 validate clip never downloaded
    (one as a partial .part file); one empty file."""
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text(TRAIN_CSV)
    (root / "annotations" / "validate.csv").write_text(VALIDATE_CSV)
    (root / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\nzzzzzzzzzzz,0,10,test\n")
    t = root / "train"
    put(clips, t / "abseiling" / "aaaaaaaaaaa_000000_000010.mp4")
    put(clips, t / "abseiling" / "bbbbbbbbbbb_000014_000024.mkv", ".mkv")
    put(clips, t / "air_drumming" / "ccccccccccc_000001_000011.mp4")
    put(clips, t / "abseiling" / "ddddddddddd_000100_000110.mp4")  # wrong folder: the CSV's label counts
    put(clips, t / FOOTBALL / "eeeeeeeeeee_000005_000015.mp4")
    (t / FOOTBALL / "fffffffffff_000030_000040.mp4").touch()  # a failed download: empty
    put(clips, t / FOOTBALL / f"{ODD_ID}_000007_000017.mp4")
    for v in ("vvvvvvvvvv1", "vvvvvvvvvv2", "vvvvvvvvvv3"):
        put(clips, root / "val" / f"{v}_000000_000010.mp4")
    (root / "val" / "vvvvvvvvvv4_000000_000010.mp4.part").write_bytes(b"\0" * 64)
    return root


def folder_tree(root, clips):
    """Class folders only (no CSV): underscores in train/, spaces and parentheses in val/."""
    for cls, n in (("abseiling", 2), ("air_drumming", 2), ("passing_American_football_(in_game)", 1)):
        for i in range(n):
            put(clips, root / "train" / cls / f"t{cls[:3]}{i}_000000_000010.mp4")
    for cls in ("abseiling", "air drumming", FOOTBALL):
        put(clips, root / "val" / cls / f"v{cls[:3]}_000000_000010.mp4")
    return root


def run_check(argv, capsys):
    parser = argparse.ArgumentParser(prog="sdtl")
    data_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", "--dataset", "kinetics400", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


# --------------------------------------------------------------------------- parsing and listing

def test_name_and_label_matching():
    assert "kinetics400" in DATASET_NAMES
    assert K.clip_stem("abc", 1, 11) == "abc_000001_000011"
    assert K.label_key("air drumming") == K.label_key("air_drumming") == K.label_key('"Air Drumming"')
    assert K.label_key(FOOTBALL) == K.label_key("passing_american_football_-in_game-")
    assert K.label_key("massaging person's head") == K.label_key("massaging_person's_head")


def test_csv_rows(csv_tree):
    rows = K.read_kinetics_csv(csv_tree / "annotations" / "train.csv")
    assert len(rows) == 9  # the duplicate row of aaaaaaaaaaa counts once
    assert rows[0].label == "abseiling" and rows[2].label == "air drumming" and rows[4].label == FOOTBALL
    assert rows[6].stem == f"{ODD_ID}_000007_000017"
    assert rows[1].where.endswith("train.csv:3")


def test_csv_layout_records_and_classes(csv_tree, caplog):
    with caplog.at_level(logging.WARNING):
        train, classes = list_records("kinetics400", csv_tree, 1, "train", on_missing="skip")
        test, test_classes = list_records("kinetics400", csv_tree, 1, "test", on_missing="skip")
    assert classes == test_classes == CLASSES
    by_stem = {r.path.stem: r for r in train}
    assert len(train) == 7 and len(test) == 3
    assert by_stem["bbbbbbbbbbb_000014_000024"].path.suffix == ".mkv"  # any video suffix
    assert by_stem["ddddddddddd_000100_000110"].label == 1  # label from the CSV, not the folder
    assert by_stem[f"{ODD_ID}_000007_000017"].label == 2
    assert by_stem["ccccccccccc_000001_000011"].name == "train/air_drumming/ccccccccccc_000001_000011.mp4"
    assert sorted(r.label for r in test) == [0, 1, 2]
    assert all(r.path.parent.name == "val" for r in test)
    warned = [r.getMessage() for r in caplog.records]
    assert any("2 of 9 train videos (Kinetics train)" in m and "using 7 of 9" in m for m in warned)
    assert any("1 of 4 test videos (Kinetics validate)" in m for m in warned)


def test_missing_is_an_error_by_default(csv_tree):
    with pytest.raises(DataError) as err:
        list_records("kinetics400", csv_tree, 1, "train")
    msg = str(err.value)
    assert "2 of 9 train videos" in msg and "train.csv" in msg and "data.on_missing=skip" in msg
    assert "train/abseiling/ggggggggggg_000000_000010.mp4" in msg  # where it was expected: its class folder
    assert "train/air_drumming/hhhhhhhhhhh_000000_000010.mp4" in msg
    with pytest.raises(DataError, match=r"1 of 4 test videos .*val/vvvvvvvvvv4_000000_000010.mp4"):
        list_records("kinetics400", csv_tree, 1, "test")


def test_lists_dir_and_videos_in_the_root(tmp_path, clips):
    """CSVs in data.lists_dir with the old release's names; every video flat in the root (no train/ val/)."""
    lists, root = tmp_path / "ann", tmp_path / "videos"
    lists.mkdir()
    (lists / "kinetics_train.csv").write_text(TRAIN_CSV)
    (lists / "val.csv").write_text(VALIDATE_CSV)
    for stem in ("aaaaaaaaaaa_000000_000010", "ccccccccccc_000001_000011", "eeeeeeeeeee_000005_000015",
                 "vvvvvvvvvv1_000000_000010", "vvvvvvvvvv2_000000_000010"):
        put(clips, root / f"{stem}.webm" if stem.startswith("c") else root / f"{stem}.mp4")
    put(clips, root / "air drumming" / "ddddddddddd.mp4")  # named by the YouTube id alone
    train, classes = list_records("kinetics400", root, 1, "train", lists_dir=lists, on_missing="skip")
    test, _ = list_records("kinetics400", root, 1, "test", lists_dir=lists, on_missing="skip")
    assert classes == CLASSES
    assert sorted((r.name, r.label) for r in train) == [
        ("aaaaaaaaaaa_000000_000010.mp4", 0), ("air drumming/ddddddddddd.mp4", 1),
        ("ccccccccccc_000001_000011.webm", 1), ("eeeeeeeeeee_000005_000015.mp4", 2)]
    assert [r.label for r in test] == [0, 1]


def test_class_folders_only(tmp_path, clips):
    root = folder_tree(tmp_path / "k", clips)
    train, classes = list_records("kinetics400", root, 1, "train")
    test, test_classes = list_records("kinetics400", root, 1, "test")
    assert classes == test_classes == CLASSES  # the same class list as the CSV layout's
    assert sorted(r.label for r in train) == [0, 0, 1, 1, 2] and sorted(r.label for r in test) == [0, 1, 2]
    # a val folder that is no class of train/
    put(clips, root / "val" / "yoga" / "x_000000_000010.mp4")
    with pytest.raises(DataError, match="class folder 'yoga' matches none"):
        list_records("kinetics400", root, 1, "test")


def test_class_folders_with_the_csv_of_the_other_subset(tmp_path, clips):
    """validate.csv only (no train.csv): train/ from its class folders, named like the CSV's labels."""
    root = folder_tree(tmp_path / "k", clips)
    (root / "annotations").mkdir()
    (root / "annotations" / "validate.csv").write_text(VALIDATE_CSV)
    train, classes = list_records("kinetics400", root, 1, "train")
    assert classes == CLASSES and sorted(r.label for r in train) == [0, 0, 1, 1, 2]


def test_wrong_input_says_what(tmp_path, clips):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Kinetics annotations .* and no class folders in train/ or val/"):
        list_records("kinetics400", tmp_path / "empty", 1)
    for split in (2, 3):
        with pytest.raises(ConfigError, match="one official split") as err:
            list_records("kinetics400", tmp_path / "empty", split)
        assert err.value.key == "data.split"
    flat = tmp_path / "flat"
    put(clips, flat / "val" / "x_000000_000010.mp4")
    put(clips, flat / "train" / "a" / "y_000000_000010.mp4")
    with pytest.raises(DataError, match="videos but no class folders, and no validate.csv"):
        list_records("kinetics400", flat, 1, "test")
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "train.csv").write_text("youtube_id,label\nabc,run\n")
    with pytest.raises(DataError, match=r"train.csv:1: header .* lacks time_start, time_end"):
        list_records("kinetics400", bad, 1)
    (bad / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end\nrun,abc,1.5,11\n")
    with pytest.raises(DataError, match=r"train.csv:2: time_start '1.5' is not a whole number"):
        list_records("kinetics400", bad, 1)
    # CSVs but the videos elsewhere: even with skip, nothing to train on
    (bad / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end\nrun,abc,1,11\n")
    (bad / "train").mkdir()
    with pytest.raises(DataError, match=r"none of the 1 train videos .*train/abc_000001_000011.mp4.*data.root must"):
        list_records("kinetics400", bad, 1, on_missing="skip")
    with pytest.raises(DataError, match=r"no test set \(Kinetics validate\)"):
        list_records("kinetics400", bad, 1, "test")


# --------------------------------------------------------------------------- sdtl data check

def test_check_reports_counts_per_subset(csv_tree, capsys):
    code, out = run_check(["--root", str(csv_tree), "--json"], capsys)
    rep = json.loads(out)
    assert code == 1 and rep["classes"] == 3 and rep["class_names"] == CLASSES
    train, test = rep["subsets"]["train"], rep["subsets"]["test"]
    assert (train["listed"], train["found"], train["missing"]) == (9, 7, 2)
    assert (test["listed"], test["found"], test["missing"]) == (4, 3, 1)
    assert train["source"] == "annotations/train.csv" and test["source"] == "annotations/validate.csv"
    assert [u["error"] for u in train["unreadable"]] == ["empty file (0 bytes)"] and test["unreadable"] == []
    assert rep["root_problem"] is None and rep["wrong_root"] is False

    code, out = run_check(["--root", str(csv_tree)], capsys)
    assert code == 1
    assert "train (Kinetics train, from annotations/train.csv): 9 listed, 7 found, 2 missing (22.2%), 1 unreadable" in out
    assert "test (Kinetics validate, from annotations/validate.csv): 4 listed, 3 found, 1 missing (25.0%), " \
           "0 unreadable" in out
    assert "val/vvvvvvvvvv4_000000_000010.mp4" in out and "data.on_missing=skip" in out


def test_check_decode_counts_undecodable(csv_tree, capsys):
    (csv_tree / "val" / "vvvvvvvvvv2_000000_000010.mp4").write_bytes(b"not a video" * 20)
    code, out = run_check(["--root", str(csv_tree), "--decode", "--workers", "1", "--json"], capsys)
    rep = json.loads(out)
    assert code == 1 and rep["decoded"] == 10
    assert len(rep["subsets"]["train"]["unreadable"]) == 1  # the empty file, once
    assert [u["path"].endswith("vvvvvvvvvv2_000000_000010.mp4") for u in rep["subsets"]["test"]["unreadable"]] == [True]


def test_check_never_a_traceback(tmp_path, csv_tree, clips, capsys):
    from sdtl.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["data", "check", "--dataset", "kinetics400", "--root", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtl: error:") and "no Kinetics annotations" in err and "Traceback" not in err
    # the folder above the Kinetics root: the hint names it
    assert main(["data", "check", "--dataset", "kinetics400", "--root", str(csv_tree.parent)]) == 2
    assert f"did you mean the root {csv_tree} (data.root)?" in capsys.readouterr().err
    assert main(["data", "check", "--dataset", "kinetics400", "--root", str(csv_tree), "--split", "2"]) == 2
    assert "one official split" in capsys.readouterr().err
    # annotations found, no video anywhere: a wrong root, exit status 2
    wrong = tmp_path / "wrong"
    shutil.copytree(csv_tree / "annotations", wrong / "annotations")
    code, out = run_check(["--root", str(wrong)], capsys)
    assert code == 2 and "0 found, 9 missing" in out and "no listed video was found" in out
    # class folders only: nothing can be missing
    code, out = run_check(["--root", str(folder_tree(tmp_path / "folders", clips))], capsys)
    assert code == 0 and "5 listed, 5 found, 0 missing, 0 unreadable" in out and "from class folders in train/" in out


# --------------------------------------------------------------------------- a fine-tune config

def test_finetune_config_builds_kinetics(csv_tree):
    from sdtl.engine.build import build_datasets
    from sdtl.engine.config import load_config

    cfg = load_config("synthetic_tiny", ["data.dataset=kinetics400", f"data.root={csv_tree}",
                                         "data.on_missing=skip", "data.val_fraction=0.3"])
    train, val, test, classes = build_datasets(cfg)
    assert classes == CLASSES and train.num_classes == 3
    assert len(train) + len(val) == 7 and len(val) >= 1 and len(test) == 3
    cfg = load_config("synthetic_tiny", ["data.dataset=kinetics400", f"data.root={csv_tree}"])
    with pytest.raises(DataError, match="data.on_missing=skip"):
        build_datasets(cfg)
    cfg = load_config("synthetic_tiny", ["data.dataset=kinetics400", f"data.root={csv_tree}", "data.split=2"])
    with pytest.raises(ConfigError, match="data.split"):
        build_datasets(cfg)
