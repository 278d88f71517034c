"""Frame-exact decoding on small videos written here, both backends, and undecodable files."""
from __future__ import annotations

import dataclasses

import av
import numpy as np
import pytest
import torch
from data_helpers import numbered_frames, read_number

from sdtl.data import video_io
from sdtl.data.video_io import VideoDecodeError, open_video, probe_video, sequential_reason, write_video

T = 60  # frames per test video; key frames every 12 so that seeking really skips GOPs

# (file name, write_video kwargs, whether seeking can be trusted)
VIDEOS = {
    "h264.mp4": (dict(codec="libx264", gop=12), True),  # B-frames, real pts
    "h264_vfr.mkv": (dict(codec="libx264", gop=12), True),  # pts rewritten below: irregular gaps
    "h264_nob.avi": (dict(codec="libx264", gop=12, bframes=0), True),
    "h264_b.avi": (dict(codec="libx264", gop=12, bframes=3), False),  # AVI + B-frames: no real pts
    "mpeg4.avi": (dict(codec="mpeg4", gop=12), True),  # XviD-like, as UCF101 ships
    "mpeg4_b.avi": (dict(codec="mpeg4", gop=12, bframes=2), False),
    "mpeg2.mpg": (dict(codec="mpeg2video", gop=12, bframes=2), False),  # MPEG program stream
    "raw.h264": (dict(codec="libx264", gop=12), False),  # elementary stream: no timestamps at all
    # Files whose packet timestamps are decode times, not presentation times: torchcodec returned
    # neighbouring frames on them without an error (issue 10, item 1).
    "h264_ptsdts.mp4": (dict(codec="libx264", gop=12, bframes=2), False),  # like opencv's box.mp4
    "h264_ptsdts.mkv": (dict(codec="libx264", gop=12, bframes=2), False),
    "mpeg4_b_remux.mkv": (dict(codec="mpeg4", gop=12, bframes=2), False),  # XviD AVI stream-copied
    "mpeg4_b_remux.mp4": (dict(codec="mpeg4", gop=12, bframes=2), False),
    # The same AVI stream-copied by a muxer that rebuilds presentation times: real pts, seekable.
    "mpeg4_b_genpts.mkv": (dict(codec="mpeg4", gop=12, bframes=2), True),
}


def _write_vfr(path, frames):
    """Matroska H.264 with irregular, gappy timestamps (a variable-frame-rate phone video)."""
    import fractions

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size = 12
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i * 40 + (i % 3) * 7 + (i // 10) * 100, fractions.Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _write_pts_eq_dts(path, frames, bframes=2):
    """H.264 with B-frames whose packets carry pts == dts (decode times), 32-34 ms apart."""
    import fractions

    ms = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size, s.codec_context.max_b_frames = 12, bframes
        s.codec_context.time_base = s.time_base = ms
        n = 0

        def mux(packets):
            nonlocal n
            for p in packets:
                p.pts = p.dts = n * 33 + (n % 3 == 1) - (n % 3 == 2)
                p.time_base = ms
                c.mux(p)
                n += 1

        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = i * 33, ms
            mux(s.encode(vf))
        mux(s.encode())


def _remux(src, dst, avi_times: bool):
    """Stream-copy (no re-encoding) the video of ``src`` into ``dst``. With ``avi_times`` every packet
    is stamped with its AVI position (AVI stores decode order only), as remuxers without a parser do;
    without, the demuxer's reconstructed presentation times are kept."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        ins = i.streams.video[0]
        outs = o.add_stream_from_template(ins)
        k = 0
        for p in i.demux(ins):
            if p.size == 0:
                continue
            if avi_times:
                p.pts = p.dts = k
                p.time_base = ins.time_base
            p.stream = outs
            o.mux(p)
            k += 1


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    frames = numbered_frames(T)
    out = {}
    for name, (kw, _) in VIDEOS.items():
        path = root / name
        if name == "h264_vfr.mkv":
            _write_vfr(path, frames)
        elif name == "mpeg2.mpg":
            with av.open(str(path), "w", format="vob") as c:
                s = c.add_stream("mpeg2video", rate=25)
                s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
                s.codec_context.gop_size, s.codec_context.max_b_frames = 12, 2
                for f in frames:
                    for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
        elif name.startswith("h264_ptsdts"):
            _write_pts_eq_dts(path, frames)
        elif "_remux" in name or "_genpts" in name:
            avi = write_video(root / f"{name}.src.avi", frames, **kw)
            _remux(avi, path, avi_times="_remux" in name)
        elif name == "raw.h264":
            with av.open(str(path), "w", format="h264") as c:
                s = c.add_stream("libx264", rate=25)
                s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
                s.codec_context.gop_size = 12
                for f in frames:
                    for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
        else:
            write_video(path, frames, **kw)
        out[name] = path
    return out


def sequential_decode(path) -> np.ndarray:
    """Ground truth: every frame, in decoder output (presentation) order."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


BACKENDS = ["pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(
    "torchcodec" not in video_io.available_backends(), reason=video_io.backend_report()["torchcodec"]))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VIDEOS))
