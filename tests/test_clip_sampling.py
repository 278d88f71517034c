"""The composed clip dataset: one ClipDataset + a clip sampler serves supervised, evaluation, pretext
and two-clip items, bit for bit as the separate datasets it replaced.

The ``_frozen_*`` functions are verbatim copies of the item code before the composition
(``VideoClipDataset._train_item`` / ``_test_item`` and ``PretextClipDataset.__getitem__`` at commit
7bab78f, and the clip collection of ``make_retention_probe``): every random draw, in the same order,
from the same generator. The new dataset must give ``torch.equal`` tensors for every (epoch, index),
corrupt videos (the replacement path) included.
"""
from __future__ import annotations

import pytest
import torch
from data_helpers import clip_tree

from sdtl.data.datasets import (
    MAX_REPLACEMENTS,
    NO_LABEL,
    ClipDataset,
    VideoClipDataset,
    collate_clips,
    sample_generator,
)
from sdtl.data.sampling import (
    ClipDraw,
    ClipSampler,
    RandomClipSampler,
    TwoClipSampler,
    UniformClipsSampler,
    sample_test_clips,
    sample_train_clip,
)
from sdtl.data.transforms import test_transform, train_transform
from sdtl.data.video_io import VideoDecodeError, open_video
from sdtl.errors import UserError
from sdtl.pretext import PRETEXT_TASKS
from sdtl.pretext.dataset import PretextClipDataset, PretextSampler


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """4 good videos (two classes, one shorter than a clip) and 3 undecodable ones, bad first."""
    good, bad = clip_tree(tmp_path_factory.mktemp("clips"))
    return bad + good


# --------------------------------------------------------------------------- frozen pre-composition code

def _frozen_train_item(records, clip_len, stride, size, crop_area, backend, seed, epoch, index):
    generator = sample_generator(seed, epoch, index)
    failed = []
    for _ in range(10 + 1):
        record = records[index]
        try:
            with open_video(record.path, backend, None) as reader:
                frames = reader.get_frames(sample_train_clip(reader.num_frames, clip_len, stride, generator))
            break
        except VideoDecodeError as exc:
            failed.append((str(record.path), exc.reason))
            index = int(torch.randint(0, len(records), (1,), generator=generator))
    else:
        raise AssertionError("all failed")
    video = train_transform(frames, size, generator=generator, scale=crop_area)
    return {"video": video, "label": record.label, "video_index": index, "clip_index": 0, "failed": failed}


def _frozen_test_item(records, clip_len, stride, num_clips, crops, size, backend, index):
    record = records[index]
    views = num_clips * crops
    try:
        with open_video(record.path, backend, None) as reader:
            clips = sample_test_clips(reader.num_frames, clip_len, stride, num_clips)
            frames = reader.get_frames([i for clip in clips for i in clip])
    except VideoDecodeError as exc:
        empty = torch.zeros(0, 3, clip_len, size, size)
        return {"video": empty, "label": record.label, "video_index": index,
                "clip_index": torch.zeros(0, dtype=torch.long), "failed": [(str(record.path), exc.reason)]}
    frames = frames.view(num_clips, clip_len, *frames.shape[1:])
    video = torch.cat([test_transform(clip, size, crops) for clip in frames])
    return {"video": video, "label": record.label, "video_index": index,
            "clip_index": torch.arange(views), "failed": []}


def _frozen_pretext_item(paths, task, size, crop_area, backend, seed, epoch, index):
    g = sample_generator(seed, epoch, index)
    failed = []
    for _attempt in range(10):
        path = paths[index]
        try:
            with open_video(path, backend, None) as reader:
                target = int(torch.randint(len(task.strides), (1,), generator=g))
                indices = sample_train_clip(reader.num_frames, task.clip_len, task.strides[target], g)
                frames = reader.get_frames(indices)
            video = train_transform(frames, size, generator=g, scale=crop_area)
            return {"video": video, "label": target, "video_index": index, "clip_index": 0, "failed": failed}
        except VideoDecodeError as exc:
            failed.append((str(path), str(exc)))
            index = int(torch.randint(len(paths), (1,), generator=g))
    raise AssertionError("all failed")


def _same(new: dict, old: dict, reasons: bool = True) -> None:
    assert new.keys() == old.keys()
    for key, value in old.items():
        if torch.is_tensor(value):
            assert torch.is_tensor(new[key]) and new[key].dtype == value.dtype, key
            assert torch.equal(new[key], value), key
        elif key == "failed" and not reasons:
            assert [p for p, _ in new[key]] == [p for p, _ in value]
        else:
            assert new[key] == value, key


# --------------------------------------------------------------------------- bit-exact

