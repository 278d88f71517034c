"""Video decoding and writing (placeholder writer; the data layer owner replaces this module)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_video(path, frames, fps: float = 25.0, codec: str = "libx264", options: dict | None = None) -> Path:
    """Write uint8 frames ``[T, H, W, 3]`` (RGB) to ``path`` with PyAV. H and W must be even for H.264."""
    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if options:
            stream.options = dict(options)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
