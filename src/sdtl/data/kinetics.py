"""Kinetics-400 (``data.dataset: kinetics400``): the official CSV annotations and the usual download layouts.

Parsing and directory listings only (no decoding, no per-file ``stat``); :func:`scan` is what
:func:`sdtl.data.datasets.list_records` and ``sdtl data check`` build on. Torch is not imported here.

**Subsets.** sdtl's ``train`` is Kinetics' train set and sdtl's ``test`` is Kinetics' *validate* set
(``validate.csv``): the original release published no labels for its test set, and published Kinetics
numbers are validation-set numbers. ``test.csv`` is never read. ``data.val_fraction`` is held out of the
train set as for every dataset. Kinetics has one official split: ``data.split`` must be 1.

**Annotations** (layout A): ``train.csv`` and ``validate.csv`` (also ``val.csv``, and with a
``kinetics_`` / ``kinetics400_`` / ``kinetics-400_`` / ``kinetics_400_`` prefix) in ``data.lists_dir``,
else ``<root>/annotations/``, else ``<root>/``. Header ``label,youtube_id,time_start,time_end,split``
(extra columns such as ``is_cc`` are ignored; columns are found by name). Labels may be quoted and hold
spaces, parentheses and apostrophes (``"air drumming"``, ``passing American football (in game)``);
surrounding quotes and spaces are stripped. Times are whole seconds. A row names the file
``{youtube_id}_{time_start:06d}_{time_end:06d}.mp4``. Rows naming the same file twice count once.

**Videos.** Looked for by file name, with any suffix of :data:`sdtl.data.videos.VIDEO_EXTENSIONS`
(the official ``.mp4``, or re-encoded ``.mkv`` / ``.webm`` / ...; ``.mp4`` wins a tie), and as a fallback
named ``{youtube_id}.<suffix>``. Train videos are looked for in the first of ``train/``,
``videos_train/``, ``train_256/`` that exists under the root, validate videos in the first of ``val/``,
``validate/``, ``validation/``, ``valid/``, ``videos_val/``, ``val_256/`` (folder names in any case);
in that folder and in each of its sub-folders (one level: flat downloads and class-folder downloads
alike, whatever the class folders are called -- the CSV gives the label). When neither subset folder
exists, both are looked for in the root itself and its sub-folders. Partial downloads (``.part``,
``.ytdl``) are not videos and count as missing.

**Class folders only** (layout B, no CSV for a subset): ``<subset folder>/<class>/<video>``; every
video of a class folder is listed (nothing can be missing). A folder name is matched to a label by
:func:`label_key` (case, spaces vs underscores, punctuation ignored: ``air_drumming`` is ``air
drumming``); without any CSV the class names are the folder names with ``_`` read as a space (Kinetics
labels have none), so both layouts give the same class list for the common downloaders. Videos lying
directly in a subset folder cannot be labelled without a CSV and are left out (logged).

**Classes**: the labels of ``train.csv`` and ``validate.csv`` (or of the class folders), sorted: the
400 labels in the order every Kinetics-400 model uses.

**Missing videos**: a large share of Kinetics is no longer on YouTube. ``data.on_missing: error`` (the
default) stops with the number missing and suggests ``data.on_missing=skip``, which trains and evaluates
on the videos found and logs how many were left out. ``sdtl data check --dataset kinetics400`` reports,
per subset, listed / found / missing (with examples) / unreadable.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdtl.data import splits as S
from sdtl.data.videos import VIDEO_EXTENSIONS, scan_folder
from sdtl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "kinetics400"

#: sdtl subset -> what Kinetics calls it (for messages)
KINETICS_NAMES = {"train": "Kinetics train", "test": "Kinetics validate"}

#: Annotation file names per sdtl subset, in the order tried.
_CSV_STEMS = {"train": ("train",), "test": ("validate", "val")}
_CSV_PREFIXES = ("", "kinetics_", "kinetics400_", "kinetics-400_", "kinetics_400_")
CSV_NAMES = {s: tuple(f"{p}{stem}.csv" for stem in stems for p in _CSV_PREFIXES) for s, stems in _CSV_STEMS.items()}
CSV_SHOWN = {"train": "train.csv", "test": "validate.csv (or val.csv)"}  # for messages

#: Video folders per sdtl subset (under the root, any case), in the order tried.
VIDEO_DIRS = {"train": ("train", "videos_train", "train_256"),
              "test": ("val", "validate", "validation", "valid", "videos_val", "val_256")}

_REQUIRED = ("youtube_id", "time_start", "time_end")
HEADER = "label,youtube_id,time_start,time_end,split"


def label_key(name: str) -> str:
    """A label or folder name reduced for matching: lower case, every run of other characters than
    letters and digits one ``_`` (``"Air drumming"``, ``air_drumming`` and ``passing American football
    (in game)`` / ``passing_american_football_-in_game-`` meet)."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().strip("\"'").lower()).strip("_")