def test_clips_equal_sequential_decode(videos, name, backend):
    truth = sequential_decode(videos[name])
    assert len(truth) == T
    # the content really is frame t at position t (so comparing positions compares frames)
    assert [read_number(f) for f in truth] == list(range(T))
    with open_video(videos[name], backend, video_io.ProbeCache()) as r:  # nothing learned before
        assert r.num_frames == T
        assert (r.sequential is None) == VIDEOS[name][1], r.sequential
        for idx in ([0, 1, 2, 3], [25, 26, 27, 28, 29, 30], [47, 48, 49], [T - 1], [13, 50, 13, 2, 2],
                    list(range(T - 16, T)), [30, 5, 40], list(range(10, 42, 2)), list(range(3, T, 8))):
            got = r.get_frames(idx)
            assert got.dtype == torch.uint8 and tuple(got.shape) == (len(idx), 64, 96, 3)
            np.testing.assert_array_equal(got.numpy(), truth[idx], err_msg=f"{name} {backend} {idx}")


@pytest.mark.skipif("torchcodec" not in video_io.available_backends(), reason="torchcodec not usable here")
@pytest.mark.parametrize("name", ["h264.mp4", "mpeg4.avi", "mpeg4_b.avi"])
def test_backends_agree(videos, name):
    idx = [3, 4, 5, 6, 40, 41]
    with open_video(videos[name], "pyav") as a, open_video(videos[name], "torchcodec") as b:
        assert a.num_frames == b.num_frames
        assert abs(a.fps - b.fps) < 1e-6
        assert torch.equal(a.get_frames(idx), b.get_frames(idx))


def test_seek_path_is_used_and_checked(videos, monkeypatch):
    """Seekable files must not silently decode from the start (that would be slow, not wrong)."""
    with open_video(videos["mpeg4.avi"], "pyav") as r:
        r.get_frames([50, 51])
        assert r.sequential is None
    # a corrupted index (frame 1 of the index points at frame 2's timestamp) is caught by the pts check
    with open_video(videos["h264.mp4"], "pyav", video_io.ProbeCache()) as r:
        pts = list(r._probe.pts)
        pts[30] += 1
        r._probe = dataclasses.replace(r._probe, pts=tuple(pts))
        np.testing.assert_array_equal(r.get_frames([31, 32]).numpy(), sequential_decode(videos["h264.mp4"])[[31, 32]])
        assert r.sequential is not None and "seek check failed" in r.sequential


def test_probe_and_sequential_reason(videos):
    for name, (_, seekable) in VIDEOS.items():
        assert (sequential_reason(videos[name], video_io.ProbeCache()) is None) == seekable, name
        probe = probe_video(videos[name])
        assert probe.num_frames == T and (probe.width, probe.height) == (96, 64)
        assert (probe.sequential is None) == seekable


