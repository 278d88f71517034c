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


def clip_tree(root: Path):
    """4 good videos (two classes, one shorter than a 16-frame clip; H.264 and MPEG-4, MP4 and AVI) and
    3 undecodable ones (empty, text, truncated): ``(good_records, bad_records)``."""
    from sdtl.data.datasets import VideoRecord
    from sdtl.data.video_io import write_video

    good = []
    for i, (n, codec, ext) in enumerate([(40, "libx264", ".mp4"), (30, "mpeg4", ".avi"), (10, "mpeg4", ".avi"),
                                         (36, "libx264", ".avi")]):
        path = write_video(root / f"good{i}{ext}", numbered_frames(n, 32, 48, offset=100 * (i % 2)),
                           codec=codec, gop=8)
        good.append(VideoRecord(path, i % 2, path.name))
    (root / "zero.avi").touch()
    (root / "text.avi").write_text("not a video")
    (root / "trunc.avi").write_bytes(good[1].path.read_bytes()[:200])
    return good, [VideoRecord(root / n, 0, n) for n in ("zero.avi", "text.avi", "trunc.avi")]
