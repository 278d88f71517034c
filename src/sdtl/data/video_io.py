"""Frame-exact video decoding (PyAV or torchcodec) and a small PyAV writer.

Called by :mod:`sdtl.data.datasets` (one clip per sample, inside DataLoader workers), by
``sdtl data check|bench`` and by the synthetic-dataset writer and the tests (:func:`write_video`).

What "frame-exact" means here: ``reader.get_frames([i, ..., i+T-1])`` returns exactly frames
``i..i+T-1`` of a full sequential decode of the file, in presentation order. Naive seeking breaks this
on real files (AVI with B-frames has no real timestamps; MPEG program streams and raw elementary
streams seek by byte position; variable frame rate files break "index = time x fps"), so:

* the frame index is mapped to a presentation timestamp through the packet index of the file (a demux
  pass: reads the bytes, decodes nothing), never through ``index / fps``;
* we seek to the last key frame at or before the first wanted frame and decode forward, checking that
  every decoded frame carries exactly the timestamp the index predicts; any surprise falls back to a
  decode from the start;
* files whose timestamps cannot be trusted at all (:func:`sequential_reason`) are always decoded from
  the start. ``sdtl data check --decode`` lists them (:func:`probe_video` verifies a whole file).

Every reader is a context manager and closes its container (PyAV containers left to the garbage
collector are the classic RAM growth of long PyAV runs).
"""
from __future__ import annotations

import bisect
import fractions
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

log = logging.getLogger(__name__)

BACKENDS = ("pyav", "torchcodec")

# Containers whose per-packet timestamps are real presentation times we can seek on. Everything else
# (MPEG-PS/TS, raw .h264/.m4v elementary streams, exotic formats) is decoded from the start.
_SEEKABLE_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"}


class VideoDecodeError(Exception):
    """A video could not be opened or decoded. ``path`` and ``reason`` are kept for reports."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: cannot decode video: {self.reason}"

    def __reduce__(self):  # survives the trip from a DataLoader worker to the main process
        return (VideoDecodeError, (self.path, self.reason))


# --------------------------------------------------------------------------- backends

@functools.cache
def _torchcodec_status() -> str | None:
    """None when torchcodec works in this process, else why not. Probed once per process."""
    try:
        from torchcodec.decoders import VideoDecoder  # loads torchcodec's FFmpeg libraries
    except Exception as exc:  # ImportError, or RuntimeError/OSError when FFmpeg libs don't load
        return f"torchcodec not usable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
    try:  # a real decode: catches ABI mismatches that only show up when a function is called
        import io

        buf = io.BytesIO()
        _write_to(buf, np.zeros((2, 16, 16, 3), np.uint8), fps=25, codec="mpeg4", options=None, fmt="avi")
        frames = VideoDecoder(buf.getvalue(), dimension_order="NHWC").get_frames_at([0, 1]).data
        if tuple(frames.shape) != (2, 16, 16, 3):
            return f"torchcodec decoded a probe video to shape {tuple(frames.shape)}"
    except Exception as exc:
        return f"torchcodec failed to decode a probe video ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def available_backends() -> list[str]:
    """Backends that work in this process, fastest first (``torchcodec`` only if its FFmpeg loads)."""
    return ["torchcodec", "pyav"] if _torchcodec_status() is None else ["pyav"]


def backend_report() -> dict[str, str]:
    """``{backend: "ok" | reason it is unavailable}`` for ``data check`` / ``data bench``."""
    return {"pyav": f"ok (PyAV {av.__version__})", "torchcodec": _torchcodec_status() or "ok"}


def resolve_backend(backend: str = "auto") -> str:
    """``auto`` -> PyAV; ``torchcodec`` is used only when asked for. Explicit names are checked.

    Evidence (BENCHMARKS.md, 2 cores, a new reader per 16-frame clip): torchcodec was 1.6-1.8x faster
    on MPEG-4 Part 2 (XviD) AVI but 2.4x slower on long-GOP H.264, and its colour conversion differs
    from PyAV's bundled FFmpeg by 1-2 levels. PyAV is exact on every file (per-frame timestamp
    checks) and gives the same pixels on every machine, so it is the default.
    """
    if backend == "auto":
        return "pyav"
    if backend == "pyav":
        return "pyav"
    if backend == "torchcodec":
        reason = _torchcodec_status()
        if reason is not None:
            from sdtl.errors import UserError

            raise UserError(f"backend 'torchcodec': {reason}; install it (pip install torchcodec, "
                            f"apt-get install ffmpeg) or use backend 'pyav'")
        return "torchcodec"
    from sdtl.errors import UserError

    raise UserError(f"backend {backend!r}: unknown video backend; use auto, pyav or torchcodec")


def decoder_identity(backend: str = "auto") -> str:
    """What decodes the videos, with versions: recorded with every run, because backends (and FFmpeg
    builds) differ by 1-2 pixel levels and a model should be evaluated with the decoder it saw."""
    name = resolve_backend(backend)
    if name == "torchcodec":
        import torchcodec

        return f"torchcodec {getattr(torchcodec, '__version__', '?')} (system FFmpeg)"
    return f"pyav {av.__version__} (FFmpeg {'.'.join(map(str, av.library_versions.get('libavcodec', ())))} bundled)"


def open_video(path, backend: str = "auto") -> "VideoReader":
    """Open ``path`` for frame-exact random access. Use as a context manager.

    Raises :class:`VideoDecodeError` for anything that is not a decodable video (missing, zero-byte,
    truncated header, text file, no video stream, unreadable).
    """
    name = resolve_backend(backend)
    return TorchcodecReader(path) if name == "torchcodec" else PyAVReader(path)


# --------------------------------------------------------------------------- readers

class VideoReader:
    """Interface shared by the backends: ``num_frames``, ``fps``, ``get_frames``, ``close``."""

    path: Path
    backend: str
    #: why this file is decoded from the start instead of seeked (None = seeking is trusted)
    sequential: str | None = None
    #: where ``num_frames`` came from: "index" (packet index / container), or "decode" (a decode pass)
    frame_count_source: str = "index"

    @property
    def num_frames(self) -> int:
        raise NotImplementedError

    @property
    def fps(self) -> float:
        raise NotImplementedError

    def get_frames(self, indices) -> torch.Tensor:
        """uint8 ``[len(indices), H, W, 3]`` RGB, in the order of ``indices`` (repeats allowed)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _check_indices(self, indices) -> list[int]:
        idx = [int(i) for i in indices]
        n = self.num_frames
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise VideoDecodeError(self.path, f"frame index {bad[0]} out of range (the video has {n} frames)")
        return idx


