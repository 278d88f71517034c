"""Helpers for the tests: placeholder dataset trees, small videos whose frames can be told apart, a free port."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sdtl.data import splits as S


def ucf101_placeholder_tree(root: Path, ext: str = ".avi") -> Path:
    """Every video of the official UCF101 lists (13,320) as an empty file under ``root``."""
    lists = S.shipped_lists("ucfTrainTestlist")
    names = set()
    for k in (1, 2, 3):
        for kind in ("trainlist", "testlist"):
            for line in lists.joinpath(f"{kind}{k:02d}.txt").read_text().splitlines():
                if line.strip():
                    names.add(line.split()[0])
    for name in names:
        path = root / Path(name).with_suffix(ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return root


def hmdb51_placeholder_tree(root: Path, ext: str = ".avi") -> Path:
    lists = S.shipped_lists("testTrainMulti_7030_splits")
    for f in lists.iterdir():
        if not f.name.endswith("_test_split1.txt"):
            continue
        cls = f.name[: -len("_test_split1.txt")]
        (root / cls).mkdir(parents=True, exist_ok=True)
        for line in f.read_text().splitlines():
            if line.strip():
                (root / cls / Path(line.split()[0]).with_suffix(ext)).touch()
    return root


def numbered_frames(num_frames: int, height: int = 64, width: int = 96, offset: int = 0) -> np.ndarray:
    """Frames whose index (+offset, 8 bits) is written as black/white blocks in the top half, plus a grey
    level in the bottom half: :func:`read_number` recovers the index even after lossy coding."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    bw = width // 8
    for t in range(num_frames):
        v = t + offset
        for b in range(8):
            frames[t, : height // 2, b * bw:(b + 1) * bw] = 255 if (v >> b) & 1 else 0
        frames[t, height // 2:] = (v * 7) % 256
    return frames


def read_number(frame) -> int:
    frame = np.asarray(frame)
    h, w = frame.shape[:2]
    bw = w // 8
    return sum(1 << b for b in range(8) if frame[4: h // 2 - 4, b * bw + 2:(b + 1) * bw - 2].mean() > 127)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for torchrun's --master_port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
