"""Finding videos: the file suffixes sdtl reads, and the unlabelled pool of a pre-training run."""
from __future__ import annotations

import os
from pathlib import Path

from sdtl.errors import ConfigError, DataError

# Every suffix sdtl reads as a video, for labelled folders and unlabelled pools alike.
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".ogv", ".3gp", ".ts", ".mts", ".vob")


def scan_folder(folder: str) -> tuple[list[str], list[str]]:
    """``(sub-folder names, other entry names)`` of ``folder`` in ``os.scandir`` order, one pass; an entry
    whose type cannot be read is left out, an unreadable folder gives two empty lists."""
    dirs, files = [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    continue
                (dirs if is_dir else files).append(entry.name)
    except OSError:
        pass
    return dirs, files


def find_videos(root: str, list_file: str | None) -> list[Path]:
    """The unlabelled pool: ``root/unlabelled`` (sdtl synth layout), a list file, or every video under root.

    ``root`` and ``list_file`` are the config keys ``data.root`` and ``data.list_file``; a bad value
    raises :class:`~sdtl.errors.ConfigError` naming the key."""
    base = Path(root)
    if not root or not base.is_dir():
        raise ConfigError("data.root", f"{root!r} is not a folder",
                          "point it at unlabelled videos (e.g. the folder `sdtl synth` wrote)")
    if list_file is None and (base / "lists" / "unlabelled.txt").exists():
        list_file = str(base / "lists" / "unlabelled.txt")
    if list_file is not None:
        lf = Path(list_file)
        if not lf.is_file():
            raise ConfigError("data.list_file", f"{list_file} not found", "give a text file of video paths")
        paths, missing = [], []
        for n, line in enumerate(lf.read_text().splitlines(), start=1):
            name = line.strip().split()[0] if line.strip() else ""
            if not name:
                continue
            p = base / name
            (paths if p.exists() else missing).append(p)
        if missing:
            raise DataError(f"data.list_file {list_file}: {len(missing)} listed videos are missing under {root} "
                            f"(first: {', '.join(str(m) for m in missing[:3])}); fix the list or the root",
                            path=list_file)
    else:
        paths = sorted(p for p in base.rglob("*") if p.name.lower().endswith(VIDEO_EXTENSIONS) and p.is_file())
    if not paths:
        raise ConfigError("data.root", f"no videos found under {root} ({', '.join(VIDEO_EXTENSIONS)})",
                          "check the path")
    return paths
