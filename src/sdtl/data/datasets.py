"""Labelled video datasets: one generic clip dataset, thin builders for UCF101, HMDB51 and users' data.

Called by the engine (fine-tuning, evaluation), ``sdtl data check|bench`` and the tests:

* :func:`list_records` -- ``(records, classes)`` from a split list and ONE directory listing per class
  folder. No decoding, no per-file ``stat``: 13,320 UCF101 entries take milliseconds (torchvision's
  ``VideoClips`` decodes every file to build its index).
* :func:`build_dataset` -- ``list_records`` + :class:`VideoClipDataset`.
* :class:`ClipDataset` -- videos + a clip sampler (:mod:`sdtl.data.sampling`): the one dataset of
  supervised, pretext and two-clip items, with the one replace-undecodable-video loop.
* :class:`VideoClipDataset` -- labelled records + the supervised sampler: one clip per item (train) or
  ``num_clips`` clips (test).
* :func:`collate_clips`, :func:`stratified_split`.

Dataset layouts (``root``):

* ``ucf101``: ``<Class>/<video>.avi`` (or any video extension: files are matched by stem, so transcoded
  copies work); official lists shipped with sdtl, or ``lists_dir`` in the same format.
* ``hmdb51``: ``<class>/<video>.avi``; official ``testTrainMulti_7030_splits`` shipped.
* ``synthetic``: what ``sdtl synth`` writes: UCF101 layout in ``<root>/videos``, lists in ``<root>/lists``.
* ``folder``: ``<class>/<video>`` (classes = sorted sub-folders; a sub-folder without videos is an
  error, not an empty class; hidden folders are ignored). Subsets from ``<root>/train`` and
  ``<root>/test`` when both exist, else from UCF101-style ``trainlist0K.txt``/``testlist0K.txt`` in
  ``lists_dir`` (lines ``<class>/<video> [label]``), else every video is in ``train`` and there is no test.
* ``csv``: ``<lists_dir or root>/<subset>.csv`` (split 1; ``<subset><K>.csv`` or ``.txt`` for other
  splits) with lines ``path,label`` or ``path label``; label a 0-based int or a class name; an optional
  ``classes.txt`` fixes the class order.
* ``kinetics400``: the official CSVs (``train.csv``, ``validate.csv``) in ``lists_dir`` or
  ``<root>/annotations``, videos ``{youtube_id}_{start:06d}_{end:06d}.<any video suffix>`` under
  ``<root>/train`` and ``<root>/val``, flat or in class folders; or class folders alone. sdtl's ``test``
  is Kinetics' validate set; one split only. See :mod:`sdtl.data.kinetics`.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtl.data import splits as S
from sdtl.data.sampling import ClipSampler, RandomClipSampler, UniformClipsSampler
from sdtl.data.transforms import _tf as _load_transforms
from sdtl.data.video_io import ProbeCache, VideoDecodeError, open_video, resolve_backend
from sdtl.data.videos import VIDEO_EXTENSIONS, scan_folder
from sdtl.errors import DataError, UserError

log = logging.getLogger(__name__)



# The library names parameters by their config keys (data.root, the `root` argument here); only the
# CLI spells them as command-line flags.
ROOT_OPTION = "the dataset root (data.root)"

@dataclass(frozen=True)
class VideoRecord:
    """One labelled video. ``name`` is the path as written in the list (stable across transcoding)."""

    path: Path
    label: int
    name: str


# --------------------------------------------------------------------------- matching lists to files

class _DirIndex:
    """Directory listings, read once each with ``os.scandir``; case-insensitive name and stem lookup.

    Works on plain strings (pathlib objects cost ~20 us each, which matters at 13,320 entries).
    """

    def __init__(self, root: Path):
        self.root = str(root)
        self._listings: dict[str, tuple[dict, dict, dict]] = {}

    def _listing(self, folder: str):
        listing = self._listings.get(folder)
        if listing is None:
            dirs, files, stems = {}, {}, {}
            dir_names, file_names = scan_folder(folder)
            for name in dir_names:
                dirs.setdefault(name.lower(), name)
            for name in file_names:
                files[name] = name
                stems.setdefault(os.path.splitext(name)[0].lower(), []).append(name)
            listing = self._listings[folder] = (dirs, files, stems)
        return listing

    def subdirs(self, folder) -> list[str]:
        """Sub-folders, hidden ones (``.git``, ``.ipynb_checkpoints``) left out."""
        return sorted(d for d in self._listing(str(folder))[0].values() if not d.startswith("."))

    def videos(self, folder) -> list[str]:
        return sorted(n for n in self._listing(str(folder))[1] if n.lower().endswith(VIDEO_EXTENSIONS))

    def has_dir(self, relpath: str) -> bool:
        """Whether the folder ``relpath`` (``/``-separated, relative to the root) exists, any case."""
        folder = self.root
        for part in (p for p in relpath.split("/") if p not in ("", ".")):
            real = self._listing(folder)[0].get(part.lower())
            if real is None:
                return False
            folder = os.path.join(folder, real)
        return True

    def find(self, relpath: str) -> Path | None:
        """The file for ``relpath``: exact name, else same stem (any case) with a video extension.

        Folder names are matched exactly, else case-insensitively (``HandstandPushups`` vs
        ``HandStandPushups`` copies of UCF101)."""
        if os.path.isabs(relpath):
            folder, parts = os.path.dirname(relpath), [os.path.basename(relpath)]
        else:
            folder, parts = self.root, [p for p in relpath.split("/") if p not in ("", ".")]
        if not parts:
            return None
        for part in parts[:-1]:
            dirs = self._listing(folder)[0]
            real = dirs.get(part.lower())
            if real != part and part in dirs.values():
                real = part
            if real is None:
                return None
            folder = os.path.join(folder, real)
        _, files, stems = self._listing(folder)
        name = parts[-1]
        if name in files:
            return Path(os.path.join(folder, name))  # one string: half the cost of Path(folder, name)
        stem, ext = os.path.splitext(name)
        candidates = stems.get(stem.lower())
        if not candidates:
            return None
        ext = ext.lower()
        for cand in sorted(candidates, key=lambda c: (os.path.splitext(c)[1].lower() != ext, c)):
            low = cand.lower()
            if low.endswith(VIDEO_EXTENSIONS) or (ext and low.endswith(ext)):
                return Path(folder, cand)
        return None


def _check_root(root) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"dataset root not given; set {ROOT_OPTION} to the folder holding the class folders")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root}: dataset root does not exist; check {ROOT_OPTION}", path=root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder; check {ROOT_OPTION}", path=root)
    return root


def match_files(root: Path, entries: list[S.ListEntry],
                index: _DirIndex | None = None) -> tuple[list[VideoRecord], list[S.ListEntry]]:
    """``(records found on disk, entries whose file is missing)``; reads directory listings only."""
    index = index or _DirIndex(root)
    records, missing = [], []
    for e in entries:
        path = index.find(e.relpath)
        if path is None:
            missing.append(e)
        else:
            records.append(VideoRecord(path, e.label, e.relpath))
    return records, missing


def root_problem(root: Path, entries: list[S.ListEntry], missing: list[S.ListEntry]) -> dict | None:
    """Why ``root`` looks like the wrong folder for these list entries, or None when it looks right.

    Wrong means: none of the folders the lists point into (the class folders) is there, or more than
    half of the listed videos are missing. The dict says what was expected where, what the root holds
    instead, and a sub-folder that does hold the class folders, if there is one (``UCF-101/`` inside
    the folder given)."""
    relative = [e.relpath for e in entries if not os.path.isabs(e.relpath)]
    expected = sorted({os.path.dirname(r) for r in relative} - {""})
    if not entries or not missing:
        return None
    index = _DirIndex(root)
    present = [d for d in expected if index.has_dir(d)]
    if len(missing) <= len(entries) / 2 and (present or not expected):
        return None
    out = {"root": str(root), "missing": len(missing), "listed": len(entries), "expected_folders": len(expected),
           "present_folders": len(present),
           "expected_at": [os.path.join(str(root), d) + os.sep for d in expected[:3]],
           "root_holds": index.subdirs(root)[:8], "suggested_root": None}
    # One or two levels down, a folder holding most of the expected class folders is the likely root.
    tops = {d.split("/")[0].lower() for d in expected}
    candidates = [Path(root, d) for d in index.subdirs(root)]
    candidates += [Path(c, d) for c in candidates[:20] for d in index.subdirs(c)]
    best = max(candidates, key=lambda c: sum(d.lower() in tops for d in index.subdirs(c)), default=None)
    if best is not None and sum(d.lower() in tops for d in index.subdirs(best)) > len(tops) / 2:
        out["suggested_root"] = str(best)
    return out


def describe_root_problem(problem: dict) -> str:
    """One paragraph for a human: what is missing, where the class folders were expected, a fix."""
    root = problem["root"]
    if problem["present_folders"] == 0:
        what = f"none of the {problem['expected_folders']} class folders named in the lists is in {root}"
    else:
        what = (f"{problem['missing']} of {problem['listed']} listed videos are missing "
                f"({problem['present_folders']} of {problem['expected_folders']} class folders found)")
    more = ", ..." if problem["expected_folders"] > len(problem["expected_at"]) else ""
    holds = ", ".join(f"{d}/" for d in problem["root_holds"]) or "no folders"
    text = (f"the dataset root looks wrong: {what}; they were expected at {', '.join(problem['expected_at'])}{more}"
            f"; {root} holds {holds}")
    if problem["suggested_root"]:
        return f"{text}; did you mean the root {problem['suggested_root']} (data.root)?"
    return f"{text}; {ROOT_OPTION} must be the folder holding the class folders"


def _resolve(root: Path, entries: list[S.ListEntry], on_missing: str, what: str,
             dataset: str | None = None) -> list[VideoRecord]:
    """List entries -> records with real paths; missing files reported together."""
    if on_missing not in ("error", "skip"):
        raise UserError(f"on_missing={on_missing!r}: use 'error' or 'skip'")
    records, missing = match_files(root, entries)
    if missing:
        first = ", ".join(m.relpath for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        lists = sorted({m.where.rsplit(":", 1)[0] for m in missing})
        source = lists[0] if len(lists) == 1 else f"{len(lists)} list files"
        if dataset == "kinetics400":  # a large share of Kinetics is gone from YouTube: counts, and skip
            from sdtl.data import kinetics as K

            if not records:
                raise DataError(K.nothing_found_message(root, what, len(entries), missing[0].relpath, source),
                                path=root)
            msg = K.missing_message(root, what, len(missing), len(entries), first, source)
            if on_missing == "error":
                raise DataError(f"{msg}; many Kinetics videos are no longer on YouTube: set data.on_missing=skip "
                                f"(on_missing='skip') to use the {len(records)} found, or restore them", path=root)
            log.warning("%s; skipped (on_missing='skip'): using %d of %d", msg, len(records), len(entries))
            return records
        if not records:
            example = entries[0].relpath if entries else "?"
            problem = root_problem(root, entries, missing)
            hint = (describe_root_problem(problem) if problem else
                    f"{ROOT_OPTION} must be the folder holding the class folders")
            raise DataError(f"{root}: none of the {len(entries)} {what} videos named in {source} is there "
                            f"(e.g. {example}); {hint}", path=root)
        msg = (f"{root}: {len(missing)} of {len(entries)} {what} videos named in {source} are missing "
               f"(first: {first})")
        if on_missing == "error":
            raise DataError(f"{msg}; restore them, or set data.on_missing=skip (on_missing='skip') to leave "
                            f"them out", path=root)
        log.warning("%s; skipped (on_missing='skip')", msg)
    return records


# --------------------------------------------------------------------------- builders

def _official(lists_dir, shipped: str):
    return S.shipped_lists(shipped) if lists_dir is None else Path(lists_dir).expanduser()


def _ucf101(root: Path, split: int, lists_dir):
    split = S.check_split(split)
    classes, train, test = S.read_ucf101_split(_official(lists_dir, "ucfTrainTestlist"), split)
    return classes, {"train": train, "test": test}, root


def _hmdb51(root: Path, split: int, lists_dir):
    split = S.check_split(split)
    classes, train, test = S.read_hmdb51_split(_official(lists_dir, "testTrainMulti_7030_splits"), split)
    return classes, {"train": train, "test": test}, root


def _synthetic(root: Path, split: int, lists_dir):
    split = S.check_split(split, (1,), "the synthetic dataset")
    lists = Path(lists_dir).expanduser() if lists_dir is not None else root / "lists"
    if not (lists / "classInd.txt").is_file():
        raise DataError(f"{lists}: no classInd.txt; {ROOT_OPTION} must be the folder `sdtl synth` wrote "
                        f"(holding videos/ and lists/)", path=lists)
    classes, train, test = S.read_ucf101_split(lists, split)
    return classes, {"train": train, "test": test}, _check_root(root / "videos")


def _class_folders(index: _DirIndex, base: Path, root: Path, lists_dir=None) -> list[str]:
    """The class folders of a folder dataset: every sub-folder of ``base``, each holding videos.

    A sub-folder without videos is refused rather than counted as a class with no examples: it
    usually means the root points one level too high (``sdtl synth`` output read as ``folder`` gave the
    classes lists, unlabelled and videos)."""
    classes = index.subdirs(base)
    if lists_dir is not None:  # split lists kept inside the root are not a class
        lists = Path(lists_dir).expanduser()
        classes = [c for c in classes if not (lists.is_dir() and (base / c).resolve() == lists.resolve())]
    if not classes:
        raise DataError(f"{base}: no class sub-folders; a folder dataset is <root>/<class>/<video>", path=base)
    empty = [c for c in classes if not index.videos(base / c)]
    if empty:
        shown = ", ".join(f"{c}/" for c in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        hint = f"point {ROOT_OPTION} at the folder whose sub-folders are the classes, or move these folders out of it"
        if (root / "meta.json").is_file() and (root / "lists" / "classInd.txt").is_file():
            hint = "this looks like `sdtl synth` output: read it as dataset synthetic"
        raise DataError(f"{base}: {len(empty)} of {len(classes)} class folders hold no videos: {shown}; {hint}",
                        path=base)
    return classes


def _folder(root: Path, split: int, lists_dir):
    index = _DirIndex(root)
    subsets = {s.lower(): s for s in index.subdirs(root)}
    if "train" in subsets and "test" in subsets:
        S.check_split(split, (1,), "a folder dataset with train/ and test/")
        classes = _class_folders(index, root / subsets["train"], root)
        by_name = {c: i for i, c in enumerate(classes)}
        out = {}
        for subset in ("train", "test"):
            base = root / subsets[subset]
            entries = []
            for cls in index.subdirs(base):
                if cls not in by_name:
                    raise DataError(f"{base / cls}: class folder not in {root / subsets['train']}; "
                                    f"train/ and test/ need the same class folders", path=base / cls)
                entries += [S.ListEntry(f"{subsets[subset]}/{cls}/{v}", by_name[cls], str(base / cls))
                            for v in index.videos(base / cls)]
            out[subset] = entries
        return classes, out, root
    classes = _class_folders(index, root, root, lists_dir)
    if lists_dir is not None:
        lists = Path(lists_dir).expanduser()
        out = {}
        for subset, name in (("train", f"trainlist{split:02d}.txt"), ("test", f"testlist{split:02d}.txt")):
            file = lists / name
            if not file.is_file():
                raise DataError(f"{file}: split list not found; a folder dataset's lists are "
                                f"trainlist0K.txt / testlist0K.txt with lines '<class>/<video> [label]'", path=file)
            out[subset] = S.label_rows(S.read_path_list(file), classes)
        return classes, out, root
    S.check_split(split, (1,), "a folder dataset without split lists")
    entries = [S.ListEntry(f"{cls}/{v}", label, str(root / cls))
               for label, cls in enumerate(classes) for v in index.videos(root / cls)]
    return classes, {"train": entries, "test": None}, root


def _csv(root: Path, split: int, lists_dir):
    lists = Path(lists_dir).expanduser() if lists_dir is not None else root

    def find(subset):
        names = [f"{subset}{split}.csv", f"{subset}{split}.txt"]
        if split == 1:
            names += [f"{subset}.csv", f"{subset}.txt"]
        for name in names:
            if (lists / name).is_file():
                return lists / name
        return None

    files = {s: find(s) for s in ("train", "test")}
    if not any(files.values()):
        raise DataError(f"{lists}: no train/test list for split {split}; a csv dataset needs "
                        f"{'train.csv / test.csv' if split == 1 else f'train{split}.csv / test{split}.csv'} "
                        f"with lines 'path,label'", path=lists)
    rows = {s: S.read_path_list(f) if f else None for s, f in files.items()}
    if (lists / "classes.txt").is_file():
        classes = S.read_class_names(lists / "classes.txt")
    else:
        classes = S.classes_from_rows([r for rs in rows.values() if rs for r in rs])
    out = {s: S.label_rows(r, classes) if r is not None else None for s, r in rows.items()}
    return classes, out, root


def _kinetics400(root: Path, split: int, lists_dir):
    from sdtl.data.kinetics import read_kinetics

    return read_kinetics(root, split, lists_dir)


#: The dataset builders by name: ``(root, split, lists_dir) -> (classes, {subset: entries}, files_root)``.
BUILDERS = {"ucf101": _ucf101, "hmdb51": _hmdb51, "kinetics400": _kinetics400, "folder": _folder, "csv": _csv,
            "synthetic": _synthetic}


def read_lists(name: str, root, split: int = 1, lists_dir=None):
    """``(classes, {"train": entries, "test": entries or None}, files_root)``: parse the lists only."""
    if name not in BUILDERS:
        raise UserError(f"dataset {name!r}: unknown; use one of {', '.join(BUILDERS)}")
    return BUILDERS[name](_check_root(root), split, lists_dir)


def list_records(name: str, root, split: int = 1, subset: str = "train", lists_dir=None,
                 on_missing: str = "error") -> tuple[list[VideoRecord], list[str]]:
    """``(records, classes)`` of one subset of a dataset, from its lists and directory listings only."""
    if subset not in ("train", "test"):
        raise UserError(f"subset {subset!r}: use 'train' or 'test'")
    classes, subsets, files_root = read_lists(name, root, split, lists_dir)
    root = Path(root).expanduser()
    entries = subsets.get(subset)
    if entries is None:
        if name == "kinetics400":
            from sdtl.data.kinetics import CSV_SHOWN, KINETICS_NAMES, VIDEO_DIRS

            raise DataError(f"{root}: no {subset} set ({KINETICS_NAMES[subset]}): neither {CSV_SHOWN[subset]} in "
                            f"data.lists_dir or {root / 'annotations'}, nor class folders in "
                            f"{root / VIDEO_DIRS[subset][0]}", path=root)
        raise DataError(f"{root}: this {name} dataset has no {subset} list; add split lists "
                        f"(data.lists_dir) or train/ and test/ folders", path=root)
    if not entries:
        raise DataError(f"{root}: the {subset} list of this {name} dataset is empty (split {split})", path=root)
    records = _resolve(files_root, entries, on_missing, subset, dataset=name)
    return records, classes


def build_dataset(name: str, root, split: int = 1, subset: str = "train", lists_dir=None,
                  on_missing: str = "error", **clip_kwargs) -> "VideoClipDataset":
    """:func:`list_records` + :class:`VideoClipDataset` (``mode`` defaults to ``subset``)."""
    records, classes = list_records(name, root, split, subset, lists_dir, on_missing)
    clip_kwargs.setdefault("mode", subset)
    return VideoClipDataset(records, classes, **clip_kwargs)


# --------------------------------------------------------------------------- the dataset

class EpochSampler(torch.utils.data.Sampler):
    """Wraps an index sampler with ``set_epoch`` (e.g. ``DistributedSampler``) and yields
    ``(epoch, index)`` pairs, so persistent DataLoader workers draw each epoch's own augmentation.

    :meth:`skip` drops the first ``n`` indices of the next pass: a run resumed inside an epoch
    continues that epoch's sample order where it stopped."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def skip(self, n: int) -> None:
        self._skip = int(n)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        return ((self.epoch, int(i)) for k, i in enumerate(self.sampler) if k >= skip)

    def __len__(self) -> int:
        return len(self.sampler)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one sample: a hash of ``(seed, epoch, index)``, independent of worker layout."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


