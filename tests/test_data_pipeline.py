"""Clip sampling, transforms, VideoClipDataset items, DataLoader workers, corrupt videos, stratified split."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from data_helpers import clip_tree, numbered_frames, read_number

from sdtl.data import transforms as TR
from sdtl.data.corrupt import CorruptVideoTracker, TooManyCorruptVideos, check_failures
from sdtl.data.datasets import VideoClipDataset, VideoRecord, collate_clips, stratified_split
from sdtl.data.sampling import sample_test_clips, sample_train_clip
from sdtl.errors import RunFailed, UserError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- sampling

def test_train_clip_window_and_determinism():
    starts = set()
    for s in range(200):
        idx = sample_train_clip(100, 16, 2, gen(s))
        assert idx == list(range(idx[0], idx[0] + 32, 2)) and 0 <= idx[0] <= 100 - 31
        starts.add(idx[0])
        assert sample_train_clip(100, 16, 2, gen(s)) == idx  # same generator seed -> same clip
    g = gen(0)
    starts = {sample_train_clip(100, 16, 2, g)[0] for _ in range(2000)}
    assert starts == set(range(70))  # every start 0..n-span reachable, nothing beyond
    before = torch.get_rng_state()
    sample_train_clip(100, 16, 1, gen(1))
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is never touched
    with pytest.raises(TypeError):
        sample_train_clip(100, 16, 1, None)


def test_short_videos_loop():
    assert sample_train_clip(5, 16, 1, gen()) == [0, 1, 2, 3, 4] * 3 + [0]
    assert sample_train_clip(16, 16, 1, gen()) == list(range(16))
    assert sample_test_clips(5, 8, 1, 2) == [[0, 1, 2, 3, 4, 0, 1, 2]] * 2


def test_test_clip_starts_rounded_linspace():
    clips = sample_test_clips(100, 16, 1, 10)
    assert [c[0] for c in clips] == [int(x) for x in np.round(np.linspace(0, 84, 10))]
    assert clips[-1][-1] == 99 and all(len(c) == 16 for c in clips)
    assert [c[0] for c in sample_test_clips(300, 16, 1, 1)] == [0]


# --------------------------------------------------------------------------- transforms

def _frames(t=4, h=60, w=80):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8))


def test_train_transform_shape_determinism_and_spread():
    x = _frames()
    a = TR.train_transform(x, 32, generator=gen(3))
    assert a.shape == (3, 4, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, TR.train_transform(x, 32, generator=gen(3)))
    outs = {TR.train_transform(x, 32, generator=gen(s)).sum().item() for s in range(8)}
    assert len(outs) > 4  # different seeds crop differently
    # full-frame crop of a left-dark/right-bright frame: the flip shows as a bright left half
    half = torch.zeros(1, 20, 20, 3, dtype=torch.uint8)
    half[:, :, 10:] = 255
    flips = sum(bool(TR.train_transform(half, 20, generator=gen(s), scale=(1, 1), ratio=(1, 1))[0, 0, :, :10].mean()
                     > 0) for s in range(200))
    assert 70 < flips < 130  # p = 0.5
    for s in range(300):
        top, left, h, w = TR.random_resized_crop_params(60, 80, gen(s))
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.25 * 4800 * 0.9 <= h * w <= 4800 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_train_transform_normalises_like_imagenet():
    white = torch.full((2, 20, 20, 3), 255, dtype=torch.uint8)
    out = TR.train_transform(white, 8, generator=gen())
    expected = (1 - torch.tensor(TR.IMAGENET_MEAN)) / torch.tensor(TR.IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0, 0], expected)


def test_test_transform_centre_and_three_crops():
    # 2 frames 40x80: left half 0, right half 255 -> the centre crop is half dark, half bright
    x = torch.zeros(2, 40, 80, 3, dtype=torch.uint8)
    x[:, :, 40:] = 255
    one = TR.test_transform(x, 20, crops=1)
    assert one.shape == (1, 3, 2, 20, 20)
    three = TR.test_transform(x, 20, crops=3)
    assert three.shape == (3, 3, 2, 20, 20)
    torch.testing.assert_close(three[1], one[0])
    assert three[0].mean() < one[0].mean() < three[2].mean()  # left, centre, right
    assert TR.test_crop_boxes(80, 40, 3) == [(0, 0, 40), (20, 0, 40), (40, 0, 40)]  # portrait: top/centre/bottom


# --------------------------------------------------------------------------- dataset

@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 good videos (two classes, one shorter than a clip) and 3 undecodable ones."""
    return clip_tree(tmp_path_factory.mktemp("clips"))


def test_train_items_are_deterministic_per_seed_epoch_index(tree):
    good, _ = tree
    ds = VideoClipDataset(good, ["a", "b"], "train", clip_len=8, size=16, backend="pyav", seed=5)
    item = ds[0]
    assert item["video"].shape == (3, 8, 16, 16) and item["label"] == 0
    assert item["video_index"] == 0 and item["clip_index"] == 0 and item["failed"] == []
    assert torch.equal(item["video"], ds[0]["video"])
    ds.set_epoch(1)
    assert not torch.equal(item["video"], ds[0]["video"])  # a new epoch draws new clips
    ds.set_epoch(0)
    assert torch.equal(item["video"], ds[0]["video"])  # ... and returning to epoch 0 replays it