def clip_stem(youtube_id: str, start: int, end: int) -> str:
    """The official file name without suffix: ``{youtube_id}_{start:06d}_{end:06d}``."""
    return f"{youtube_id}_{start:06d}_{end:06d}"


@dataclass(frozen=True)
class KineticsRow:
    label: str
    youtube_id: str
    start: int
    end: int
    where: str  # "file:line"
    stem: str  # the official file name without suffix (clip_stem)


def _clean_label(text: str) -> str:
    label = text.strip()
    while len(label) >= 2 and label[0] == label[-1] and label[0] in "\"'":
        label = label[1:-1].strip()
    return " ".join(label.split())


def _seconds(text: str, where: str, column: str, file) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0 and value.is_integer()):
        raise DataError(f"{where}: {column} {text!r} is not a whole number of seconds >= 0; Kinetics rows are "
                        f"'{HEADER}'", path=file)
    return int(value)


_CSV_CACHE: dict[str, tuple[tuple, list]] = {}  # path -> ((mtime_ns, size), rows): the last read of each file


def read_kinetics_csv(file) -> list[KineticsRow]:
    """The labelled rows of an official Kinetics CSV (``train.csv``, ``validate.csv``); the header names
    the columns (``label,youtube_id,time_start,time_end,split``, extra columns ignored).

    A file read before and unchanged since (same modification time and size) is not parsed again:
    listing the train and the test set reads both files (the classes come from both)."""
    try:
        st = os.stat(file)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    cached = _CSV_CACHE.get(str(file))
    if stamp is not None and cached is not None and cached[0] == stamp:
        return list(cached[1])
    rows = _parse_kinetics_csv(file)
    if stamp is not None:
        _CSV_CACHE[str(file)] = (stamp, rows)
    return list(rows)


def _parse_kinetics_csv(file) -> list[KineticsRow]:
    lines = S._lines(Path(file))
    if not lines:
        raise DataError(f"{file}: empty annotation file; expected the header '{HEADER}' and one row per clip",
                        path=file)
    n0, head = lines[0]
    columns = [c.strip().strip("\"'").lower() for c in next(csv.reader([head]))]
    absent = [c for c in (*_REQUIRED, "label") if c not in columns]
    if absent:
        raise DataError(f"{file}:{n0}: header {head!r} lacks {', '.join(absent)}; a Kinetics annotation file "
                        f"starts with '{HEADER}' (the test set's file has no labels and is not used)", path=file)
    at = {c: columns.index(c) for c in (*_REQUIRED, "label")}
    width = max(at.values()) + 1
    rows, seen, duplicates = [], set(), 0
    src = str(file)
    # one reader over all lines: no Kinetics field spans lines, so row k is line k
    for (n, line), cells in zip(lines[1:], csv.reader(line for _, line in lines[1:])):
        where = f"{src}:{n}"
        if len(cells) < width:
            raise DataError(f"{where}: {len(cells)} columns, expected {len(columns)} ({', '.join(columns)}); "
                            f"got {line!r}", path=file)
        label = _clean_label(cells[at["label"]])
        youtube_id = cells[at["youtube_id"]].strip().strip("\"'")
        if not label or not youtube_id:
            raise DataError(f"{where}: empty {'label' if not label else 'youtube_id'}; got {line!r}", path=file)
        start = _seconds(cells[at["time_start"]], where, "time_start", file)
        end = _seconds(cells[at["time_end"]], where, "time_end", file)
        row = KineticsRow(label, youtube_id, start, end, where, clip_stem(youtube_id, start, end))
        if row.stem in seen:
            duplicates += 1
            continue
        seen.add(row.stem)
        rows.append(row)
    if duplicates:
        log.debug("%s: %d duplicate rows (a clip listed twice), counted once", file, duplicates)
    return rows


# --------------------------------------------------------------------------- finding things

def _scandir(folder: str) -> tuple[list[str], list[str]]:
    """``(sub-folders, video files)`` of a folder, sorted, hidden folders left out; empty if unreadable."""
    dirs, files = scan_folder(folder)
    return (sorted(d for d in dirs if not d.startswith(".")),
            sorted(f for f in files if f.lower().endswith(VIDEO_EXTENSIONS)))