#: Undecodable videos an item replaces in a row before it gives up (no endless retry loops): an item
#: tries at most ``MAX_REPLACEMENTS + 1`` videos. The one retry limit of every clip dataset.
MAX_REPLACEMENTS = 10

#: The ``label`` of an item whose video has no label and whose sampler makes no target.
NO_LABEL = -1


class ClipDataset(torch.utils.data.Dataset):
    """Videos + a clip sampler -> items: the one video dataset behind supervised training, evaluation,
    pretext tasks and two-clip sampling (as pytorchvideo's ``LabeledVideoDataset(paths, clip_sampler)``).

    ``clip_sampler`` (a :class:`~sdtl.data.sampling.ClipSampler`) decides which clips an item cuts and
    how they are augmented; this class owns the rest, once for every sampler:

    * the item's generator ``sample_generator(seed, epoch, index)``: every random draw of the item
      comes from it, in the order *draw clips -> (replacement video -> draw clips)* -> augment;
    * decoding all of an item's clips in one pass over the video;
    * undecodable videos: replaced by another random video, up to :data:`MAX_REPLACEMENTS` in a row,
      each one reported in the item's ``failed`` list as ``(path, reason)`` (samplers with
      ``replaces_failed = False`` give the sampler's empty item instead); ``skip_corrupt=False`` raises
      :class:`VideoDecodeError`;
    * the item: ``{"video", "label", "video_index", "clip_index", "failed"}``; ``label`` is the
      sampler's target if it makes one (pretext tasks: unlabelled pools need no ``labels``), else
      ``labels[video_index]``, else :data:`NO_LABEL`.

    Call :meth:`set_epoch` before iterating each epoch, or index with ``(epoch, i)`` pairs
    (:class:`EpochSampler` does: persistent DataLoader workers never see ``set_epoch``).
    ``probe_index``: the run's ``video_index.jsonl`` (see :class:`sdtl.data.video_io.ProbeCache`); or
    assign ``probe_cache`` directly.
    """

    #: the retry limit (:data:`MAX_REPLACEMENTS`), kept as an attribute for existing callers
    max_replacements = MAX_REPLACEMENTS

    def __init__(self, paths: list, clip_sampler: ClipSampler, labels: list[int] | None = None,
                 backend: str = "auto", seed: int = 0, skip_corrupt: bool = True, probe_index=None):
        if not isinstance(clip_sampler, ClipSampler):
            raise TypeError(f"clip_sampler must be a sdtl.data.sampling.ClipSampler, got {type(clip_sampler).__name__}")
        if not paths:
            raise DataError("empty dataset: no videos to load; check the dataset root")
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} videos")
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.clip_sampler = clip_sampler
        self.backend = resolve_backend(backend)  # resolved once here, so every worker uses the same one
        # What the probe learned about each file, shared by the workers of every epoch through the
        # run's index file (None: each process remembers only its own probes).
        self.probe_cache = ProbeCache(probe_index) if probe_index is not None else None
        # DataLoader workers are forked from this process every epoch: import torchvision's transforms
        # here, once, rather than in each worker of each epoch (~1.5 s of CPU per worker here).
        _load_transforms()
        self.seed = int(seed)
        self.skip_corrupt = skip_corrupt
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        epoch = self.epoch
        if isinstance(index, tuple):  # (epoch, index) from EpochSampler: exact with persistent workers
            epoch, index = index
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.paths)} videos")
        generator = sample_generator(self.seed, epoch, index)
        sampler = self.clip_sampler
        failed = []
        for _ in range(self.max_replacements + 1):
            path = self.paths[index]
            try:
                with open_video(path, self.backend, self.probe_cache) as reader:
                    drawn = sampler.draw(reader.num_frames, generator)
                    frames = reader.get_frames([i for clip in drawn.clips for i in clip])  # one pass for all clips
                break
            except VideoDecodeError as exc:
                if not self.skip_corrupt:
                    raise
                failed.append((str(path), exc.reason))
                if not sampler.replaces_failed:
                    return self._item(index, sampler.empty(), None, failed)
                index = int(torch.randint(0, len(self.paths), (1,), generator=generator))
        else:
            raise DataError(f"{len(failed)} videos in a row could not be decoded (last: {failed[-1][0]}: "
                            f"{failed[-1][1]}); run `sdtl data check --decode` on this dataset", path=failed[-1][0])
        clips = list(torch.split(frames, [len(clip) for clip in drawn.clips]))
        return self._item(index, sampler.views(clips, generator), drawn.target, failed)

    def _item(self, index: int, views: dict, target, failed: list) -> dict:
        if target is None:
            target = self.labels[index] if self.labels is not None else NO_LABEL
        extra = {k: v for k, v in views.items() if k not in ("video", "clip_index")}
        return {"video": views["video"], "label": target, "video_index": index, "clip_index": views["clip_index"],
                **extra, "failed": failed}