def test_test_items_and_collate(tree):
    good, _ = tree
    ds = VideoClipDataset(good, ["a", "b"], "test", clip_len=8, num_clips=3, crops=3, size=16, backend="pyav")
    item = ds[1]
    assert item["video"].shape == (9, 3, 8, 16, 16)
    assert item["clip_index"].tolist() == list(range(9)) and item["label"] == 1
    batch = collate_clips([ds[0], ds[1]])
    assert batch["video"].shape == (18, 3, 8, 16, 16)
    assert batch["video_index"].tolist() == [0] * 9 + [1] * 9 and batch["label"].tolist() == [0] * 9 + [1] * 9


def test_test_clips_are_the_right_frames(tree):
    """Un-normalise the test clips and read the frame numbers back."""
    good, _ = tree
    ds = VideoClipDataset(good[:1], ["a"], "test", clip_len=4, num_clips=3, size=32, backend="pyav")
    video = ds[0]["video"]  # [3, 3, 4, 32, 32], 48x32 frames centre-cropped to 32x32
    mean, std = torch.tensor(TR.IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(TR.IMAGENET_STD).view(3, 1, 1, 1)
    starts = [c[0] for c in sample_test_clips(40, 4, 1, 3)]
    for clip, start in zip(video, starts):
        pix = ((clip * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
        # the centre crop keeps bits 1..6 of the 8 blocks (48 px wide, 6 px per block, 8 px cut each side)
        got = [read_number(np.pad(f.numpy(), ((0, 0), (8, 8), (0, 0)))) & 0b01111110 for f in pix]
        assert got == [(start + k) & 0b01111110 for k in range(4)]


def test_short_video_loops_in_dataset(tree):
    good, _ = tree
    ds = VideoClipDataset(good[2:3], ["a"], "test", clip_len=16, num_clips=1, size=48, backend="pyav")
    clip = ds[0]["video"][0]  # 10-frame video, 16-frame clip: frames 0..9, 0..5
    torch.testing.assert_close(clip[:, 10:], clip[:, :6])


def test_corrupt_videos_never_crash_workers(tree):
    good, bad = tree
    records = bad + good
    train = VideoClipDataset(records, ["a", "b"], "train", clip_len=8, size=16, backend="pyav", seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=2, collate_fn=collate_clips)
    failed, clips = [], 0
    for batch in loader:
        clips += batch["video"].shape[0]
        failed += batch["failed"]
    assert clips == len(records)  # every item delivered a clip
    assert {p for p, _ in failed} >= {str(r.path) for r in bad}  # each bad file reported with its reason
    assert all(reason for _, reason in failed)

    test = VideoClipDataset(records, ["a", "b"], "test", clip_len=8, num_clips=2, size=16, backend="pyav")
    loader = torch.utils.data.DataLoader(test, batch_size=2, num_workers=2, collate_fn=collate_clips)
    batches = list(loader)
    failed = [f for b in batches for f in b["failed"]]
    assert sorted(p for p, _ in failed) == sorted(str(r.path) for r in bad)
    assert sum(b["video"].shape[0] for b in batches) == 2 * len(good)
    with pytest.raises(UserError) as err:
        check_failures(failed)
    assert all(str(r.path) in str(err.value) for r in bad) and "set eval.skip_corrupt=true" in str(err.value)
    assert check_failures(failed, skip=True) == 3


def test_same_batches_whatever_the_number_of_workers(tree):
    good, _ = tree
    ds = VideoClipDataset(good, ["a", "b"], "train", clip_len=8, size=16, backend="pyav", seed=3)
    ds.set_epoch(2)

    def run(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate_clips)
        return torch.cat([b["video"] for b in loader])

    assert torch.equal(run(0), run(2))


def test_workers_share_what_the_probe_learned(tree, tmp_path):
    """Non-persistent DataLoader workers start empty every epoch: the run's index file is what spares
    them probing every video again -- and decoding MPEG-PS files whole to count their frames."""
    import json

    import av

    good, _ = tree
    mpg = tmp_path / "program_stream.mpg"
    with av.open(str(mpg), "w", format="vob") as c:
        s = c.add_stream("mpeg2video", rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        for f in numbered_frames(24, 32, 48):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    records = good + [VideoRecord(mpg, 1, mpg.name)]
    index = tmp_path / "run" / "video_index.jsonl"
    index.parent.mkdir()
    ds = VideoClipDataset(records, ["a", "b"], "train", clip_len=8, size=16, backend="pyav", probe_index=index)

    def epoch(e):
        ds.set_epoch(e)
        loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_clips)
        return sum(len(b["label"]) for b in loader)

    assert epoch(1) == len(records)
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    assert {e["path"] for e in entries} == {os.path.abspath(r.path) for r in records}
    assert len(entries) == len(records) + 1  # + the frame count of the MPEG-PS file, learned by decoding
    assert [e["frames"] for e in entries if e["path"] == os.path.abspath(mpg)] == [None, 24]
    assert epoch(2) == len(records)
    assert len(index.read_text().splitlines()) == len(entries)  # nothing probed again


def test_skip_corrupt_false_raises(tree):
    _, bad = tree
    ds = VideoClipDataset(bad[:1], ["a"], "train", clip_len=8, size=16, backend="pyav", skip_corrupt=False)
    from sdtl.data.video_io import VideoDecodeError

    with pytest.raises(VideoDecodeError, match="zero.avi"):
        ds[0]


def test_all_corrupt_gives_up_with_a_clear_error(tree):
    _, bad = tree
    ds = VideoClipDataset(bad, ["a"], "train", clip_len=8, size=16, backend="pyav")
    with pytest.raises(UserError, match="in a row could not be decoded.*sdtl data check --decode"):
        ds[0]


def test_bad_dataset_inputs(tree):
    good, _ = tree
    with pytest.raises(UserError, match="empty dataset"):
        VideoClipDataset([], ["a"])
    with pytest.raises(UserError, match=r"label 2 out of range 0..1"):
        VideoClipDataset([VideoRecord(good[0].path, 2, "x")], ["a", "b"])
    with pytest.raises(UserError, match="crops"):
        VideoClipDataset(good, ["a", "b"], crops=2)


# --------------------------------------------------------------------------- corrupt tracker

def test_tracker_logs_once_quarantines_and_stops(tmp_path, caplog):
    q = tmp_path / "out" / "quarantine.txt"
    tracker = CorruptVideoTracker(q, max_fraction=0.05, min_samples=20)
    with caplog.at_level(logging.WARNING):
        tracker.update([("/v/a.avi", "zero-byte file")], 9)
        tracker.update([("/v/a.avi", "zero-byte file")], 29)
    assert caplog.text.count("/v/a.avi") == 1  # logged once
    assert q.read_text() == "/v/a.avi\tzero-byte file\n"  # quarantined once
    assert tracker.epoch_count == 2 and tracker.total_failures == 2
    tracker.reset_epoch()
    assert tracker.epoch_count == 0
    with pytest.raises(TooManyCorruptVideos) as err:
        tracker.update([("/v/b.avi", "truncated"), ("/v/c.avi", "not a video")], 1)
    assert isinstance(err.value, RunFailed) and isinstance(err.value, UserError)
    assert "4 of 43" in str(err.value) and "quarantine.txt" in str(err.value)
    assert q.read_text().count("\n") == 3
    # a resumed run does not log or quarantine the same files again
    again = CorruptVideoTracker(q, max_fraction=1.0)
    again.update([("/v/a.avi", "zero-byte file")], 10)
    assert q.read_text().count("\n") == 3


def test_tracker_waits_for_enough_samples():
    tracker = CorruptVideoTracker(None, max_fraction=0.01, min_samples=100)
    tracker.update([("/v/a.avi", "bad")], 7)  # 1 in 8 early on is no reason to stop a 10k-video run
    with pytest.raises(TooManyCorruptVideos):
        tracker.check(force=True)


# --------------------------------------------------------------------------- stratified split

def _ucf_like(n_classes=5, groups=7, clips=4):
    return [VideoRecord(f"/x/C{c}/v_C{c}_g{g:02d}_c{k:02d}.avi", c, f"C{c}/v_C{c}_g{g:02d}_c{k:02d}.avi")
            for c in range(n_classes) for g in range(1, groups + 1) for k in range(1, clips + 1)]


def test_stratified_split_groups_and_classes():
    records = _ucf_like()
    train, val = stratified_split(records, 0.2, seed=0)
    assert len(train) + len(val) == len(records) and not set(train) & set(val)
    for c in range(5):
        n_val = sum(r.label == c for r in val)
        assert 4 <= n_val <= 8  # ~20 % of 28, whole groups of 4
    group = lambda r: (r.label, r.name.split("_g")[1][:2])  # noqa: E731
    assert not {group(r) for r in train} & {group(r) for r in val}  # no group on both sides
    assert stratified_split(records, 0.2, seed=0) == (train, val)
    assert stratified_split(records, 0.2, seed=1) != (train, val)


def test_stratified_split_small_classes():
    records = [VideoRecord(f"/x/{i}.avi", label, f"{i}.avi") for i, label in enumerate([0, 1, 1, 2, 2, 2])]
    train, val = stratified_split(records, 0.5, seed=0, group_key=None)
    assert [r.label for r in train].count(0) == 1  # a single video stays in train
    for c in (1, 2):
        assert any(r.label == c for r in train) and any(r.label == c for r in val)
    assert stratified_split(records, 0.0)[1] == []
