"""The embedded synthetic dataset (`sdtl synth`): layout, UCF101-format lists, real decodable
videos, byte-for-byte determinism, refusal to overwrite, and classes that a single frame cannot tell.

The tiny preset is generated once per module (a few seconds) and shared by the tests.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from sdtl.data.synthetic import PRESETS, generate_synthetic, register, render_labelled
from sdtl.errors import UserError

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "tiny", preset="tiny", seed=0)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_ucf101_lists(tiny_dir: Path):
    lists = tiny_dir / "lists"
    class_ind = [line.split() for line in _lines(lists / "classInd.txt")]
    assert [int(i) for i, _ in class_ind] == list(range(1, len(TINY.classes) + 1))  # 1-based
    names = [name for _, name in class_ind]
    assert names == list(TINY.classes)

    train = [line.split() for line in _lines(lists / "trainlist01.txt")]
    test = _lines(lists / "testlist01.txt")
    assert len(train) == len(names) * TINY.train_per_class
    assert len(test) == len(names) * TINY.test_per_class
    pattern = re.compile(r"^(\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.avi$")
    train_groups, test_groups = set(), set()
    for rel, label in train:
        match = pattern.match(rel)
        assert match and match.group(1) == match.group(2), rel
        assert 1 <= int(label) <= len(names) and names[int(label) - 1] == match.group(1)
        assert (tiny_dir / "videos" / rel).is_file()
        train_groups.add(int(match.group(3)))
    for rel in test:
        match = pattern.match(rel)
        assert match and match.group(1) in names, rel
        assert (tiny_dir / "videos" / rel).is_file()
        test_groups.add(int(match.group(3)))
    # Like UCF101's groups: train and test never share an actor/scene.
    assert train_groups and test_groups and not train_groups & test_groups

    pool = _lines(lists / "unlabelled.txt")
    assert len(pool) == TINY.pool_size
    assert all((tiny_dir / rel).is_file() for rel in pool)
    assert not any(p.name.startswith(".") for p in tiny_dir.parent.iterdir())  # no temp dir left

    meta = json.loads((tiny_dir / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["preset"]["name"] == "tiny"
    assert [c["name"] for c in meta["classes"]] == names and all(c["motion"] for c in meta["classes"])
    assert meta["counts"] == {"train": len(train), "test": len(test), "unlabelled": len(pool),
                              "train_per_class": TINY.train_per_class, "test_per_class": TINY.test_per_class}


def test_videos_decode_with_expected_shape(tiny_dir: Path):
    lists = tiny_dir / "lists"
    labelled = [line.split()[0] for line in _lines(lists / "trainlist01.txt")][:: TINY.train_per_class]
    for rel in labelled + _lines(lists / "testlist01.txt")[:2]:
        frames = _decode(tiny_dir / "videos" / rel)
        assert frames.shape == (TINY.frames, TINY.size, TINY.size, 3), rel
    pool = _decode(tiny_dir / _lines(lists / "unlabelled.txt")[0])
    assert pool.shape == (TINY.pool_frames, TINY.size, TINY.size, 3)
    # Long enough for a 16-frame clip at stride 8, the fastest playback-speed pretext class.
    assert TINY.pool_frames >= 15 * 8 + 1
    # Encoded close to what was rendered (a real, not a garbage, video).
    rendered = render_labelled(TINY, 0, 0, 1, 1).astype(np.float32)
    decoded = _decode(tiny_dir / "videos" / labelled[0]).astype(np.float32)
    assert np.abs(rendered - decoded).mean() < 6.0


def test_generation_is_deterministic_and_force_replaces_only_synth_output(tiny_dir: Path, tmp_path: Path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    # --force on a folder sdtl did not write: refused, nothing deleted (it used to delete stale.txt)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "stale.txt").write_text("somebody else's file")
    args = parser.parse_args(["synth", "--out", str(foreign), "--preset", "tiny", "--force"])
    with pytest.raises(UserError, match="not a dataset written by `sdtl synth`.*nothing was deleted"):
        args.func(args)
    assert [p.name for p in foreign.iterdir()] == ["stale.txt"]
    # --force on a folder sdtl synth wrote: replaced, byte-for-byte deterministic
    again = tmp_path / "again"
    shutil.copytree(tiny_dir, again)
    # ... but not over a file synth did not write inside it (named by neither meta.json nor the lists)
    (again / "videos" / "extra.avi").write_bytes(b"a clip the user added")
    args = parser.parse_args(["synth", "--out", str(again), "--preset", "tiny", "--seed", "0", "--force"])
    with pytest.raises(UserError, match=r"also holds files synth did not write \(videos/extra.avi\).*nothing was deleted"):
        args.func(args)
    assert (again / "videos" / "extra.avi").read_bytes() == b"a clip the user added"
    (again / "videos" / "extra.avi").unlink()
    assert args.func(args) == 0
    assert _digests(again) == _digests(tiny_dir)  # byte-for-byte, every video and list


def test_different_seed_gives_different_videos():
    a = render_labelled(TINY, 0, 0, 1, 1)
    b = render_labelled(TINY, 1, 0, 1, 1)
    assert not np.array_equal(a, b)


def test_refuses_non_empty_out_dir(tmp_path: Path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"busy.*not empty.*--force"):
        generate_synthetic(out, preset="tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing half-written beside it
    with pytest.raises(UserError, match="unknown preset"):
        generate_synthetic(tmp_path / "new", preset="huge")


def _frame_features(frame: np.ndarray) -> np.ndarray:
    """Appearance statistics of one frame: mean and std colour, and a coarse colour histogram."""
    pixels = frame.reshape(-1, 3).astype(np.float64)
    hist = [np.histogram(pixels[:, c], bins=4, range=(0, 256))[0] / len(pixels) for c in range(3)]
    return np.concatenate([pixels.mean(0) / 255, pixels.std(0) / 255, *hist])


def test_single_frames_do_not_reveal_the_class(tiny_dir: Path):
    """Classes are motions: single-frame appearance statistics must not transfer from train groups
    to test groups. Catches a regression where a class gets its own colour, shape or background."""
    lists = tiny_dir / "lists"
    names = list(TINY.classes)

    def features(rels):
        x, y = [], []
        for rel in rels:
            frames = _decode(tiny_dir / "videos" / rel)
            x.append(_frame_features(frames[len(frames) // 2]))
            y.append(names.index(rel.split("/")[0]))
        return np.array(x), np.array(y)

    x_train, y_train = features([line.split()[0] for line in _lines(lists / "trainlist01.txt")])
    x_test, y_test = features(_lines(lists / "testlist01.txt"))
    scale = x_train.std(0) + 1e-6
    x_train, x_test = x_train / scale, x_test / scale
    centroids = np.stack([x_train[y_train == k].mean(0) for k in range(len(names))])
    nearest_centroid = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    nearest_neighbour = y_train[np.argmin(((x_test[:, None] - x_train[None]) ** 2).sum(-1), axis=1)]
    chance = 1.0 / len(names)
    # With 36 test videos chance is 17% +- 6%; an appearance-defined class set scores near 100%.
    assert (nearest_centroid == y_test).mean() < chance + 0.2
    assert (nearest_neighbour == y_test).mean() < chance + 0.2