def test_supervised_train_items_are_bit_identical_to_the_old_dataset(tree):
    for clip_len, stride, size, crop_area, seed in ((8, 1, 16, (0.25, 1.0), 1), (4, 3, 24, (0.5, 0.9), 9)):
        ds = VideoClipDataset(tree, ["a", "b"], "train", clip_len=clip_len, stride=stride, size=size,
                              backend="pyav", seed=seed, crop_area=crop_area)
        replaced = 0
        for epoch in range(3):
            for i in range(len(tree)):
                old = _frozen_train_item(tree, clip_len, stride, size, crop_area, "pyav", seed, epoch, i)
                _same(ds[(epoch, i)], old)
                replaced += bool(old["failed"])
        assert replaced >= 9  # the three bad videos went through the replacement loop every epoch
        ds.set_epoch(4)
        _same(ds[2], _frozen_train_item(tree, clip_len, stride, size, crop_area, "pyav", seed, 4, 2))


def test_supervised_test_items_are_bit_identical_to_the_old_dataset(tree):
    for clip_len, num_clips, crops, size in ((8, 2, 3, 16), (16, 1, 1, 20), (4, 3, 1, 12)):
        ds = VideoClipDataset(tree, ["a", "b"], "test", clip_len=clip_len, num_clips=num_clips, crops=crops,
                              size=size, backend="pyav")
        for i in range(len(tree)):
            _same(ds[(1, i)], _frozen_test_item(tree, clip_len, 1, num_clips, crops, size, "pyav", i))


def test_pretext_items_are_bit_identical_to_the_old_dataset(tree):
    """Same tensors, targets and replacement videos; the ``failed`` reasons are now the decoder's reason
    (as every dataset's) instead of the exception text that repeated the path."""
    paths = [r.path for r in tree]
    for strides, clip_len, size, seed, crop_area in (([1, 2, 4, 8], 8, 16, 7, (0.25, 1.0)),
                                                     ([1, 3], 4, 24, 0, (0.6, 0.7))):
        task = PRETEXT_TASKS["speed"](strides, clip_len)
        ds = PretextClipDataset(paths, task, size, "pyav", seed, crop_area)
        assert isinstance(ds, ClipDataset) and len(ds) == len(paths)
        targets = set()
        for epoch in range(3):
            for i in range(len(paths)):
                old = _frozen_pretext_item(paths, task, size, crop_area, "pyav", seed, epoch, i)
                new = ds[(epoch, i)]
                _same(new, old, reasons=False)
                assert [r for _, r in new["failed"]] == [str(r).split(": cannot decode video: ", 1)[1]
                                                         for _, r in old["failed"]]
                targets.add(new["label"])
        assert targets == set(range(len(strides)))
        ds.set_epoch(5)
        _same(ds[0], _frozen_pretext_item(paths, task, size, crop_area, "pyav", seed, 5, 0), reasons=False)


def test_retention_probe_clips_are_bit_identical(tree):
    """make_retention_probe (the quick demo's retention numbers) draws the same clips as before."""
    from sdtl.assets import demo_encoder
    from sdtl.engine.diagnostics import make_retention_probe

    shipped = demo_encoder()
    ckpt = torch.load(shipped, map_location="cpu", weights_only=True)
    task = PRETEXT_TASKS[ckpt["task"]](ckpt["task_options"]["strides"], 16)
    paths = [r.path for r in tree]
    probe = make_retention_probe(shipped, paths, size=16, backend="pyav", crop_area=(0.6, 0.7), clips_per_class=2,
                                 seed=3)
    per_class = {k: [] for k in range(task.num_outputs)}
    for draw in range(64):  # the old collection loop, over the frozen pretext items
        for i in range(len(paths)):
            if all(len(b) >= 2 for b in per_class.values()):
                break
            item = _frozen_pretext_item(paths, task, 16, (0.6, 0.7), "pyav", 3 + 104729, draw, i)
            if len(per_class[item["label"]]) < 2:
                per_class[item["label"]].append(item["video"])
    order = [(k, j) for j in range(2) for k in sorted(per_class)]
    assert torch.equal(probe.labels, torch.tensor([k for k, _ in order]))
    assert torch.equal(probe.clips, torch.stack([per_class[k][j] for k, j in order]))


# --------------------------------------------------------------------------- the composed API

def test_one_retry_limit_for_every_sampler(tree):
    bad = [r.path for r in tree[:3]]
    task = PRETEXT_TASKS["speed"]([1, 2], 8)
    for ds in (PretextClipDataset(bad, task, 16, "pyav", 0),
               ClipDataset(bad, RandomClipSampler(8, 1, 16), backend="pyav"),
               ClipDataset(bad, TwoClipSampler(8, 1, 16), backend="pyav")):
        assert ds.max_replacements == MAX_REPLACEMENTS
        with pytest.raises(UserError, match=f"{MAX_REPLACEMENTS + 1} videos in a row could not be decoded"):
            ds[0]
    with pytest.raises(VideoDecodeError, match="zero.avi"):
        ClipDataset(bad, RandomClipSampler(8, 1, 16), backend="pyav", skip_corrupt=False)[0]


