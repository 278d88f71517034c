"""Frame-exact video decoding (PyAV or torchcodec) and a small PyAV writer.

Called by :mod:`sdtl.data.datasets` (one clip per sample, inside DataLoader workers), by
``sdtl data check|bench`` and by the synthetic-dataset writer and the tests (:func:`write_video`).

What "frame-exact" means here: ``reader.get_frames([i, ..., i+T-1])`` returns exactly frames
``i..i+T-1`` of a full sequential decode of the file, in presentation order. Naive seeking breaks this
on real files (AVI with B-frames has no real timestamps; H.264 muxed with pts == dts names the wrong
picture at every timestamp; MPEG program streams and raw elementary streams seek by byte position;
variable frame rate files break "index = time x fps"), so:

* one probe per file (:func:`probe_file`: the packet index, from a demux pass that decodes nothing)
  decides for BOTH backends whether the file can be seeked; frame indices map to presentation
  timestamps through that index, never through ``index / fps``;
* PyAV seeks to the last key frame at or before the first wanted frame and decodes forward, checking
  that every decoded frame carries exactly the timestamp the index predicts; torchcodec seeks on the
  same index and the timestamps of what it returns are checked; any surprise falls back to PyAV's
  decode from the start, and is remembered;
* files whose timestamps cannot be trusted at all (:func:`sequential_reason`) are always decoded from
  the start by PyAV. ``sdtl data check --decode`` lists them (:func:`probe_video` verifies a whole file);
* what the probe learned is kept per file for the run (:class:`ProbeCache`, shared by DataLoader
  workers through the run's ``video_index.jsonl``), so a file is probed -- or counted by decoding --
  once per run, not once per clip.

Every reader is a context manager and closes its container (PyAV containers left to the garbage
collector are the classic RAM growth of long PyAV runs).
"""
from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import stat
from dataclasses import dataclass, replace
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
    """Backends that work in this process; ``torchcodec`` only if its FFmpeg libraries load."""
    return ["pyav", "torchcodec"] if _torchcodec_status() is None else ["pyav"]


def backend_report() -> dict[str, str]:
    """``{backend: "ok ..." | reason it is unavailable}`` for ``data check`` / ``data bench``."""
    return {"pyav": f"ok (PyAV {av.__version__})", "torchcodec": _torchcodec_status() or "ok"}


#: What ``auto`` means. Measured with ``sdtl data bench`` (BENCHMARKS.md, "Decoding backends"): once
#: every file is probed once per run, torchcodec is not faster than PyAV on the files we tried, and
#: PyAV needs no system FFmpeg, so ``auto`` is PyAV. torchcodec stays available by name.
AUTO_BACKEND = "pyav"


def resolve_backend(backend: str = "auto") -> str:
    """The backend a name stands for (``auto`` -> :data:`AUTO_BACKEND`); explicit names are checked."""
    if backend == "auto":
        return AUTO_BACKEND
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
    """What decodes the videos, with versions, e.g. ``pyav 18.1.0 (FFmpeg 8.1.2 bundled)``: recorded in a
    run's ``config.yaml``, its checkpoints and results, because the backends (and FFmpeg builds) differ
    by 1-2 pixel levels and a model should be evaluated with the decoder it was trained with. The first
    word is the backend's name."""
    name = resolve_backend(backend)
    if name == "torchcodec":
        import torchcodec

        try:  # private, so the identity only loses the FFmpeg version if it moves
            from torchcodec._core import get_ffmpeg_library_versions

            ffmpeg = get_ffmpeg_library_versions().get("ffmpeg_version", "?")
        except Exception:
            ffmpeg = "?"
        return (f"torchcodec {getattr(torchcodec, '__version__', '?')} (system FFmpeg {ffmpeg}; files it cannot "
                f"seek exactly: pyav {av.__version__})")
    ffmpeg = getattr(av, "ffmpeg_version_info", None) or ".".join(map(str, av.library_versions.get("libavcodec", ())))
    return f"pyav {av.__version__} (FFmpeg {ffmpeg} bundled)"


