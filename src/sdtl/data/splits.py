"""Parsers for split lists: the official UCF101 / HMDB51 lists, and users' own list files.

Called by :func:`sdtl.data.datasets.list_records`. Parsing only: nothing here touches the videos.
Every parser returns :class:`ListEntry` items (a path relative to the dataset root, a 0-based label,
and ``file:line`` for error messages); matching them to files on disk is the dataset's job.

Formats (verbatim copies of the official lists ship in ``sdtl/data/splits/``; see
``shared/REFERENCE.md`` section 4):

* UCF101 ``ucfTrainTestlist/``: ``classInd.txt`` lines ``1 ApplyEyeMakeup`` (1-based),
  ``trainlist0K.txt`` lines ``ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1``, ``testlist0K.txt`` the
  path only. CRLF line endings. The folder ``HandstandPushups`` holds files ``v_HandStandPushups_*``, so
  the class is always taken from the folder part of the line, never from the file name.
* HMDB51 ``testTrainMulti_7030_splits/<class>_test_split<K>.txt``: lines ``<video>.avi <tag> `` with
  tag 1 = train, 2 = test, 0 = unused (trailing space); classes in alphabetical order.
* user lists (``folder`` and ``csv`` datasets): ``path,label`` or ``path label`` or ``path`` alone
  (label from the first folder of the path); label is a 0-based integer or a class name.
* Kinetics-400's official CSVs (``label,youtube_id,time_start,time_end,split``) are parsed by
  :mod:`sdtl.data.kinetics`, which also finds their files (named by YouTube id and times, not by path).
"""
from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from sdtl.errors import DataError, UserError

OFFICIAL_SPLITS = (1, 2, 3)


@dataclass(frozen=True)
class ListEntry:
    """One line of a split list."""

    relpath: str  # relative to the dataset root, '/'-separated, as written in the list
    label: int  # 0-based class index
    where: str  # "file:line", for messages


def shipped_lists(name: str):
    """The packaged copy of an official list folder (works from an installed wheel, not only a checkout)."""
    return importlib.resources.files("sdtl.data").joinpath("splits", name)


