"""Video data: decoding, clip sampling, transforms, dataset lists, corrupt-video policy.

The way data flows: :mod:`.splits` parses lists -> :mod:`.datasets` matches them to files
(:func:`build_dataset`) -> per item, :mod:`.video_io` decodes the frames :mod:`.sampling` picked and
:mod:`.transforms` crops/normalises them -> :func:`collate_clips` -> the engine, which feeds the
``failed`` lists to :class:`CorruptVideoTracker` (training) or :func:`check_failures` (evaluation).
"""
from sdtl.data.corrupt import CorruptVideoTracker, check_failures
from sdtl.data.datasets import (VideoClipDataset, VideoRecord, build_dataset, collate_clips, list_records,
                                stratified_split)
from sdtl.data.sampling import sample_test_clips, sample_train_clip
from sdtl.data.video_io import VideoDecodeError, available_backends, open_video, resolve_backend, write_video

__all__ = ["CorruptVideoTracker", "check_failures", "VideoClipDataset", "VideoRecord", "build_dataset",
           "collate_clips", "list_records", "stratified_split", "sample_test_clips", "sample_train_clip",
           "VideoDecodeError", "available_backends", "open_video", "resolve_backend", "write_video"]