def test_unlabelled_pool_labels_come_from_the_sampler(tree):
    paths = [r.path for r in tree[3:]]
    plain = ClipDataset(paths, RandomClipSampler(8, 1, 16), backend="pyav", seed=2)
    assert plain[0]["label"] == NO_LABEL  # no labels, no target
    labelled = ClipDataset(paths, RandomClipSampler(8, 1, 16), labels=[1, 0, 1, 0], backend="pyav", seed=2)
    assert labelled[0]["label"] == 1 and torch.equal(labelled[0]["video"], plain[0]["video"])
    with pytest.raises(TypeError, match="ClipSampler"):
        ClipDataset(paths, lambda n, g: None)
    with pytest.raises(UserError, match="empty dataset"):
        ClipDataset([], RandomClipSampler())


def test_evaluation_sampler_gives_an_empty_item_for_a_bad_video(tree):
    ds = ClipDataset([r.path for r in tree], UniformClipsSampler(8, 1, 2, 16, 3), backend="pyav")
    item = ds[0]
    assert item["video"].shape == (0, 3, 8, 16, 16) and item["label"] == NO_LABEL and len(item["failed"]) == 1
    assert ds[3]["video"].shape == (6, 3, 8, 16, 16)


def test_two_clip_items_draw_in_the_documented_order(tree):
    """Two independent windows of the same video, then each clip's own augmentation, all from the
    item's generator; batches stack to [B, 2, 3, T, S, S]."""
    good = tree[3:]
    ds = ClipDataset([r.path for r in good], TwoClipSampler(clip_len=8, stride=2, size=16, crop_area=(0.3, 0.8)),
                     labels=[r.label for r in good], backend="pyav", seed=4)
    for epoch, i in ((0, 0), (1, 3), (2, 1)):
        item = ds[(epoch, i)]
        g = sample_generator(4, epoch, i)
        with open_video(good[i].path, "pyav") as reader:
            windows = [sample_train_clip(reader.num_frames, 8, 2, g) for _ in range(2)]
            frames = [reader.get_frames(w) for w in windows]
        expected = torch.stack([train_transform(f, 16, generator=g, scale=(0.3, 0.8)) for f in frames])
        assert torch.equal(item["video"], expected) and item["label"] == good[i].label
        assert not torch.equal(item["video"][0], item["video"][1])  # two clips, two augmentations
    batch = collate_clips([ds[(0, 0)], ds[(0, 1)], ds[(0, 3)]])
    assert batch["video"].shape == (3, 2, 3, 8, 16, 16) and batch["label"].tolist() == [0, 1, 1]


class _SpeedPairSampler(TwoClipSampler):
    """A small two-clip pretext sampler: each clip gets its own stride; the target is both strides'
    classes (RSPNet's relative speed would be their comparison)."""

    supplies_target = True

    def __init__(self, strides, **kw):
        super().__init__(**kw)
        self.strides = strides

    def draw(self, num_frames, generator):
        classes, clips = [], []
        for _ in range(2):
            k = int(torch.randint(len(self.strides), (1,), generator=generator))
            classes.append(k)
            clips.append(sample_train_clip(num_frames, self.clip_len, self.strides[k], generator))
        return ClipDraw(tuple(clips), tuple(classes))


def test_a_two_clip_pretext_sampler_on_an_unlabelled_pool(tree):
    ds = ClipDataset([r.path for r in tree], _SpeedPairSampler([1, 2, 4], clip_len=4, size=16), backend="pyav",
                     seed=1)
    items = [ds[(0, i)] for i in range(len(tree))]
    assert all(it["video"].shape == (2, 3, 4, 16, 16) for it in items)
    assert all(isinstance(it["label"], tuple) and len(it["label"]) == 2 for it in items)
    assert sum(len(it["failed"]) for it in items) >= 3  # the bad videos were replaced, as for every sampler
    batch = collate_clips(items)
    assert batch["video"].shape == (7, 2, 3, 4, 16, 16) and batch["label"].shape == (7, 2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_clips)
    assert torch.equal(torch.cat([b["video"] for b in loader]), batch["video"])  # worker-independent


def test_a_custom_sampler_needs_only_draw_and_views(tree):
    class FirstFrames(ClipSampler):
        def draw(self, num_frames, generator):
            return ClipDraw(([0, 1],), target=7)

        def views(self, clips, generator):
            return {"video": clips[0], "clip_index": 0, "num_frames_seen": len(clips[0])}

    item = ClipDataset([tree[3].path], FirstFrames(), backend="pyav")[0]
    assert item["label"] == 7 and item["video"].shape == (2, 32, 48, 3) and item["num_frames_seen"] == 2
    assert isinstance(PretextSampler(PRETEXT_TASKS["speed"]([1], 4), 16), ClipSampler)


def test_epoch_sampler_skip_resumes_the_epochs_order_once():
    from sdtl.data.datasets import EpochSampler

    s = EpochSampler(torch.utils.data.DistributedSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=0))
    s.set_epoch(2)
    full = list(s)
    s.skip(4)
    assert list(s) == full[4:]  # a run resumed after 4 samples of epoch 2 sees the rest, in order
    assert list(s) == full  # the skip applies to one pass only
    assert all(epoch == 2 for epoch, _ in full)