def _lines(file) -> list[tuple[int, str]]:
    """Non-empty lines of a list file, stripped (CRLF and trailing spaces), with 1-based line numbers."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise DataError(f"{file}: list file not found; check the split-lists folder (data.lists_dir) or the "
                        f"dataset root", path=file) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not a UTF-8 text file ({exc.reason}); is this the right list file?",
                        path=file) from exc
    except OSError as exc:
        raise DataError(f"{file}: cannot read the list file ({exc.strerror})", path=file) from exc
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def check_split(split, allowed=OFFICIAL_SPLITS, what: str = "the official lists") -> int:
    if isinstance(split, str) and split.strip().isdigit():
        split = int(split)
    if not isinstance(split, int) or split not in allowed:
        raise UserError(f"split {split!r}: {what} define splits {', '.join(map(str, allowed))}; "
                        f"use split {allowed[0]} (data.split)")
    return split


# --------------------------------------------------------------------------- UCF101

def read_ucf101_classes(lists_dir) -> list[str]:
    """Class names in label order from ``classInd.txt`` (1-based in the file, 0-based here)."""
    file = lists_dir.joinpath("classInd.txt")
    classes: list[str] = []
    for n, line in _lines(file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{file}:{n}: expected '<index> <ClassName>', got {line!r}", path=file)
        if int(parts[0]) != len(classes) + 1:
            raise DataError(f"{file}:{n}: class index {parts[0]} out of order (expected {len(classes) + 1}); "
                            f"classInd.txt must number classes 1, 2, 3, ...", path=file)
        classes.append(parts[1])
    if not classes:
        raise DataError(f"{file}: no classes listed", path=file)
    return classes


def read_ucf101_list(file, classes: list[str]) -> list[ListEntry]:
    """Parse ``trainlist0K.txt`` (``Class/video.avi <1-based label>``) or ``testlist0K.txt`` (path only)."""
    by_name = {c: i for i, c in enumerate(classes)}
    by_lower = {c.lower(): i for i, c in enumerate(classes)}
    entries = []
    src = str(file)
    for n, line in _lines(file):
        parts = line.split()
        if len(parts) > 2:
            raise DataError(f"{file}:{n}: expected '<Class>/<video> [label]', got {line!r}", path=file)
        relpath = parts[0].replace("\\", "/")
        folder = relpath.split("/")[0] if "/" in relpath else None
        label = None
        if folder is not None:
            label = by_name.get(folder, by_lower.get(folder.lower()))
            if label is None:
                raise DataError(f"{file}:{n}: class folder {folder!r} is not in classInd.txt; "
                                f"fix the list or the classInd.txt next to it", path=file)
        if len(parts) == 2:
            if not parts[1].isdigit() or not 1 <= int(parts[1]) <= len(classes):
                raise DataError(f"{file}:{n}: label {parts[1]!r} is not a class index 1..{len(classes)} "
                                f"of classInd.txt", path=file)
            listed = int(parts[1]) - 1
            if label is not None and listed != label:
                raise DataError(f"{file}:{n}: label {parts[1]} ({classes[listed]}) contradicts the folder "
                                f"{folder!r} (class {label + 1}); fix the list", path=file)
            label = listed
        if label is None:
            raise DataError(f"{file}:{n}: {relpath!r} has neither a class folder nor a label", path=file)
        entries.append(ListEntry(relpath, label, f"{src}:{n}"))
    return entries


def read_ucf101_split(lists_dir, split: int) -> tuple[list[str], list[ListEntry], list[ListEntry]]:
    """``(classes, train, test)`` of one UCF101-format split (official lists: split 1, 2 or 3)."""
    classes = read_ucf101_classes(lists_dir)
    train = read_ucf101_list(lists_dir.joinpath(f"trainlist{split:02d}.txt"), classes)
    test = read_ucf101_list(lists_dir.joinpath(f"testlist{split:02d}.txt"), classes)
    return classes, train, test


# --------------------------------------------------------------------------- HMDB51

def read_hmdb51_split(lists_dir, split: int) -> tuple[list[str], list[ListEntry], list[ListEntry]]:
    """``(classes, train, test)`` from ``<class>_test_split<K>.txt`` files (tag 1 train, 2 test, 0 unused)."""
    suffix = f"_test_split{split}.txt"
    try:
        # Sort by class name, not file name: "climb_stairs_test..." sorts before "climb_test..." but
        # "climb" comes before "climb_stairs" (the order of the class folders, as everyone uses).
        files = sorted((f for f in lists_dir.iterdir() if f.name.endswith(suffix)),
                       key=lambda f: f.name[: -len(suffix)])
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DataError(f"{lists_dir}: HMDB51 list folder not found; give the folder holding "
                        f"<class>_test_split<K>.txt files (data.lists_dir)", path=lists_dir) from exc
    if not files:
        raise DataError(f"{lists_dir}: no '*{suffix}' files; HMDB51 lists are named "
                        f"<class>_test_split<K>.txt (testTrainMulti_7030_splits)", path=lists_dir)
    classes = [f.name[: -len(suffix)] for f in files]
    train, test = [], []
    for label, (cls, file) in enumerate(zip(classes, files)):
        src = str(file)
        for n, line in _lines(file):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{file}:{n}: expected '<video>.avi <0|1|2>', got {line!r}", path=file)
            if parts[1] == "0":
                continue
            entry = ListEntry(f"{cls}/{parts[0]}", label, f"{src}:{n}")
            (train if parts[1] == "1" else test).append(entry)
    return classes, train, test


# --------------------------------------------------------------------------- user lists

def read_class_names(file) -> list[str]:
    """One class name per line (``classes.txt``); the line order is the label order."""
    classes = [line for _, line in _lines(file)]
    if len(set(classes)) != len(classes):
        raise DataError(f"{file}: a class name appears twice", path=file)
    return classes


def _split_line(line: str) -> tuple[str, str | None]:
    if "," in line:
        path, _, label = line.rpartition(",")
        return path.strip(), label.strip()
    parts = line.rsplit(None, 1)
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], None)


def read_path_list(file, classes: list[str] | None = None) -> list[tuple[str, str | None, str]]:
    """Raw ``(relpath, label_text or None, "file:line")`` of a user list; a ``path,label`` header is skipped."""
    rows = []
    src = str(file)
    for n, line in _lines(file):
        path, label = _split_line(line)
        if n == 1 and label is not None and label.lower() == "label" and path.lower() in ("path", "video", "file"):
            continue  # header row
        rows.append((path.replace("\\", "/"), label, f"{src}:{n}"))
    return rows


def _file_of(where: str) -> str:
    """The list file of a ``"file:line"`` location."""
    return where.rsplit(":", 1)[0]


def label_rows(rows, classes: list[str]) -> list[ListEntry]:
    """Turn raw rows into entries: label = 0-based index, class name, or (no label) the path's first folder."""
    by_name = {c: i for i, c in enumerate(classes)}
    entries = []
    for relpath, label, where in rows:
        if label is None:
            folder = relpath.split("/")[0] if "/" in relpath else None
            if folder not in by_name:
                raise DataError(f"{where}: {relpath!r} has no label and its folder is not a class; "
                                f"write '<path>,<label>' lines", path=_file_of(where))
            idx = by_name[folder]
        elif re.fullmatch(r"-?\d+", label):
            idx = int(label)
            if not 0 <= idx < len(classes):
                raise DataError(f"{where}: label {idx} out of range 0..{len(classes) - 1} "
                                f"({len(classes)} classes); labels in user lists are 0-based", path=_file_of(where))
        elif label in by_name:
            idx = by_name[label]
        else:
            raise DataError(f"{where}: unknown class {label!r}; known classes: "
                            f"{', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}", path=_file_of(where))
        entries.append(ListEntry(relpath, idx, where))
    return entries


def classes_from_rows(rows) -> list[str]:
    """Class list implied by the labels of user lists: names sorted, or ``0..max`` for integer labels."""
    labels = [label for _, label, _ in rows if label is not None]
    ints = [label for label in labels if re.fullmatch(r"\d+", label)]
    if ints and len(ints) != len(labels):
        where = next(w for _, label, w in rows if label is not None and not re.fullmatch(r"\d+", label))
        raise DataError(f"{where}: mixes class names and integer labels; use one kind, or add a classes.txt",
                        path=_file_of(where))
    if ints:
        return [str(i) for i in range(max(int(x) for x in ints) + 1)]
    names = set(labels) | {p.split("/")[0] for p, label, _ in rows if label is None and "/" in p}
    return sorted(names)


def as_path(lists_dir) -> Path | None:
    return None if lists_dir is None else Path(lists_dir).expanduser()