def test_write_video_roundtrip(tmp_path):
    frames = numbered_frames(20, 32, 48)
    for codec, suffix in (("libx264", ".mp4"), ("libx264", ".avi"), ("mpeg4", ".avi")):
        path = write_video(tmp_path / f"v{suffix}", torch.from_numpy(frames), fps=10, codec=codec)
        with open_video(path, "pyav") as r:
            assert r.num_frames == 20 and abs(r.fps - 10) < 1e-6
            assert [read_number(f) for f in r.get_frames(range(20))] == list(range(20))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 32, 3), np.uint8))


def _bad_files(tmp_path, videos):
    zero = tmp_path / "zero.avi"
    zero.touch()
    text = tmp_path / "text.avi"
    text.write_text("this is not a video\n" * 50)
    data = videos["mpeg4.avi"].read_bytes()
    trunc = tmp_path / "truncated.avi"
    trunc.write_bytes(data[:300])  # header cut: nothing decodable
    return {"zero": zero, "text": text, "truncated": trunc, "missing": tmp_path / "missing.avi",
            "directory": tmp_path}


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_files_raise_video_decode_error(tmp_path, videos, backend):
    for kind, path in _bad_files(tmp_path, videos).items():
        with pytest.raises(VideoDecodeError) as err:
            with open_video(path, backend) as r:
                r.get_frames([0])
        assert str(path) in str(err.value), kind  # the message names the file
        assert err.value.path == str(path) and err.value.reason


