"""Unlabelled videos as pretext samples: each item is a clip and the target its task drew."""
from __future__ import annotations

from pathlib import Path

import torch


class PretextClipDataset(torch.utils.data.Dataset):
    """Unlabelled videos -> (augmented clip, pretext target). Undecodable videos are replaced."""

    def __init__(self, paths: list[Path], task, size: int, backend: str, seed: int,
                 crop_area: tuple[float, float] = (0.25, 1.0)) -> None:
        self.paths = paths
        self.task = task
        self.size = size
        self.crop_area = crop_area
        self.backend = backend
        self.seed = seed
        self.epoch = 0
        self.probe_cache = None  # the run's ProbeCache (video_index.jsonl): each video probed once per run

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        from sdtl.data.datasets import sample_generator
        from sdtl.data.transforms import train_transform
        from sdtl.data.video_io import VideoDecodeError, open_video

        epoch = self.epoch
        if isinstance(index, tuple):  # (epoch, index) from EpochSampler (persistent workers)
            epoch, index = index
        g = sample_generator(self.seed, epoch, index)
        failed = []
        for _attempt in range(10):
            path = self.paths[index]
            try:
                with open_video(path, self.backend, self.probe_cache) as reader:
                    indices, target = self.task.sample(reader.num_frames, g)
                    frames = reader.get_frames(indices)
                video = train_transform(frames, self.size, generator=g, scale=self.crop_area)
                return {"video": video, "label": target, "video_index": index, "clip_index": 0, "failed": failed}
            except VideoDecodeError as exc:
                failed.append((str(path), str(exc)))
                index = int(torch.randint(len(self.paths), (1,), generator=g))
        raise VideoDecodeError(self.paths[index], "10 videos in a row failed to decode; check the dataset "
                                                  "with `sdtl data check --decode`")
