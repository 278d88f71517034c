"""Files shipped inside sdtl: the pre-trained encoder of the demo.

``demo_encoder.pt`` is the checkpoint ``sdtl pretrain`` wrote with the demo's pre-training recipe on
the synthetic pool (encoder + playback-speed head); ``demo_encoder.json`` records its sha256, the
exact commands that regenerate it and its pretext accuracy. ``sdtl demo --quick`` fine-tunes from it,
as real users start from released weights; ``sdtl demo`` (full) pre-trains its own and compares.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from sdtl.errors import CheckpointError, UserError

DEMO_ENCODER = "demo_encoder.pt"
DEMO_ENCODER_INFO = "demo_encoder.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _asset(name: str) -> Path:
    return Path(str(resources.files("sdtl.assets") / name))


def demo_encoder_info() -> dict:
    path = _asset(DEMO_ENCODER_INFO)
    if not path.is_file():
        raise UserError(f"shipped demo encoder record {path} is missing: the sdtl installation is incomplete; "
                        f"reinstall sdtl (pip install -e .), or run the full demo (`sdtl demo`), which pre-trains its own")
    return json.loads(path.read_text())


def demo_encoder(path: Path | None = None) -> Path:
    """Path of the shipped demo encoder after checking its sha256 against the shipped record."""
    info = demo_encoder_info()
    path = path or _asset(DEMO_ENCODER)
    regenerate = " && ".join(info["regenerate"])
    if not path.is_file():
        raise CheckpointError(f"shipped demo encoder {path} is missing; reinstall sdtl, or regenerate it with: "
                        f"{regenerate} (then copy the encoder.pt to {path}), or run the full `sdtl demo`", path=path)
    actual = sha256_file(path)
    if actual != info["sha256"]:
        raise CheckpointError(f"shipped demo encoder {path} is corrupt or was replaced: sha256 {actual[:16]}… is not the "
                        f"recorded {info['sha256'][:16]}… ({DEMO_ENCODER_INFO}); reinstall sdtl, or regenerate it "
                        f"with: {regenerate} and update {DEMO_ENCODER_INFO}; or run the full `sdtl demo`", path=path)
    return path