def open_video(path, backend: str = "auto", cache: "ProbeCache | None" = None) -> "VideoReader":
    """Open ``path`` for frame-exact random access. Use as a context manager.

    ``cache`` holds what the packet probe learned about each file (default: this process's memory);
    pass a run's shared :class:`ProbeCache` so that DataLoader workers probe each file once per run.

    Raises :class:`VideoDecodeError` for anything that is not a decodable video (missing, zero-byte,
    truncated header, text file, no video stream, unreadable).
    """
    name = resolve_backend(backend)
    return TorchcodecReader(path, cache) if name == "torchcodec" else PyAVReader(path, cache)


# --------------------------------------------------------------------------- the probe

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
        raise VideoDecodeError(path, _describe(exc)) from exc
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


@dataclass(frozen=True)
class PacketProbe:
    """What the packet-index probe learned about one file. It decides how BOTH backends read the file.

    ``sequential`` is None when the packet timestamps are the frames' presentation times: frame ``i``
    is found by seeking to ``pts[i]`` (PyAV's checked seek path, or torchcodec with this index and a
    check of the timestamps it returns). Otherwise it says why not, and the file is decoded from the
    start by PyAV whatever the backend.
    """

    num_frames: int | None  # None: not known without decoding (counted on first use, then learned)
    sequential: str | None
    fps: float = 0.0
    pts: tuple[int, ...] = ()  # presentation timestamps of all frames, sorted (frame i <-> pts[i])
    key_pts: tuple[int, ...] = ()  # presentation timestamps of the key frames, sorted
    time_base: tuple[int, int] = (1, 1)  # seconds = pts * time_base[0] / time_base[1]
    count_source: str = "index"  # where num_frames came from: "index" (packets/header) or "decode"
    #: why torchcodec must not read this file (learned: its own index disagreed with this one)
    torchcodec: str | None = None

    def to_json(self) -> dict:
        return {"frames": self.num_frames, "sequential": self.sequential, "fps": self.fps,
                "pts": _to_runs(self.pts), "keys": _to_runs(self.key_pts), "time_base": list(self.time_base),
                "count": self.count_source, "torchcodec": self.torchcodec}

    @classmethod
    def from_json(cls, d: dict) -> "PacketProbe":
        return cls(d["frames"], d["sequential"], float(d["fps"]), _from_runs(d["pts"]), _from_runs(d["keys"]),
                   tuple(d["time_base"]), d["count"], d["torchcodec"])


def _to_runs(values) -> list[list[int]]:
    """Sorted ints as ``[first, step, count]`` runs: a constant-rate video's index is one run."""
    runs: list[list[int]] = []
    for v in values:
        if runs:
            first, step, count = runs[-1]
            if count == 1:
                runs[-1] = [first, v - first, 2]
                continue
            if v - (first + step * (count - 1)) == step:
                runs[-1][2] += 1
                continue
        runs.append([v, 0, 1])
    return runs


def _from_runs(runs) -> tuple[int, ...]:
    return tuple(first + step * k for first, step, count in runs for k in range(count))


# Frames decoded by the presentation-order check (below). B-frames show up within the first GOPs.
_ORDER_CHECK_FRAMES = 48


def _scan_packets(container, stream) -> tuple[list[int], list[int], int, bool, str | None]:
    """Demux (no decoding) the video stream.

    Returns ``(sorted pts, sorted key-frame pts, packet count, pts never decrease in file order,
    reason the timestamps can't index the frames or None)``.
    """
    pts, keys = [], []
    missing = 0
    in_order = True
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # flush packets; edit-list pre-roll (not shown)
            continue
        if packet.pts is None:
            missing += 1
            continue
        if pts and packet.pts < pts[-1]:
            in_order = False
        pts.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    count = len(pts) + missing
    if missing:
        return [], [], count, in_order, f"{missing} of {count} packets have no timestamp"
    sorted_pts = sorted(pts)
    if any(a == b for a, b in zip(sorted_pts, sorted_pts[1:])):
        return [], [], count, in_order, "duplicate frame timestamps"
    if not keys:
        return [], [], count, in_order, "no key frames in the packet index"
    keys.sort()
    if keys[0] != sorted_pts[0]:
        return [], [], count, in_order, "the first frame is not a key frame"
    return sorted_pts, keys, count, in_order, None