class VideoClipDataset(ClipDataset):
    """Clips of labelled videos: a :class:`ClipDataset` of ``records`` with the supervised sampler of
    ``mode`` (or the ``clip_sampler`` given).

    Train item (``mode="train"``, :class:`~sdtl.data.sampling.RandomClipSampler`)::

        {"video": float[3, T, S, S], "label": int, "video_index": int, "clip_index": 0,
         "failed": [(path, reason), ...]}   # undecodable videos replaced by another random video

    Test item (``mode="test"``, :class:`~sdtl.data.sampling.UniformClipsSampler`)::

        {"video": float[N*crops, 3, T, S, S], "label": int, "video_index": int,
         "clip_index": long[N*crops], "failed": [...]}   # clip-major: view k = clip k // crops

    A test video that cannot be decoded gives 0 clips and one ``failed`` entry (or raises
    :class:`VideoDecodeError` with ``skip_corrupt=False``); refuse or report them with
    :func:`sdtl.data.corrupt.check_failures`.

    Every random choice of item ``i`` comes from ``sample_generator(seed, epoch, i)``: the same
    clips and crops whatever the number of workers, and a resumed run sees exactly the batches it
    would have seen. Call :meth:`set_epoch` before iterating each epoch, or index with
    ``(epoch, i)`` pairs (:class:`EpochSampler` does): persistent DataLoader workers keep their own
    copy of the dataset and never see ``set_epoch``, but they do see the epoch in the index.

    ``probe_index``: a file (the run's ``video_index.jsonl``) where the workers record what probing
    each video taught them (frame count, seekable or not), so that every video is probed once per run
    instead of once per clip; see :class:`sdtl.data.video_io.ProbeCache`.
    """

    def __init__(self, records: list[VideoRecord], classes: list[str], mode: str = "train", clip_len: int = 16,
                 stride: int = 1, num_clips: int = 10, crops: int = 1, size: int = 112, backend: str = "auto",
                 seed: int = 0, skip_corrupt: bool = True, crop_area: tuple[float, float] = (0.25, 1.0),
                 probe_index=None, clip_sampler: ClipSampler | None = None, norm=None):
        if mode not in ("train", "test"):
            raise UserError(f"mode {mode!r}: use 'train' or 'test'")
        if not records:
            raise DataError("empty dataset: no videos to load; check the root and the split lists")
        if not classes:
            raise DataError("dataset without classes; check the split lists")
        for r in records:
            if not isinstance(r.label, (int, np.integer)) or not 0 <= r.label < len(classes):
                raise DataError(f"{r.path}: label {r.label!r} out of range 0..{len(classes) - 1} "
                                f"({len(classes)} classes); fix the list that names {r.name}", path=r.path)
        for key, value in (("clip_len", clip_len), ("stride", stride), ("num_clips", num_clips), ("size", size)):
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{key}={value!r}: must be a positive integer")
        if crops not in (1, 3):
            raise UserError(f"crops={crops!r}: use 1 (centre) or 3 (three crops along the long side)")
        if not (len(crop_area) == 2 and 0 < crop_area[0] <= crop_area[1] <= 1):
            raise UserError(f"crop_area={list(crop_area)}: need [min, max] with 0 < min <= max <= 1 "
                            f"(share of the frame area a training crop covers)")
        self.records = list(records)
        self.classes = list(classes)
        self.mode = mode
        self.clip_len, self.stride, self.num_clips, self.crops, self.size = clip_len, stride, num_clips, crops, size
        self.crop_area = (float(crop_area[0]), float(crop_area[1]))
        if clip_sampler is None:
            clip_sampler = (RandomClipSampler(clip_len, stride, size, self.crop_area, norm) if mode == "train" else
                            UniformClipsSampler(clip_len, stride, num_clips, size, crops, norm))
        super().__init__([r.path for r in self.records], clip_sampler, labels=[r.label for r in self.records],
                         backend=backend, seed=seed, skip_corrupt=skip_corrupt, probe_index=probe_index)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def collate_clips(batch: list[dict]) -> dict:
    """Items with an int ``clip_index`` (one sample per video) stack: train items to ``[B,3,T,S,S]``,
    two-clip items to ``[B,2,3,T,S,S]``. Test items (a ``clip_index`` per view) concatenate their clips
    to ``[sum N_i, 3,T,S,S]`` with ``label`` and ``video_index`` repeated per clip. ``failed`` lists
    are concatenated."""
    failed = [f for item in batch for f in item["failed"]]
    if not torch.is_tensor(batch[0]["clip_index"]):
        return {"video": torch.stack([b["video"] for b in batch]),
                "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
                "video_index": torch.tensor([b["video_index"] for b in batch], dtype=torch.long),
                "clip_index": torch.tensor([b["clip_index"] for b in batch], dtype=torch.long),
                "failed": failed}
    counts = [b["video"].shape[0] for b in batch]
    return {"video": torch.cat([b["video"] for b in batch]),
            "label": torch.tensor([b["label"] for b, n in zip(batch, counts) for _ in range(n)], dtype=torch.long),
            "video_index": torch.tensor([b["video_index"] for b, n in zip(batch, counts) for _ in range(n)],
                                        dtype=torch.long),
            "clip_index": torch.cat([b["clip_index"] for b in batch]).long(),
            "failed": failed}


