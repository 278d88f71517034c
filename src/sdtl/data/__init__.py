"""Video data: decoding, clip sampling, transforms, dataset lists, corrupt-video policy.

The way data flows: :mod:`.splits` parses lists -> :mod:`.datasets` matches them to files
(:func:`build_dataset`) -> per item, :mod:`.video_io` decodes the frames :mod:`.sampling` picked and
:mod:`.transforms` crops/normalises them -> :func:`collate_clips` -> the engine, which feeds the
``failed`` lists to :class:`CorruptVideoTracker` (training) or :func:`check_failures` (evaluation).
"""
import importlib

# Names a config or CLI may use for a dataset layout (sdtl.data.datasets.BUILDERS has the builders; a
# test keeps the two equal). Here so that `sdtl --help` can list them without importing torch.
DATASET_NAMES = ("ucf101", "hmdb51", "kinetics400", "folder", "csv", "synthetic")

_WHERE = {
    "CorruptVideoTracker": "corrupt", "check_failures": "corrupt",
    "VideoClipDataset": "datasets", "VideoRecord": "datasets", "build_dataset": "datasets",
    "collate_clips": "datasets", "list_records": "datasets", "stratified_split": "datasets",
    "sample_test_clips": "sampling", "sample_train_clip": "sampling",
    "VideoDecodeError": "video_io", "available_backends": "video_io", "open_video": "video_io",
    "resolve_backend": "video_io", "write_video": "video_io",
}
__all__ = ["DATASET_NAMES", *_WHERE]


def __getattr__(name: str):
    # Imported on first use, so that `sdtl --help` does not import torch and PyAV.
    if name in _WHERE:
        return getattr(importlib.import_module(f"sdtl.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'sdtl.data' has no attribute {name!r}")