def _is_seekable_format(container, stream) -> str | None:
    """None when the container's timestamps can be used to seek, else why not (header only)."""
    fmt = container.format.name
    if fmt not in _SEEKABLE_FORMATS:
        return f"container '{fmt}' has no reliable per-frame timestamps"
    # AVI stores decode order only; with B-frames the presentation times are guessed and seeking
    # (ours and torchcodec's) returns neighbouring frames.
    if fmt == "avi" and stream.codec_context.has_b_frames:
        return "AVI with B-frames (no real presentation timestamps)"
    return None


def _open_container(path):
    path = Path(path)
    try:
        if path.is_dir():
            raise VideoDecodeError(path, "is a directory")
        if path.stat().st_size == 0:
            raise VideoDecodeError(path, "zero-byte file")
        container = av.open(str(path), metadata_errors="ignore")
    except VideoDecodeError:
        raise
    except Exception as exc:  # FileNotFoundError, PermissionError, av.InvalidDataError, ...
        raise VideoDecodeError(path, _describe(exc)) from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(path, "no video stream")
    return container


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, PermissionError):
        return "permission denied"
    msg = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {msg}"[:300]


@dataclass
class _PacketIndex:
    pts: list[int]  # presentation timestamps of all frames, sorted (frame i <-> pts[i])
    key_pts: list[int]  # presentation timestamps of key frames, sorted


def _scan_packets(container, stream) -> tuple[_PacketIndex | None, int, str | None]:
    """Demux (no decoding) the video stream. Returns (index or None, packet count, reason if no index)."""
    pts, keys = [], []
    missing = 0
    in_decode_order = True  # every packet's pts larger than the previous packet's
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # flush packets; edit-list pre-roll (not shown)
            continue
        if packet.pts is None:
            missing += 1
            continue
        if pts and packet.pts <= pts[-1]:
            in_decode_order = False
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    count = len(pts) + missing
    if missing:
        return None, count, f"{missing} of {count} packets have no timestamp"
    sorted_pts = sorted(pts)
    if any(a == b for a, b in zip(sorted_pts, sorted_pts[1:])):
        return None, count, "duplicate frame timestamps"
    if not keys:
        return None, count, "no key frames in the packet index"
    keys.sort()
    if keys[0] != sorted_pts[0]:
        return None, count, "the first frame is not a key frame"
    if in_decode_order and stream.codec_context.has_b_frames and count > 2:
        # With B-frames, presentation order differs from decode (packet) order, so real presentation
        # timestamps cannot increase packet by packet. These do: the muxer wrote pts = dts (seen in
        # real MP4/MKV files), frame i is not the i-th smallest pts, and any seek by pts (PyAV's or
        # torchcodec's) lands on a neighbouring frame.
        return None, count, "B-frames with timestamps in decode order (pts == dts): presentation order unknown"
    return _PacketIndex(sorted_pts, keys), count, None