def find_annotations(root: Path, lists_dir=None) -> tuple[Path, dict[str, Path | None]]:
    """``(folder searched, {"train": csv or None, "test": csv or None})``: ``lists_dir``, else
    ``root/annotations`` when it exists, else the root."""
    if lists_dir is not None:
        folder = Path(lists_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"{folder}: data.lists_dir is not a folder; give the folder holding the Kinetics "
                            f"annotations (train.csv, validate.csv)", path=folder)
    else:
        folder = next((root / d for d in _scandir(str(root))[0] if d.lower() == "annotations"), root)
    try:
        present = {name.lower(): name for name in os.listdir(folder)}
    except OSError:
        present = {}
    found = {}
    for subset, names in CSV_NAMES.items():
        name = next((present[n] for n in names if n in present), None)
        found[subset] = folder / name if name is not None and (folder / name).is_file() else None
    return folder, found


def _subset_dirs(root: Path) -> dict[str, str | None]:
    """The video folder of each subset (its real name under the root), or None."""
    dirs = {d.lower(): d for d in _scandir(str(root))[0]}
    return {s: next((dirs[n] for n in names if n in dirs), None) for s, names in VIDEO_DIRS.items()}


def index_videos(root: Path, rel: str) -> dict[str, str]:
    """Video file stem -> path relative to ``root`` for the videos in ``root/rel`` and in its sub-folders
    (one level). A stem found twice keeps the ``.mp4``, else the first in sorted order (flat first)."""
    base = os.path.join(str(root), rel) if rel else str(root)
    prefix = f"{rel}/" if rel else ""
    dirs, files = _scandir(base)
    found: dict[str, str] = {}

    def add(names, sub):
        for name in names:
            stem, ext = os.path.splitext(name)
            old = found.get(stem)
            if old is None or (ext.lower() == ".mp4" and not old.lower().endswith(".mp4")):
                found[stem] = f"{sub}{name}"

    add(files, prefix)
    for d in dirs:
        add(_scandir(os.path.join(base, d))[1], f"{prefix}{d}/")
    return found


# --------------------------------------------------------------------------- the layout

@dataclass
class KineticsLayout:
    """What :func:`scan` found: classes, list entries per subset (``None``: no such subset), and where
    each subset came from (for ``sdtl data check``)."""

    root: Path
    classes: list[str]
    entries: dict[str, list | None]
    sources: dict[str, str] = field(default_factory=dict)  # subset -> "annotations/train.csv" / "class folders ..."
    video_dirs: dict[str, str | None] = field(default_factory=dict)  # subset -> folder searched, relative
    annotations_dir: Path | None = None


def _looks_like_kinetics(folder: Path) -> bool:
    """Whether ``folder`` holds Kinetics annotations or a train/ or val/ folder."""
    return any(_subset_dirs(folder).values()) or any(find_annotations(folder)[1].values())