def test_truncated_tail_still_reads_the_frames_that_exist(tmp_path, videos):
    data = videos["mpeg4.avi"].read_bytes()
    path = tmp_path / "tail_cut.avi"
    path.write_bytes(data[: len(data) // 2])
    with open_video(path, "pyav") as r:
        n = r.num_frames
        assert 0 < n < T
        assert [read_number(f) for f in r.get_frames([0, n // 2])] == [0, n // 2]
        try:  # the cut-off last packet may or may not decode, but only ever as a VideoDecodeError
            r.get_frames([n - 1])
        except VideoDecodeError as exc:
            assert "tail_cut.avi" in str(exc)
        with pytest.raises(VideoDecodeError, match="out of range"):
            r.get_frames([n])


def test_readers_close_containers(videos):
    r = open_video(videos["mpeg4.avi"], "pyav")
    r.get_frames([1])
    r.close()
    assert r._container is None
    r.close()  # idempotent


def test_resolve_backend():
    assert video_io.resolve_backend("pyav") == "pyav"
    assert video_io.resolve_backend("auto") == video_io.AUTO_BACKEND
    from sdtl.errors import UserError

    with pytest.raises(UserError, match="unknown video backend"):
        video_io.resolve_backend("decord")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264_ptsdts.mp4", "h264_ptsdts.mkv", "mpeg4_b_remux.mkv", "mpeg4_b_remux.mp4",
                                  "mpeg2.mpg", "h264.mp4"])
def test_every_single_frame_with_a_new_reader(videos, name, backend):
    """What a DataLoader does: a new reader per clip. Every frame must be the one asked for."""
    wrong = []
    for i in range(T):
        with open_video(videos[name], backend) as r:
            got = read_number(r.get_frames([i])[0].numpy())
        if got != i:
            wrong.append((i, got))
    assert not wrong, f"{name} {backend}: (asked, got) {wrong}"


UNTRUSTED = [name for name, (_, seekable) in VIDEOS.items() if not seekable]


@pytest.mark.skipif("torchcodec" not in video_io.available_backends(), reason="torchcodec not usable here")
@pytest.mark.parametrize("name", UNTRUSTED)
def test_torchcodec_never_seeks_a_file_the_probe_distrusts(videos, name):
    with open_video(videos[name], "torchcodec", video_io.ProbeCache()) as r:
        assert r.decoder == "pyav" and r.sequential is not None
        assert [read_number(f) for f in r.get_frames([7, 9, 11])] == [7, 9, 11]


@pytest.mark.skipif("torchcodec" not in video_io.available_backends(), reason="torchcodec not usable here")
def test_torchcodec_frames_are_checked_against_the_probe(videos):
    """torchcodec indexes the file with its own FFmpeg; when the timestamp of a frame it returns is not
    the probe's for that index (here: one index entry moved by a tick, as another FFmpeg may label it),
    the file goes to PyAV's exact path, and the next reader knows it without asking torchcodec."""
    cache = video_io.ProbeCache()
    with open_video(videos["h264.mp4"], "torchcodec", cache) as r:
        assert r.decoder == "torchcodec"
        assert [read_number(f) for f in r.get_frames([20, 21])] == [20, 21]
        pts = list(r._probe.pts)
        pts[30] += 1
        r._probe = dataclasses.replace(r._probe, pts=tuple(pts))
        assert [read_number(f) for f in r.get_frames([29, 30, 31])] == [29, 30, 31]
        assert r.decoder == "pyav"
    with open_video(videos["h264.mp4"], "torchcodec", cache) as again:
        assert again.decoder == "pyav" and "torchcodec returned pts" in again._probe.torchcodec


def _count_calls(monkeypatch, name) -> list:
    """Count calls of a video_io function; the real function still runs."""
    calls = []
    real = getattr(video_io, name)

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(video_io, name, counted)
    return calls


def test_each_file_is_probed_once_per_run(videos, tmp_path, monkeypatch):
    """Two workers of a run (two caches on one index file): the second neither probes nor counts
    frames by decoding, and does not repeat a seek that failed for the first (issue 10, item 12)."""
    probes = _count_calls(monkeypatch, "_probe_file")
    counts = _count_calls(monkeypatch, "_count_frames_by_decoding")
    index = tmp_path / "video_index.jsonl"
    first, second = video_io.ProbeCache(index), video_io.ProbeCache(index)
    mpg = videos["mpeg2.mpg"]  # MPEG-PS: no frame count without decoding the file
    with open_video(mpg, "pyav", first) as r:
        assert r.num_frames == T and r.frame_count_source == "decode"
    assert (len(probes), len(counts)) == (1, 1)
    with open_video(mpg, "pyav", second) as r:
        assert r.num_frames == T and r.get_frames([T - 1]).shape[0] == 1
    assert (len(probes), len(counts)) == (1, 1)

    # a seek that failed its check is not tried again by the next reader
    seeks = []
    real_seek = video_io.PyAVReader._decode_seeking
    monkeypatch.setattr(video_io.PyAVReader, "_decode_seeking",
                        lambda self, wanted: (seeks.append(wanted), real_seek(self, wanted))[1])
    mp4 = videos["h264.mp4"]
    with open_video(mp4, "pyav", first) as r:
        pts = list(r._probe.pts)
        pts[30] += 1  # an index the decoder contradicts
        r._probe = dataclasses.replace(r._probe, pts=tuple(pts))
        assert [read_number(f) for f in r.get_frames([31])] == [31]
        assert "seek check failed" in r.sequential
    assert len(seeks) == 1
    with open_video(mp4, "pyav", second) as r:
        assert "seek check failed" in r.sequential
        assert [read_number(f) for f in r.get_frames([40])] == [40]
    assert len(seeks) == 1 and len(probes) == 2  # mp4 probed once, by the first reader

    # the index file holds one line per probe and per learned fact, nothing else
    lines = index.read_text().splitlines()
    assert len(lines) == 4  # mpg probed, mpg counted, mp4 probed, mp4 seek failed


def test_a_changed_file_is_probed_again(tmp_path, monkeypatch):
    probes = _count_calls(monkeypatch, "_probe_file")
    cache = video_io.ProbeCache(tmp_path / "video_index.jsonl")
    path = write_video(tmp_path / "v.mp4", numbered_frames(20))
    with open_video(path, "pyav", cache) as r:
        assert r.num_frames == 20
    with open_video(path, "pyav", cache) as r:
        assert r.num_frames == 20
    assert len(probes) == 1
    write_video(path, numbered_frames(30))  # same name, new content
    with open_video(path, "pyav", cache) as r:
        assert r.num_frames == 30 and read_number(r.get_frames([29])[0]) == 29
    assert len(probes) == 2


def test_probe_cache_survives_torn_lines(tmp_path):
    """A line cut short (a worker killed mid-write) costs a re-probe, not an error."""
    index = tmp_path / "video_index.jsonl"
    path = write_video(tmp_path / "v.avi", numbered_frames(12), codec="mpeg4")
    video_io.probe_file(path, video_io.ProbeCache(index))
    whole = index.read_text()
    index.write_text(whole + whole[: len(whole) // 2])  # a second, unfinished line
    fresh = video_io.ProbeCache(index)
    assert fresh.get(video_io._file_key(path)).num_frames == 12
    index.write_text("not json\n" + whole)
    assert video_io.ProbeCache(index).get(video_io._file_key(path)).num_frames == 12


def test_auto_backend():
    assert video_io.resolve_backend("auto") == video_io.AUTO_BACKEND == "pyav"  # by measurement: BENCHMARKS.md


# --------------------------------------------------------------------------- stream copies into other muxers

def _stream_copy(src, dst, pts_equals_dts: bool = False) -> None:
    """Stream-copy (no re-encode) ``src`` into ``dst``'s container, optionally writing pts = dts as
    some real muxers do for B-frame streams."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        stream = i.streams.video[0]
        out = o.add_stream_from_template(stream)
        for packet in i.demux(stream):
            if packet.size == 0:
                continue
            if pts_equals_dts and packet.dts is not None:
                packet.pts = packet.dts
            packet.stream = out
            o.mux(packet)


REMUXES = {  # name: (source, pts = dts, whether seeking can be trusted)
    "h264_ptsdts.mp4": ("h264.mp4", True, False),  # B-frames muxed with pts == dts
    "h264_ptsdts.mkv": ("h264.mp4", True, False),
    "mpeg4_b.mkv": ("mpeg4_b.avi", False, True),  # XviD with B-frames stream-copied out of AVI
    "mpeg4_b.mp4": ("mpeg4_b.avi", False, True),
}


@pytest.fixture(scope="module")
def remuxed(videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("remuxed")
    for name, (src, pts_dts, _) in REMUXES.items():
        _stream_copy(videos[src], root / name, pts_equals_dts=pts_dts)
    return {name: root / name for name in REMUXES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(REMUXES))
def test_stream_copies_are_frame_exact_on_both_backends(remuxed, name, backend):
    """torchcodec 0.17 returned neighbouring frames, without an error, for stride-2 clips of B-frame
    streams muxed with pts == dts; the shared packet probe must route such files to the exact path."""
    truth = sequential_decode(remuxed[name])
    n = len(truth)
    assert (sequential_reason(remuxed[name]) is None) == REMUXES[name][2]
    with open_video(remuxed[name], backend) as r:
        assert r.num_frames == n
        for idx in ([k] for k in range(0, n, 5)):  # single frames
            np.testing.assert_array_equal(r.get_frames(idx).numpy(), truth[idx], err_msg=f"{name} {backend} {idx}")
        for start in (1, 14, n - 33):  # stride-2 clips, as the playback-speed pretext reads them
            idx = list(range(start, start + 32, 2))
            np.testing.assert_array_equal(r.get_frames(idx).numpy(), truth[idx], err_msg=f"{name} {backend} {idx}")


def test_pts_equal_dts_b_frames_are_flagged_by_the_shared_probe(remuxed):
    reason = sequential_reason(remuxed["h264_ptsdts.mkv"])
    assert reason is not None and "pts == dts" in reason


def test_decoder_identity_names_the_backend_and_version():
    assert video_io.decoder_identity("auto").startswith(f"pyav {av.__version__}")