def _presentation_order_reason(path, pts: list[int]) -> str | None:
    """None when the first decoded frames carry the index's timestamps, in order; else why not.

    Run for streams with B-frames whose packet timestamps never go backwards in file order. With real
    presentation times a B-frame follows, in the file, the later frame it is predicted from, so its
    timestamp goes back; never going back means either no B-frame is used, or the muxer wrote decode
    times as presentation times (pts == dts; opencv's box.mp4). Then every timestamp names the wrong
    picture and any seek -- ours or torchcodec's -- returns a neighbouring frame. A short decode tells
    the two apart.
    """
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        want = pts[:_ORDER_CHECK_FRAMES]
        got = []
        for frame in container.decode(stream):
            got.append(frame.pts)
            if len(got) == len(want):
                break
    finally:
        container.close()
    if got != want:
        return "packet timestamps are decode times, not presentation times (B-frames muxed with pts == dts)"
    return None


def _probe_file(path) -> PacketProbe:
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        reason = _is_seekable_format(container, stream)
        pts, keys, count, in_order, scan_reason = _scan_packets(container, stream)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        tb = stream.time_base
        is_avi = container.format.name == "avi"
        header_frames = stream.frames
        has_b_frames = stream.codec_context.has_b_frames
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(path, _describe(exc)) from exc
    finally:
        container.close()
    if count == 0:
        raise VideoDecodeError(path, "no video packets (empty or truncated file)")
    reason = reason or scan_reason
    if reason is None and has_b_frames and in_order:
        try:
            reason = _presentation_order_reason(path, pts)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(path, _describe(exc)) from exc
    if reason is None:
        return PacketProbe(len(pts), None, fps, tuple(pts), tuple(keys), (tb.numerator, tb.denominator))
    if is_avi and header_frames == count:
        # AVI: one packet per frame and the header count agrees with the index: trust it.
        return PacketProbe(count, reason, fps)
    return PacketProbe(None, reason, fps)