def check_split(split) -> int:
    if isinstance(split, str) and split.strip().isdigit():
        split = int(split)
    if split != 1 or isinstance(split, bool):
        raise ConfigError("data.split", f"{split!r}: Kinetics-400 has one official split (train / validate)",
                          "use data.split=1 (the default)")
    return 1


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def scan(root: Path, lists_dir=None) -> KineticsLayout:
    """Read the annotations and list the video folders of a Kinetics-400 root (see the module docstring)."""
    root = Path(root)
    csv_dir, csvs = find_annotations(root, lists_dir)
    dirs = _subset_dirs(root)
    rows = {s: read_kinetics_csv(f) if f is not None else None for s, f in csvs.items()}
    folder_classes = {}  # subset -> {folder name: [videos]} for subsets without a CSV
    loose = {}
    for subset in ("train", "test"):
        if rows[subset] is None and dirs[subset] is not None:
            sub, files = _scandir(str(root / dirs[subset]))
            if sub:
                folder_classes[subset] = {d: _scandir(str(root / dirs[subset] / d))[1] for d in sub}
                loose[subset] = files
            elif files:
                raise DataError(f"{root / dirs[subset]}: {len(files)} videos but no class folders, and no "
                                f"{CSV_SHOWN[subset]} in {csv_dir} to label them; put the Kinetics annotations "
                                f"there (or in data.lists_dir), or the videos in class folders", path=root / dirs[subset])
    if not any(r is not None for r in rows.values()) and not folder_classes:
        sub = _scandir(str(root))[0]
        holds = ", ".join(f"{d}/" for d in sub[:8]) or "no folders"
        # one level down, a folder that looks like a Kinetics root is the likely data.root
        below = next((root / d for d in sub[:50] if _looks_like_kinetics(root / d)), None)
        hint = f"did you mean the root {below} (data.root)?" if below is not None else ROOT_HINT
        raise DataError(f"{root}: no Kinetics annotations (train.csv / validate.csv in "
                        f"{'data.lists_dir ' + str(csv_dir) if lists_dir is not None else 'the root or root/annotations/'}"
                        f") and no class folders in train/ or val/; it holds {holds}; {hint}", path=root)

    # Classes: CSV labels if there is any CSV, else the class folders of train/ (of val/ when there is
    # no train/), with '_' read as a space; the other subset's folders must be among them.
    labels = sorted({r.label for rs in rows.values() if rs for r in rs})
    if labels:
        classes = labels
    else:
        names = {}
        for d in folder_classes.get("train", folder_classes.get("test", {})):
            names.setdefault(label_key(d), d.replace("_", " ").strip())
        classes = sorted(names.values())
    by_key: dict[str, int] = {}
    for i, c in enumerate(classes):
        by_key.setdefault(label_key(c), i)
    by_label = {c: i for i, c in enumerate(classes)}

    entries: dict[str, list | None] = {}
    sources: dict[str, str] = {}
    searched: dict[str, str | None] = {}
    for subset in ("train", "test"):
        rel = dirs[subset]
        if rows[subset] is not None:
            if rel is None and not any(dirs.values()):
                rel = ""  # neither train/ nor val/: the videos lie in the root (or its class folders)
            index = index_videos(root, rel) if rel is not None else {}
            shown = rel if rel is not None else VIDEO_DIRS[subset][0]
            class_dirs = {label_key(d): d for d in _scandir(str(root / rel))[0]} if rel is not None else {}
            out = []
            for r in rows[subset]:
                found = index.get(r.stem) or index.get(r.youtube_id)
                if found is None:  # where it was expected: the class folder when the download has them
                    folder = class_dirs.get(label_key(r.label)) if class_dirs else None
                    parts = [p for p in (shown, folder) if p]
                    found = "/".join([*parts, f"{r.stem}.mp4"])
                out.append(S.ListEntry(found, by_label[r.label], r.where))
            entries[subset] = out
            sources[subset] = _rel(csvs[subset], root)
            searched[subset] = shown or "."
        elif subset in folder_classes:
            out = []
            for d, videos in folder_classes[subset].items():
                label = by_key.get(label_key(d))
                if label is None:
                    known = f"the labels of {', '.join(_rel(f, root) for f in csvs.values() if f)}" if labels else \
                        "the train class folders"
                    raise DataError(f"{root / rel / d}: class folder {d!r} matches none of {known}; rename it to "
                                    f"the Kinetics label (spaces or underscores both work)", path=root / rel / d)
                out += [S.ListEntry(f"{rel}/{d}/{v}", label, str(root / rel / d)) for v in videos]
            if loose.get(subset):
                log.warning("%s: %d videos outside the class folders are left out (no %s to label them)",
                            root / rel, len(loose[subset]), CSV_SHOWN[subset])
            entries[subset] = out
            sources[subset] = f"class folders in {rel}/"
            searched[subset] = rel
        else:
            entries[subset] = None
            searched[subset] = None
    return KineticsLayout(root, classes, entries, sources, searched, csv_dir)


ROOT_HINT = ("data.root must be the Kinetics folder holding train/ and val/ (flat or in class folders), with the "
             "annotations in root/annotations/ or data.lists_dir")


def read_kinetics(root: Path, split, lists_dir):
    """The ``kinetics400`` builder of :data:`sdtl.data.datasets.BUILDERS`:
    ``(classes, {"train": entries, "test": entries or None}, root)``."""
    check_split(split)
    layout = scan(root, lists_dir)
    return layout.classes, layout.entries, root


def missing_message(root, subset: str, n_missing: int, n_listed: int, first: str, source: str) -> str:
    """The message for listed Kinetics videos that are not on disk (``_resolve`` adds the hint)."""
    share = 100.0 * n_missing / max(n_listed, 1)
    return (f"{root}: {n_missing} of {n_listed} {subset} videos ({KINETICS_NAMES.get(subset, subset)}) named in "
            f"{source} are missing ({share:.1f}%; first: {first})")


def nothing_found_message(root, subset: str, n_listed: int, example: str, source: str) -> str:
    holds = ", ".join(f"{d}/" for d in _scandir(str(root))[0][:8]) or "no folders"
    folder = f"{example.split('/')[0]}/" if "/" in example else "the root"
    return (f"{root}: none of the {n_listed} {subset} videos ({KINETICS_NAMES.get(subset, subset)}) named in {source} "
            f"is there (e.g. {example}; looked for <youtube_id>_<start:06d>_<end:06d> with any video suffix in "
            f"{folder} and its sub-folders); {root} holds {holds}; {ROOT_HINT}")