class _SeekMismatch(Exception):
    """Decoded timestamps disagreed with the packet index: fall back to decoding from the start."""


class PyAVReader(VideoReader):
    """PyAV backend (bundled FFmpeg, always available)."""

    backend = "pyav"

    def __init__(self, path):
        self.path = Path(path)
        self._container = None
        self._container = _open_container(self.path)
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1  # many workers decode in parallel; threads only contend
        self._index: _PacketIndex | None = None
        self._num_frames: int | None = None
        self._reformatter = av.video.reformatter.VideoReformatter()  # reused: 5x faster than to_ndarray(rgb24)
        self.sequential = _is_seekable_format(self._container, self._stream)
        try:
            self._build_index()
        except VideoDecodeError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise VideoDecodeError(self.path, _describe(exc)) from None

    # -- metadata
    def _build_index(self) -> None:
        index, count, reason = _scan_packets(self._container, self._stream)
        if count == 0:
            raise VideoDecodeError(self.path, "no video packets (empty or truncated file)")
        if self.sequential is None and reason is not None:
            self.sequential = reason
        if self.sequential is None:
            self._index = index
            self._num_frames = len(index.pts)
        elif self._container.format.name == "avi" and self._stream.frames == count:
            # AVI: one packet per frame and the header count agrees with the index: trust it.
            self._num_frames = count
        else:
            self._num_frames = None  # counted by a decode pass on first use
        # The demux pass consumed the packets. The seeking path seeks before every decode anyway;
        # the sequential path reopens the file first (see _rewind).
        self._at_start = False

    def _rewind(self) -> None:
        # Reopen rather than seek(0): raw streams and some MPEG files can't seek back reliably.
        if self._at_start:
            return
        self._container.close()
        self._container = _open_container(self.path)
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1
        self._at_start = True

    @property
    def num_frames(self) -> int:
        if self._num_frames is None:
            self.frame_count_source = "decode"
            self._rewind()
            self._at_start = False
            n = 0
            try:
                for _ in self._container.decode(self._stream):
                    n += 1
            except Exception as exc:
                if n == 0:
                    raise VideoDecodeError(self.path, _describe(exc)) from None
                log.debug("%s: decode stopped after %d frames: %s", self.path, n, exc)
            if n == 0:
                raise VideoDecodeError(self.path, "no frame could be decoded")
            self._num_frames = n
        return self._num_frames

    @property
    def fps(self) -> float:
        rate = self._stream.average_rate or self._stream.guessed_rate or self._stream.base_rate
        return float(rate) if rate else 0.0

    # -- decoding
    def _rgb(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()

    def get_frames(self, indices) -> torch.Tensor:
        idx = self._check_indices(indices)
        if not idx:
            raise ValueError("get_frames needs at least one index")
        wanted = sorted(set(idx))
        try:
            got = None
            if self.sequential is None:
                try:
                    got = self._decode_seeking(wanted)
                except _SeekMismatch as why:
                    self.sequential = f"seek check failed: {why}"
                    log.debug("%s: %s; decoding from the start", self.path, self.sequential)
            if got is None:
                got = self._decode_sequential(wanted)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from None
        return torch.from_numpy(np.stack([got[i] for i in idx]))

    def _decode_sequential(self, wanted: list[int]) -> dict[int, np.ndarray]:
        self._rewind()
        self._at_start = False
        want = set(wanted)
        last = wanted[-1]
        got: dict[int, np.ndarray] = {}
        n = 0
        for frame in self._container.decode(self._stream):
            if n in want:
                got[n] = self._rgb(frame)
            if n >= last:
                break
            n += 1
        else:
            raise VideoDecodeError(self.path, f"file ends after {n} decodable frames, frame {last} was "
                                              f"requested (truncated?)")
        return got

    def _decode_seeking(self, wanted: list[int]) -> dict[int, np.ndarray]:
        index = self._index
        pts = index.pts
        self._at_start = False
        got: dict[int, np.ndarray] = {}
        i = 0
        while i < len(wanted):
            target = pts[wanted[i]]
            key = index.key_pts[bisect.bisect_right(index.key_pts, target) - 1]
            pos = bisect.bisect_left(pts, key)  # frame index of that key frame
            self._container.seek(key, stream=self._stream, backward=True, any_frame=False)
            started = False
            for frame in self._container.decode(self._stream):
                p = frame.pts
                if p is None:
                    raise _SeekMismatch("decoded frame without timestamp")
                if p < key:  # earlier GOP (seek landed before the key frame) or open-GOP leading frames
                    if started:
                        raise _SeekMismatch("timestamps go backwards")
                    continue
                if not started:
                    if p != key:
                        raise _SeekMismatch(f"seek to pts {key} gave first frame pts {p}")
                    started = True
                if pos >= len(pts) or p != pts[pos]:
                    raise _SeekMismatch(f"frame {pos} has pts {p}, index says "
                                        f"{pts[pos] if pos < len(pts) else 'end of file'}")
                if pos == wanted[i]:
                    got[pos] = self._rgb(frame)
                    i += 1
                    if i == len(wanted):
                        break
                    # The next wanted frame sits behind a later key frame: seek instead of decoding on.
                    next_key = index.key_pts[bisect.bisect_right(index.key_pts, pts[wanted[i]]) - 1]
                    if next_key > p:
                        break
                pos += 1
            else:
                raise _SeekMismatch(f"stream ended at frame {pos}, before frame {wanted[i]}")
        return got

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


class TorchcodecReader(VideoReader):
    """torchcodec backend: exact-mode index, faster colour conversion. Files whose timestamps can't be
    trusted (see :func:`sequential_reason`) are handed to PyAV's decode-from-start path, because
    torchcodec silently returns neighbouring frames for them (AVI with B-frames, MPEG-PS)."""

    backend = "torchcodec"

    def __init__(self, path):
        self.path = Path(path)
        self._fallback: PyAVReader | None = None
        self._decoder = None
        # The same probe as PyAV's (header + packet index, no decoding) decides whether this file may
        # be seeked at all; torchcodec returns neighbouring frames, without an error, on every file it
        # rejects (AVI with B-frames, pts == dts B-frame muxes, MPEG-PS, ...).
        self.sequential, index, time_base = _probe_packets(self.path)
        if self.sequential is not None:
            self._fallback = PyAVReader(self.path)
            self._fallback.sequential = self.sequential
            return
        self._expected_s = [float(p * time_base) for p in index.pts]
        try:
            from torchcodec.decoders import VideoDecoder

            self._decoder = VideoDecoder(str(self.path), seek_mode="exact", dimension_order="NHWC",
                                         num_ffmpeg_threads=1)
            self._n = len(self._decoder)
            if self._n <= 0:
                raise VideoDecodeError(self.path, "no frames")
            meta = self._decoder.metadata
            self._fps = float(meta.average_fps or 0.0)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from None

    @property
    def num_frames(self) -> int:
        return self._fallback.num_frames if self._fallback else self._n

    @property
    def fps(self) -> float:
        return self._fallback.fps if self._fallback else self._fps

    @property
    def frame_count_source(self) -> str:  # type: ignore[override]
        return self._fallback.frame_count_source if self._fallback else "index"

    def get_frames(self, indices) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.get_frames(indices)
        idx = self._check_indices(indices)
        if not idx:
            raise ValueError("get_frames needs at least one index")
        wanted = sorted(set(idx))
        try:
            batch = self._decoder.get_frames_at(wanted)
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from None
        frames = batch.data
        times = batch.pts_seconds.tolist()
        expected = [self._expected_s[i] if i < len(self._expected_s) else math.nan for i in wanted]
        if len(self._expected_s) != self._n or any(not abs(a - b) < 1e-4 for a, b in zip(times, expected)):
            # torchcodec's frames are not the ones the packet index names: PyAV decodes this file
            # (seeking with a per-frame timestamp check, or from the start).
            self.sequential = (f"torchcodec returned frames at {times[:3]} s for indices {wanted[:3]}, "
                               f"the packet index says {expected[:3]}")
            log.debug("%s: %s", self.path, self.sequential)
            self._fallback = PyAVReader(self.path)
            return self._fallback.get_frames(indices)
        if wanted == idx:
            return frames
        where = {f: k for k, f in enumerate(wanted)}
        return frames[torch.tensor([where[i] for i in idx])]

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
        self._decoder = None


# --------------------------------------------------------------------------- whole-file checks

@dataclass
class VideoProbe:
    """Result of decoding a whole file (``sdtl data check --decode``)."""

    path: str
    num_frames: int  # frames of a full sequential decode
    fps: float
    width: int
    height: int
    sequential: str | None  # why seeking is not trusted for this file (None = seeks are exact)


def _probe_packets(path) -> tuple[str | None, "_PacketIndex | None", fractions.Fraction]:
    """(why ``path`` must be decoded from the start or None, its packet index, the stream time base)."""
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        reason, index = _is_seekable_format(container, stream), None
        if reason is None:
            index, count, reason = _scan_packets(container, stream)
            if count == 0:
                raise VideoDecodeError(path, "no video packets (empty or truncated file)")
        return reason, index, stream.time_base
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(path, _describe(exc)) from None
    finally:
        container.close()


def sequential_reason(path) -> str | None:
    """Why ``path`` must be decoded from the start (None: it can be seeked frame-exactly).

    Cheap: header + packet index only, the same probe both readers use. :func:`probe_video`
    additionally verifies every timestamp.
    """
    return _probe_packets(path)[0]


def needs_sequential_decode(path) -> bool:
    """True when ``path`` is decoded from the start rather than seeked (see :func:`sequential_reason`)."""
    return sequential_reason(path) is not None


def probe_video(path) -> VideoProbe:
    """Decode every frame of ``path`` and check its timestamps against the packet index.

    Raises :class:`VideoDecodeError` when the file is corrupt (nothing decodes, or decoding errors).
    """
    reason = sequential_reason(path)
    index = None
    if reason is None:
        container = _open_container(path)
        try:
            index, _, reason = _scan_packets(container, container.streams.video[0])
        finally:
            container.close()
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # whole-file decode: threads help here
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        decoded_pts = []
        width = height = 0
        try:
            for frame in container.decode(stream):
                decoded_pts.append(frame.pts)
                width, height = frame.width, frame.height
        except Exception as exc:
            raise VideoDecodeError(path, f"decoding failed after {len(decoded_pts)} frames: "
                                         f"{_describe(exc)}") from None
    finally:
        container.close()
    if not decoded_pts:
        raise VideoDecodeError(path, "no frame could be decoded")
    if reason is None and decoded_pts != index.pts:
        reason = "decoded timestamps differ from the packet index"
    return VideoProbe(str(path), len(decoded_pts), fps, width, height, reason)


# --------------------------------------------------------------------------- writing

def _write_to(target, frames: np.ndarray, fps: float, codec: str, options: dict | None, fmt: str | None,
              bframes: int | None = None, gop: int | None = None) -> None:
    with av.open(target, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if bframes is not None:
            stream.codec_context.max_b_frames = bframes
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec == "mpeg4":
            # FFmpeg's mpeg4 default (200 kb/s) smears small test patterns; ask for near-lossless.
            stream.codec_context.qmax = 4
        if options:
            stream.options = {str(k): str(v) for k, v in options.items()}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path, frames, fps: float = 25.0, codec: str = "libx264", options: dict | None = None,
                *, bframes: int | None = None, gop: int | None = None) -> Path:
    """Write uint8 RGB frames ``[T, H, W, 3]`` to ``path`` with PyAV; returns ``path``.

    ``codec``: ``libx264`` (.mp4, .avi, .mkv) or ``mpeg4`` (.avi, .mp4), or any PyAV encoder.
    H and W must be even (yuv420p). ``options`` go to the encoder (e.g. ``{"crf": "18"}``);
    ``bframes`` sets the maximum number of consecutive B-frames (0 = none), ``gop`` the key-frame
    interval -- both used by tests that need files where naive seeking goes wrong.
    """
    path = Path(path)
    if isinstance(frames, torch.Tensor):
        frames = frames.numpy()
    frames = np.ascontiguousarray(np.asarray(frames, dtype=np.uint8))
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"write_video needs uint8 frames [T, H, W, 3] with T >= 1, got {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: H and W must be even for yuv420p, got {frames.shape[1:3]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_to(str(path), frames, fps, codec, options, None, bframes=bframes, gop=gop)
    return path