def _file_key(path) -> tuple[str, int, int] | None:
    """``(absolute path, size, mtime in ns)``: a file changed in place gets a new key (re-probed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


class ProbeCache:
    """What the probe learned about each file during a run, keyed by path, size and mtime.

    Kept in memory and, with ``path``, in an append-only JSON-lines file (a run's
    ``video_index.jsonl``) that every DataLoader worker reads and appends to: a worker meeting a file
    that another worker -- or an earlier epoch's workers -- already probed reads the answer instead of
    probing again. Facts learned later (a frame count from a decode pass, a failed seek check) are
    appended too; the last line of a file wins. Each line is written by one ``write`` on an
    ``O_APPEND`` descriptor, so lines from concurrent workers do not interleave on a local filesystem;
    an unreadable line only costs a re-probe.
    """

    def __init__(self, path=None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[tuple, PacketProbe] = {}
        self._offset = 0  # bytes of the shared file already read

    def get(self, key: tuple) -> PacketProbe | None:
        hit = self._entries.get(key)
        if hit is None and self.path is not None:
            self._read_shared()
            hit = self._entries.get(key)
        return hit

    def put(self, key: tuple, probe: PacketProbe) -> None:
        self._entries[key] = probe
        if self.path is None:
            return
        line = json.dumps({"path": key[0], "size": key[1], "mtime_ns": key[2], **probe.to_json()}) + "\n"
        data = line.encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("%s: cannot record probed videos (%s); each worker probes on its own", self.path, exc)
            self.path = None

    def _read_shared(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for line in data[:end].splitlines():
            try:
                d = json.loads(line)
                self._entries[(d["path"], d["size"], d["mtime_ns"])] = PacketProbe.from_json(d)
            except (ValueError, KeyError, TypeError):
                continue
        self._offset += end

    def __len__(self) -> int:
        return len(self._entries)


#: The cache of readers opened without one: this process's memory.
_PROCESS_CACHE = ProbeCache()


def _lookup(path, cache: ProbeCache | None) -> tuple[tuple | None, PacketProbe]:
    cache = _PROCESS_CACHE if cache is None else cache
    key = _file_key(path)
    probe = cache.get(key) if key is not None else None
    if probe is None:
        probe = _probe_file(path)
        if key is not None:
            cache.put(key, probe)
    return key, probe


def probe_file(path, cache: ProbeCache | None = None) -> PacketProbe:
    """The packet probe of ``path``: header + packet index (no decoding, except a short decode for
    B-frame streams whose timestamps never go back). Answered from ``cache`` when the file is known."""
    return _lookup(path, cache)[1]


# --------------------------------------------------------------------------- readers

class VideoReader:
    """Interface shared by the backends: ``num_frames``, ``fps``, ``get_frames``, ``close``."""

    path: Path
    #: the backend this reader was opened with
    backend: str
    #: why this file is decoded from the start instead of seeked (None = seeking is trusted)
    sequential: str | None = None

    def __init__(self, path, cache: ProbeCache | None):
        self.path = Path(path)
        self._cache = _PROCESS_CACHE if cache is None else cache
        self._key, self._probe = _lookup(self.path, self._cache)

    @property
    def decoder(self) -> str:
        """The backend that really decodes this file (torchcodec hands some files to PyAV)."""
        return self.backend

    def _learn(self, **facts) -> None:
        """Record what reading taught us (a frame count, an untrusted seek) for every later reader."""
        self._probe = replace(self._probe, **facts)
        if self._key is not None:
            self._cache.put(self._key, self._probe)

    @property
    def frame_count_source(self) -> str:
        """Where ``num_frames`` came from: "index" (packet index / header) or "decode" (a decode pass)."""
        return self._probe.count_source

    @property
    def num_frames(self) -> int:
        raise NotImplementedError

    @property
    def fps(self) -> float:
        return self._probe.fps

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
        if not idx:
            raise ValueError("get_frames needs at least one index")
        return idx


def _count_frames_by_decoding(container, stream, path) -> int:
    n = 0
    try:
        for _ in container.decode(stream):
            n += 1
    except Exception as exc:
        if n == 0:
            raise VideoDecodeError(path, _describe(exc)) from exc
        log.debug("%s: decode stopped after %d frames: %s", path, n, exc)
    if n == 0:
        raise VideoDecodeError(path, "no frame could be decoded")
    return n


class _SeekMismatch(Exception):
    """Decoded timestamps disagreed with the packet index: fall back to decoding from the start."""


class PyAVReader(VideoReader):
    """PyAV backend (bundled FFmpeg, always available); the exact path for every untrusted file."""

    backend = "pyav"

    def __init__(self, path, cache: ProbeCache | None = None):
        self._container = None
        super().__init__(path, cache)
        self.sequential = self._probe.sequential
        self._container = _open_container(self.path)
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1  # many workers decode in parallel; threads only contend
        self._reformatter = av.video.reformatter.VideoReformatter()  # reused: 5x faster than to_ndarray(rgb24)
        self._at_start = True

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
        if self._probe.num_frames is None:
            self._rewind()
            self._at_start = False
            self._learn(num_frames=_count_frames_by_decoding(self._container, self._stream, self.path),
                        count_source="decode")
        return self._probe.num_frames

    # -- decoding
    def _rgb(self, frame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24").to_ndarray()

    def get_frames(self, indices) -> torch.Tensor:
        idx = self._check_indices(indices)
        wanted = sorted(set(idx))
        try:
            got = None
            if self.sequential is None:
                try:
                    got = self._decode_seeking(wanted)
                except _SeekMismatch as why:
                    self.sequential = f"seek check failed: {why}"
                    log.debug("%s: %s; decoding from the start", self.path, self.sequential)
                    self._learn(sequential=self.sequential)
            if got is None:
                got = self._decode_sequential(wanted)
        except VideoDecodeError:
            raise
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from exc
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
        pts, key_pts = self._probe.pts, self._probe.key_pts
        self._at_start = False
        got: dict[int, np.ndarray] = {}
        i = 0
        while i < len(wanted):
            target = pts[wanted[i]]
            key = key_pts[bisect.bisect_right(key_pts, target) - 1]
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
                    next_key = key_pts[bisect.bisect_right(key_pts, pts[wanted[i]]) - 1]
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
    """torchcodec backend, behind the same probe as PyAV.

    torchcodec builds its own index with its own FFmpeg (the system's, often another version than
    PyAV's), so two independent readings of the file must agree: it is used only on files the probe
    trusts, only when its frame count and first timestamp match the probe's, and every frame it returns
    must carry the timestamp the probe gives for the requested index. Every other file -- and any file
    where a check fails -- is read by PyAV's exact path. Without these checks torchcodec silently
    returned neighbouring frames (H.264 muxed with pts == dts, AVI and its MKV/MP4 remuxes with
    B-frames, H.264 in AVI, MPEG program streams).
    """

    backend = "torchcodec"

    def __init__(self, path, cache: ProbeCache | None = None):
        self._fallback: PyAVReader | None = None
        self._decoder = None
        super().__init__(path, cache)
        if self._probe.sequential is not None or self._probe.torchcodec is not None:
            self._fallback = PyAVReader(self.path, self._cache)
            return
        try:
            from torchcodec.decoders import VideoDecoder

            self._decoder = VideoDecoder(str(self.path), seek_mode="exact", dimension_order="NHWC",
                                         num_ffmpeg_threads=1)
            meta = self._decoder.metadata
            count, begin = len(self._decoder), meta.begin_stream_seconds_from_content
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from exc
        first = None if begin is None else self._to_pts(begin)
        if count != self._probe.num_frames or first != self._probe.pts[0]:
            self._use_exact_path(f"torchcodec's index ({count} frames from pts {first}) differs from the "
                                 f"probe's ({self._probe.num_frames} from pts {self._probe.pts[0]})")

    def _to_pts(self, seconds: float) -> int:
        num, den = self._probe.time_base
        return round(seconds * den / num)

    def _use_exact_path(self, why: str) -> None:
        # PyAV checks its own seeks frame by frame, so a disagreement of torchcodec's FFmpeg does not
        # make PyAV decode this file from the start.
        log.debug("%s: %s; reading it with PyAV's exact path", self.path, why)
        self._learn(torchcodec=why)
        self._decoder = None
        self._fallback = PyAVReader(self.path, self._cache)

    @property
    def decoder(self) -> str:
        return "pyav" if self._fallback is not None else "torchcodec"

    @property
    def sequential(self) -> str | None:  # type: ignore[override]
        return self._fallback.sequential if self._fallback is not None else None

    @property
    def num_frames(self) -> int:
        return self._fallback.num_frames if self._fallback else self._probe.num_frames

    @property
    def frame_count_source(self) -> str:
        return self._fallback.frame_count_source if self._fallback else self._probe.count_source

    def get_frames(self, indices) -> torch.Tensor:
        if self._fallback is not None:
            return self._fallback.get_frames(indices)
        idx = self._check_indices(indices)
        wanted = sorted(set(idx))
        try:
            batch = self._decoder.get_frames_at(wanted)
        except Exception as exc:
            raise VideoDecodeError(self.path, _describe(exc)) from exc
        returned = [self._to_pts(t) for t in batch.pts_seconds.tolist()]
        expected = [self._probe.pts[i] for i in wanted]
        if returned != expected:
            bad = next(k for k, (a, b) in enumerate(zip(returned, expected)) if a != b)
            self._use_exact_path(f"torchcodec returned pts {returned[bad]} for frame {wanted[bad]} "
                                 f"(probe: {expected[bad]})")
            return self._fallback.get_frames(indices)
        frames = batch.data
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


def sequential_reason(path, cache: ProbeCache | None = None) -> str | None:
    """Why ``path`` must be decoded from the start (None: it can be seeked frame-exactly).

    The readers' own probe (:func:`probe_file`). :func:`probe_video` additionally verifies every timestamp.
    """
    return probe_file(path, cache).sequential


def needs_sequential_decode(path) -> bool:
    """True when ``path`` is decoded from the start rather than seeked (see :func:`sequential_reason`)."""
    return sequential_reason(path) is not None


def probe_video(path) -> VideoProbe:
    """Decode every frame of ``path`` and check its timestamps against the packet index.

    Raises :class:`VideoDecodeError` when the file is corrupt (nothing decodes, or decoding errors).
    """
    probe = probe_file(path)
    reason = probe.sequential
    container = _open_container(path)
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"  # whole-file decode: threads help here
        decoded_pts = []
        width = height = 0
        try:
            for frame in container.decode(stream):
                decoded_pts.append(frame.pts)
                width, height = frame.width, frame.height
        except Exception as exc:
            raise VideoDecodeError(path, f"decoding failed after {len(decoded_pts)} frames: "
                                         f"{_describe(exc)}") from exc
    finally:
        container.close()
    if not decoded_pts:
        raise VideoDecodeError(path, "no frame could be decoded")
    if reason is None and decoded_pts != list(probe.pts):
        reason = "decoded timestamps differ from the packet index"
    return VideoProbe(str(path), len(decoded_pts), probe.fps, width, height, reason)


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
