"""The shipped official lists, matching them to files, and users' own lists (no decoding here)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from data_helpers import hmdb51_placeholder_tree, ucf101_placeholder_tree

from sdtl.data import splits as S
from sdtl.data.datasets import build_dataset, list_records
from sdtl.errors import UserError

# Counted from the shipped files themselves (wc -l / tags), not copied from a paper.
UCF_COUNTS = {1: (9537, 3783), 2: (9586, 3734), 3: (9624, 3696)}
HMDB_COUNTS = {1: (3570, 1530), 2: (3570, 1530), 3: (3570, 1530)}


@pytest.fixture(scope="module")
def ucf_root(tmp_path_factory):
    return ucf101_placeholder_tree(tmp_path_factory.mktemp("ucf101"))


@pytest.fixture(scope="module")
def hmdb_root(tmp_path_factory):
    # .mp4: a transcoded copy must still match the .avi names of the official lists
    return hmdb51_placeholder_tree(tmp_path_factory.mktemp("hmdb51"), ext=".mp4")


def test_shipped_lists_are_verbatim_crlf():
    raw = S.shipped_lists("ucfTrainTestlist").joinpath("classInd.txt").read_bytes()
    assert raw.startswith(b"1 ApplyEyeMakeup\r\n")  # nobody normalised the line endings
    hmdb = S.shipped_lists("testTrainMulti_7030_splits").joinpath("wave_test_split1.txt").read_bytes()
    assert hmdb.startswith(b"20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0.avi 2 \n")  # trailing space kept


@pytest.mark.parametrize("split", [1, 2, 3])
def test_ucf101_official_counts(split):
    classes, train, test = S.read_ucf101_split(S.shipped_lists("ucfTrainTestlist"), split)
    assert len(classes) == 101 and classes[0] == "ApplyEyeMakeup" and classes[-1] == "YoYo"
    assert (len(train), len(test)) == UCF_COUNTS[split]
    assert not {e.relpath for e in train} & {e.relpath for e in test}
    assert len(train) + len(test) == 13320


@pytest.mark.parametrize("split", [1, 2, 3])
def test_hmdb51_official_counts(split):
    classes, train, test = S.read_hmdb51_split(S.shipped_lists("testTrainMulti_7030_splits"), split)
    assert len(classes) == 51 and classes == sorted(classes)
    assert (len(train), len(test)) == HMDB_COUNTS[split]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_ucf101_tree_counts_and_labels(ucf_root, split):
    train, classes = list_records("ucf101", ucf_root, split, "train")
    test, _ = list_records("ucf101", ucf_root, split, "test")
    assert len(classes) == 101
    assert (len(train), len(test)) == UCF_COUNTS[split]
    by_name = {r.name: r.label for r in train + test}
    assert by_name["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"] == 0  # "1" in the list: 0-based here
    assert by_name["YoYo/v_YoYo_g01_c01.avi"] == 100
    # folder HandstandPushups, files v_HandStandPushups_*: class 37 in classInd -> 36
    assert by_name["HandstandPushups/v_HandStandPushups_g08_c01.avi"] == 36
    assert by_name["HandstandWalking/v_HandstandWalking_g01_c01.avi"] == 37
    assert all(r.path.is_file() for r in train[:50])


@pytest.mark.parametrize("split", [1, 2, 3])
def test_hmdb51_tree_counts_and_labels(hmdb_root, split):
    train, classes = list_records("hmdb51", hmdb_root, split, "train")
    test, _ = list_records("hmdb51", hmdb_root, split, "test")
    assert (len(classes), len(train), len(test)) == (51, *HMDB_COUNTS[split])
    assert classes[0] == "brush_hair" and classes[21] == "kick_ball" and classes[50] == "wave"
    labels = {r.name: r.label for r in train + test}
    assert labels["wave/20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0.avi"] == 50
    assert labels["brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"] == 0
    assert all(r.path.suffix == ".mp4" for r in train)  # matched by stem
    # the same video is test in split 1 and train in split 2
    names = {r.name for r in test}
    assert ("wave/20060723sfjffbartsinger_wave_f_cm_np1_ba_med_0.avi" in names) == (split == 1)


def test_ucf101_construction_is_fast(ucf_root):
    t0 = time.perf_counter()
    train = build_dataset("ucf101", ucf_root, 1, "train", backend="pyav")
    test = build_dataset("ucf101", ucf_root, 1, "test", backend="pyav")
    elapsed = time.perf_counter() - t0
    assert len(train) + len(test) == 13320
    assert elapsed < 5.0, f"constructing 13,320 entries took {elapsed:.2f} s (target < 1 s)"


def test_ucf101_case_insensitive_folders(tmp_path):
    (tmp_path / "handstandpushups").mkdir()  # a copy whose folder case differs from the list
    (tmp_path / "handstandpushups" / "v_HandStandPushups_g08_c01.mp4").touch()
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(b"1 HandstandPushups\r\n")
    (lists / "trainlist01.txt").write_bytes(b"HandstandPushups/v_HandStandPushups_g08_c01.avi 1\r\n")
    (lists / "testlist01.txt").write_bytes(b"HandstandPushups/v_HandStandPushups_g08_c01.avi\r\n")
    records, classes = list_records("ucf101", tmp_path, 1, "train", lists_dir=lists)
    assert classes == ["HandstandPushups"]
    assert records[0].path == tmp_path / "handstandpushups" / "v_HandStandPushups_g08_c01.mp4"


def test_missing_files_reported_together(tmp_path):
    ucf101_placeholder_tree(tmp_path)
    _, _, test = S.read_ucf101_split(S.shipped_lists("ucfTrainTestlist"), 1)
    gone = [e.relpath for e in test if e.relpath.startswith("YoYo/")][:7]
    for name in gone:
        (tmp_path / name).unlink()
    with pytest.raises(UserError) as err:
        list_records("ucf101", tmp_path, 1, "test")
    msg = str(err.value)
    assert "7 of 3783 test videos" in msg and "testlist01.txt" in msg and "set data.on_missing=skip" in msg
    assert gone[0] in msg and gone[4] in msg and gone[6] not in msg  # first names only
    records, _ = list_records("ucf101", tmp_path, 1, "test", on_missing="skip")
    assert len(records) == 3783 - 7


def test_wrong_root_and_split(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list_records("ucf101", tmp_path / "nope", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="none of the 9537 train videos"):
        list_records("ucf101", tmp_path / "empty", 1)
    for bad in (0, 4, "x"):
        with pytest.raises(UserError, match="split"):
            list_records("ucf101", tmp_path / "empty", bad)
    with pytest.raises(UserError, match="unknown"):
        list_records("kinetics", tmp_path, 1)


def test_list_naming_unknown_class(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Run\n2 Walk\n")
    (lists / "trainlist01.txt").write_text("Run/a.avi 1\nSwim/b.avi 2\n")
    (lists / "testlist01.txt").write_text("Run/c.avi\n")
    with pytest.raises(UserError, match=r"trainlist01.txt:2: class folder 'Swim' is not in classInd"):
        list_records("ucf101", tmp_path, 1, lists_dir=lists)
    (lists / "trainlist01.txt").write_text("Run/a.avi 2\n")
    with pytest.raises(UserError, match=r"trainlist01.txt:1: label 2 \(Walk\) contradicts"):
        list_records("ucf101", tmp_path, 1, lists_dir=lists)
    (lists / "trainlist01.txt").write_text("Run/a.avi 3\n")
    with pytest.raises(UserError, match=r"trainlist01.txt:1: label '3' is not a class index 1..2"):
        list_records("ucf101", tmp_path, 1, lists_dir=lists)


def test_hmdb51_bad_tag(tmp_path):
    (tmp_path / "run_test_split1.txt").write_text("a.avi 1 \nb.avi 7 \n")
    with pytest.raises(UserError, match=r"run_test_split1.txt:2"):
        S.read_hmdb51_split(tmp_path, 1)


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).touch()


def test_folder_dataset(tmp_path):
    _touch(tmp_path, "b_cls/x.mp4", "b_cls/y.avi", "a_cls/z.mkv", "a_cls/notes.txt")
    records, classes = list_records("folder", tmp_path, 1, "train")
    assert classes == ["a_cls", "b_cls"]
    assert sorted((r.name, r.label) for r in records) == [("a_cls/z.mkv", 0), ("b_cls/x.mp4", 1), ("b_cls/y.avi", 1)]
    with pytest.raises(UserError, match="no test list"):
        list_records("folder", tmp_path, 1, "test")
    lists = tmp_path / "my_lists"
    lists.mkdir()
    (lists / "trainlist01.txt").write_text("b_cls/x.mp4\na_cls/z.mkv\n")
    (lists / "testlist01.txt").write_text("b_cls/y.avi\n")
    test, _ = list_records("folder", tmp_path, 1, "test", lists_dir=lists)
    assert [(r.name, r.label) for r in test] == [("b_cls/y.avi", 1)]


def test_folder_dataset_refuses_class_folders_without_videos(tmp_path):
    """`sdtl synth` output read as `folder` gave the classes lists, unlabelled and videos (issue 10, 13)."""
    _touch(tmp_path, "videos/Up/v_Up_g01_c01.avi", "lists/classInd.txt", "unlabelled/pool_00000.avi", "meta.json")
    with pytest.raises(UserError) as err:
        list_records("folder", tmp_path, 1, "train")
    msg = str(err.value)
    assert "2 of 3 class folders hold no videos: lists/, videos/" in msg and "unlabelled/" not in msg
    assert "dataset synthetic" in msg  # it recognises `sdtl synth` output
    _touch(tmp_path / "plain", "cat/a.mp4", "dog/b.mp4", "empty_class/readme.txt", ".git/config")
    with pytest.raises(UserError, match=r"1 of 3 class folders hold no videos: empty_class/; point the "):
        list_records("folder", tmp_path / "plain", 1, "train")
    _touch(tmp_path, "split/train/cat/a.mp4", "split/train/dog/.keep", "split/test/cat/c.mp4")
    with pytest.raises(UserError, match=r"train: 1 of 2 class folders hold no videos: dog/"):
        list_records("folder", tmp_path / "split", 1, "train")


def test_folder_dataset_train_test_subfolders(tmp_path):
    _touch(tmp_path, "train/cat/a.mp4", "train/dog/b.mp4", "test/dog/c.mp4")
    test, classes = list_records("folder", tmp_path, 1, "test")
    assert classes == ["cat", "dog"] and [(r.name, r.label) for r in test] == [("test/dog/c.mp4", 1)]


def test_csv_dataset(tmp_path):
    _touch(tmp_path, "v/a.mp4", "v/b.mp4", "v/c d.mp4")
    (tmp_path / "train.csv").write_text("path,label\nv/a.mp4,walk\nv/c d.mp4,run\n")
    (tmp_path / "test.csv").write_text("v/b.mp4 walk\r\n")
    train, classes = list_records("csv", tmp_path, 1, "train")
    assert classes == ["run", "walk"]
    assert [(r.name, r.label) for r in train] == [("v/a.mp4", 1), ("v/c d.mp4", 0)]
    test, _ = list_records("csv", tmp_path, 1, "test")
    assert [(r.name, r.label) for r in test] == [("v/b.mp4", 1)]
    (tmp_path / "classes.txt").write_text("walk\nrun\n")
    (tmp_path / "train.csv").write_text("v/a.mp4,0\nv/b.mp4,5\n")
    with pytest.raises(UserError, match=r"train.csv:2: label 5 out of range 0..1"):
        list_records("csv", tmp_path, 1, "train")
    (tmp_path / "train.csv").write_text("v/a.mp4,jump\n")
    with pytest.raises(UserError, match=r"train.csv:1: unknown class 'jump'"):
        list_records("csv", tmp_path, 1, "train")


def test_synthetic_layout(tmp_path):
    _touch(tmp_path, "videos/Up/v_Up_g01_c01.avi", "videos/Down/v_Down_g02_c01.avi")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/classInd.txt").write_text("1 Up\n2 Down\n")
    (tmp_path / "lists/trainlist01.txt").write_text("Up/v_Up_g01_c01.avi 1\n")
    (tmp_path / "lists/testlist01.txt").write_text("Down/v_Down_g02_c01.avi\n")
    test, classes = list_records("synthetic", tmp_path, 1, "test")
    assert classes == ["Up", "Down"] and test[0].label == 1
    with pytest.raises(UserError, match="split"):
        list_records("synthetic", tmp_path, 2, "test")
    with pytest.raises(UserError, match="sdtl synth"):
        list_records("synthetic", tmp_path / "videos", 1, "test")