# --------------------------------------------------------------------------- validation split

_UCF_GROUP = re.compile(r"_g(\d+)_c\d+", re.IGNORECASE)


def ucf101_group(record: VideoRecord) -> str | None:
    """UCF101 group (``gNN``: same actors and scene) of a video, or None if the name has no group."""
    m = _UCF_GROUP.search(Path(record.name).stem)
    return m.group(1) if m else None


def stratified_split(records: list[VideoRecord], fraction: float = 0.1, seed: int = 0,
                     group_key=ucf101_group) -> tuple[list[VideoRecord], list[VideoRecord]]:
    """Hold out ``fraction`` of each class (seeded) for validation: ``(train_records, val_records)``.

    Every class with >= 2 videos (groups) keeps >= 1 in train and gives >= 1 to validation. Videos
    that share a ``group_key`` stay on the same side: UCF101 clips of one group (``_gNN_``) come from
    the same long video, so splitting them would leak near-duplicates into validation. Videos whose key
    is None are their own group; ``group_key=None`` splits video by video. Order is preserved.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"validation fraction {fraction}: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    by_class: dict[int, dict] = {}
    for i, r in enumerate(records):
        key = group_key(r) if group_key is not None else None
        by_class.setdefault(r.label, {}).setdefault(("g", key) if key is not None else ("v", i), []).append(i)
    val = set()
    for label in sorted(by_class):
        groups = list(by_class[label].values())
        if fraction == 0 or len(groups) < 2:
            continue
        target = max(1, round(fraction * sum(len(g) for g in groups)))
        taken, chosen = 0, 0
        for g in rng.permutation(len(groups)):
            if taken >= target or chosen == len(groups) - 1:  # keep >= 1 group for training
                break
            size = len(groups[g])
            if taken and taken + size - target > target - taken:  # would overshoot more than stopping
                continue
            val.update(groups[g])
            taken, chosen = taken + size, chosen + 1
    train = [r for i, r in enumerate(records) if i not in val]
    held = [r for i, r in enumerate(records) if i in val]
    return train, held
