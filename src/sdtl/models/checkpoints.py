"""Checkpoint files: safe loading, format detection, strict backbone loading, atomic saving.

Who calls it: the engine (``model.pretrained`` initialisation, resume, evaluate), ``sdtl inspect``, and
anyone who wants RSPNet's or torchvision's weights in a plain PyTorch loop.

Three rules hold everywhere in this module:

1. **No arbitrary unpickling by default.** Every ``.pt``/``.pth``/``.pth.tar`` file is read with
   ``torch.load(weights_only=True, map_location="cpu")``; ``.safetensors`` with safetensors. A file
   that needs full unpickling (it references Python classes or functions) is refused with a
   :class:`~sdtl.errors.CheckpointError`; ``allow_unsafe_pickle=True`` (CLI ``--allow-unsafe-pickle``)
   loads it anyway, with an :class:`UnsafePickleWarning`. Nothing falls back silently.
2. **Backbone keys load strictly.** After the format's wrapping is removed (RSPNet's
   ``encoder_q.encoder.`` prefix, ``state_dict``/``model`` nesting, DDP's ``module.``), the keys must
   equal the encoder's exactly, with the same shapes. Anything else is an error listing missing,
   unexpected and shape-mismatched keys, the detected format and the expected arch. The only
   tolerance: BatchNorm ``num_batches_tracked`` counters absent from old files keep the model's
   value (they never affect outputs here), and the report says so.
3. **A pre-training head never becomes the classification head.** Only encoder weights are
   loaded into an encoder; heads, projection MLPs, momentum encoders and queues are ignored and
   counted in the :class:`LoadReport`.

Formats recognised by :func:`detect_format`:

- ``rspnet``: RSPNet's released ``model_best_*.pth.tar``: ``{"epoch", "arch", "model", ...}`` with the
  backbone under ``model["encoder_q.encoder.*"]`` (its ``linear.*`` is the pre-training classifier).
- ``sdtl-finetune`` / ``sdtl-pretrain``: sdtl's own payloads (see docs/design.md).
- ``torchvision``: a VideoResNet state dict (``stem.0.weight``, ``layer1.0...``, ``fc.*``).
- ``state_dict``: any other tensor dict, plain or under ``state_dict``/``model``, with or without a
  ``module.`` prefix (a VideoClassifier state dict, ``encoder.*`` + ``head.*``, counts too).
- ``unknown``: anything else.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtl.atomic import atomic_link, atomic_write, atomic_write_stream, atomic_write_text
from sdtl.errors import CheckpointError, UserError
from sdtl.models.classifier import VideoClassifier, arch_option_names, build_encoder, build_model
from sdtl.models.registry import specs

FORMATS = ("rspnet", "sdtl-finetune", "sdtl-pretrain", "torchvision", "state_dict", "unknown")

RSPNET_BACKBONE_PREFIX = "encoder_q.encoder."
SDTL_FORMAT_VERSION = 1

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_SHOW = 5  # how many keys of each kind an error message lists


class UnsafePickleWarning(UserWarning):
    """A checkpoint was loaded with full unpickling because the caller explicitly allowed it."""


# ----------------------------------------------------------------------------------------------
# Loading files


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    # A safetensors file starts with a little-endian u64 header length followed by a JSON object;
    # recognising it by content lets a renamed file load instead of failing as a "bad pickle".
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < path.stat().st_size


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({exc}); the file may be truncated or corrupted",
            path=path,
        ) from exc


def _first_pickle_ops(path: Path) -> list:
    """Opcodes of the checkpoint's (first) pickle stream, parsed without unpickling anything."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not names:
                raise ValueError("zip archive without data.pkl")
            return list(pickletools.genops(archive.read(names[0])))
    with open(path, "rb") as handle:  # legacy format: genops stops at the first STOP, no full read
        return list(pickletools.genops(handle))


def _needs_full_unpickling(path: Path, exc: Exception) -> str | None:
    """Why a weights-only load failed: a reason string if the file is a real pickle that needs
    classes/functions (i.e. would load with full unpickling), None if it is just not a checkpoint."""
    message = str(exc)
    match = re.search(r"GLOBAL ([\w.]+)", message)
    if match:
        return f"it references the Python object {match.group(1)}"
    # Static check with pickletools: it parses opcodes without executing any of them.
    try:
        ops = _first_pickle_ops(path)
    except Exception:  # noqa: BLE001 - any parse failure means "not a valid pickle"
        return None
    if ops and ops[-1][0].name == "STOP":
        return "it uses pickle operations outside the weights-only subset"
    return None


def _run_of(path: Path) -> Path | None:
    """The sdtl run folder a checkpoint belongs to (``RUN/checkpoints/NAME`` beside ``RUN/config.yaml``)."""
    parent = Path(path).parent
    return parent.parent if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file() else None


def _remedy(path: Path) -> str:
    """What to do about an unusable file: a run's own checkpoint is not downloaded from anywhere."""
    run = _run_of(path)
    if run is None:
        return "re-download or re-save it"
    others = [name for name in RUN_CHECKPOINTS if name != Path(path).name and (Path(path).parent / name).is_file()]
    return (f"it is a checkpoint of the sdtl run {run}: «resume=auto» falls back to the run's previous good "
            f"checkpoint by itself" + (f" (the run also has {', '.join(others)})" if others else ""))


def _bad_file(path: Path, reason: str) -> CheckpointError:
    """A :class:`CheckpointError` for a file that cannot be used; ``.reason`` says why without the path."""
    error = CheckpointError(f"{path}: {reason}; {_remedy(path)}", path=path)
    error.reason = reason
    return error


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    if path.stat().st_size == 0:
        return _bad_file(path, "empty file, not a checkpoint")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    return _bad_file(path, f"not a readable PyTorch checkpoint ({type(exc).__name__}: {reason}); the file is "
                           "truncated, corrupted or not a checkpoint at all")


# ----------------------------------------------------------------------------------------------
# Checksums beside the checkpoints a run writes

#: a run's checkpoints (OUT/checkpoints/): the newest, the one before it, the selected one
RUN_CHECKPOINTS = ("last.pt", "prev.pt", "best.pt")
CHECKSUM_SUFFIX = ".sha256"
_CHECKSUM_LINE = re.compile(r"^\s*([0-9a-fA-F]{64})(?:\s|$)")  # sha256sum's line, or the bare digest
_WRITTEN: dict[str, tuple] = {}  # what this process wrote or verified: path -> (stat identity, digest)


def checksum_path(path: str | os.PathLike) -> Path:
    """``last.pt`` -> ``last.pt.sha256`` (one ``sha256sum`` line: ``sha256sum -c`` checks it)."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksum(path: str | os.PathLike) -> str | None:
    """The sha256 recorded beside ``path``: None without a checksum file, ``""`` for one that cannot be read."""
    try:
        text = checksum_path(path).read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    match = _CHECKSUM_LINE.match(text)
    return match.group(1).lower() if match else ""


def write_checksum(path: str | os.PathLike, digest: str) -> Path:
    path = Path(path)
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")
    _remember(path, digest)
    return checksum_path(path)


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns  # not ctime: hard-linking the file changes it


def _remember(path: Path, digest: str) -> None:
    try:
        _WRITTEN[str(Path(path).absolute())] = (_identity(path), digest)
    except OSError:
        pass


def checkpoint_problem(path: str | os.PathLike, trust_own_writes: bool = False) -> str | None:
    """Why ``path``'s content does not match its checksum file (None: it matches, or it has none).

    A checkpoint is replaced by a rename while others may read it, and its checksum file is removed
    just before (and written just after): a mismatch is re-checked against a checksum file that changed
    meanwhile. ``trust_own_writes``: a file this process wrote (or verified) and nobody replaced since
    (same inode, size and times) is not read again.
    """
    path = Path(path)
    for _ in range(3):
        expected = read_checksum(path)
        if expected is None:
            return None
        if expected == "":
            if _run_of(path) is None:
                return None  # someone else's NAME.sha256 in a format we do not know: not ours to judge by
            return f"its checksum file {checksum_path(path).name} is unreadable, so its content cannot be trusted"
        actual = None
        if trust_own_writes:
            known = _WRITTEN.get(str(path.absolute()))
            try:
                if known is not None and known[0] == _identity(path):
                    actual = known[1]
            except OSError:
                pass
        if actual is None:
            try:
                actual = file_sha256(path)
            except FileNotFoundError:
                continue  # replaced right now: look again
        if actual == expected:
            _remember(path, actual)
            return None
        if read_checksum(path) == expected:
            size = path.stat().st_size
            since = "after sdtl wrote it" if _run_of(path) is not None else "since its checksum was recorded"
            return (f"checksum mismatch: {checksum_path(path).name} records sha256 {expected[:12]}..., the file "
                    f"({size} bytes) has {actual[:12]}...: it was truncated or corrupted {since}")
    return None  # rewritten three times while being checked: a live run's file, complete (renames are atomic)


def safe_load(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """Load a checkpoint file onto the CPU without running arbitrary code.

    A folder is read as a Hugging Face ``save_pretrained`` folder (:func:`_load_hf_folder`).
    ``.safetensors`` files (also recognised by content) are read with safetensors; everything else
    with ``torch.load(weights_only=True, map_location="cpu")``. A file that needs full unpickling
    raises :class:`~sdtl.errors.CheckpointError` unless ``allow_unsafe_pickle`` is true, in which case
    it is loaded with ``weights_only=False`` and an :class:`UnsafePickleWarning` is emitted. Missing, empty,
    truncated or non-checkpoint files raise :class:`~sdtl.errors.CheckpointError` naming the path, and so
    does a file whose checksum file (``NAME.sha256``, written beside every checkpoint of a run) does
    not match it; the error's ``reason`` says why without the path.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path", path=path)
    if path.is_dir():
        return _load_hf_folder(path)
    problem = checkpoint_problem(path)  # only files with a checksum beside them (those sdtl runs write)
    if problem is not None:
        raise _bad_file(path, problem)
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = _needs_full_unpickling(path, exc)
        if why is None:
            raise _unreadable(path, exc) from exc
        if not allow_unsafe_pickle:
            raise CheckpointError(
                f"{path}: refused to load: {why}, so reading it needs full unpickling, which can run "
                "arbitrary code (sdtl loads checkpoints with torch.load(weights_only=True) only); if you "
                "trust where this file came from, allow it: allow_unsafe_pickle=True (config key "
                "model.allow_unsafe_pickle=true for sdtl finetune/pretrain, `--allow-unsafe-pickle` of sdtl "
                "inspect/export/evaluate); or re-save its tensors as a plain state dict or .safetensors",
                path=path,
            ) from exc
        warnings.warn(
            f"{path}: loading with FULL UNPICKLING (weights_only=False) because allow_unsafe_pickle is set "
            f"({why}); this runs any code the file contains - only do this for trusted files",
            UnsafePickleWarning,
            stacklevel=2,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - reported as the user's file problem
            raise _unreadable(path, exc2) from exc2
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/EOFError/KeyError/... for bad files
        raise _unreadable(path, exc) from exc


HF_CONFIG_KEY = "hf_config"  # what _load_hf_folder returns: {"hf_config": config.json, "state_dict": tensors}


def _load_hf_folder(path: Path) -> dict[str, Any]:
    """A Hugging Face ``save_pretrained`` folder: ``config.json`` plus ``model.safetensors`` (or the shards
    a ``model.safetensors.index.json`` lists), read without ``transformers``. Pickled
    ``pytorch_model.bin`` folders are refused (re-save them with ``safe_serialization=True``)."""
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: is a directory without config.json, so not a Hugging Face model folder; "
                              "name the checkpoint file inside it, or the folder `save_pretrained` wrote", path=path)
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_file}: not readable JSON ({exc}); re-save the model", path=config_file) from exc
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif index.is_file():
        try:
            files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc}); re-save the model", path=index) from exc
    else:
        raise CheckpointError(f"{path}: Hugging Face folder without model.safetensors (pickled pytorch_model.bin "
                              "files are not read); re-save it with save_pretrained(..., safe_serialization=True)",
                              path=path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {index.name} but missing; copy the whole folder", path=file)
        state.update(_load_safetensors(file))
    return {HF_CONFIG_KEY: config, "state_dict": state}


# ----------------------------------------------------------------------------------------------
# Formats and backbone extraction


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove DDP's ``module.`` prefix when every key has it (a partial prefix is left for the error)."""
    keys = list(state)
    if keys and all(isinstance(k, str) and k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _unwrap_state_dict(obj: Any) -> dict[str, Any] | None:
    """The tensor dict of a plain checkpoint: ``obj["state_dict"]``, ``obj["model"]`` or ``obj`` itself."""
    if not isinstance(obj, Mapping):
        return None
    for candidate in (obj.get("state_dict"), obj.get("model"), obj):
        if _is_tensor_dict(candidate):
            return _strip_module(candidate)
    return None


def _looks_torchvision(state: Mapping[str, Any]) -> bool:
    return any(k.startswith("stem.0.") for k in state) and any(k.startswith("layer1.0.") for k in state)


def detect_format(obj: Any) -> str:
    """Which kind of checkpoint ``obj`` (a loaded file) is: one of :data:`FORMATS`."""
    if not isinstance(obj, Mapping):
        return "unknown"
    if "sdtl_format" in obj:
        return {"finetune": "sdtl-finetune", "pretrain": "sdtl-pretrain"}.get(obj["sdtl_format"], "unknown")
    model = obj.get("model")
    if isinstance(model, Mapping) and any(
        isinstance(k, str) and _strip_prefix_once(k, "module.").startswith(RSPNET_BACKBONE_PREFIX) for k in model
    ):
        return "rspnet"
    state = _unwrap_state_dict(obj)
    if state is None:
        return "unknown"
    return "torchvision" if _looks_torchvision(state) else "state_dict"


def _strip_prefix_once(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _group(key: str) -> str:
    """A short name for a family of ignored keys (``encoder_k.encoder.*``, ``queue``)."""
    parts = key.split(".")
    return key if len(parts) <= 2 else ".".join(parts[:2]) + ".*"


def _encoder_options(arch: Any, options: Any) -> dict[str, Any]:
    """The recorded ``arch_options`` that concern the encoder (payloads may also hold e.g. ``dropout``)."""
    options = dict(options or {})
    if arch not in specs():
        return options
    valid = arch_option_names(arch)
    return {k: v for k, v in options.items() if k in valid}


@dataclass
class _Extraction:
    format: str
    state: dict[str, Any]
    ignored: dict[str, int] = field(default_factory=dict)
    recorded_arch: str | None = None
    recorded_options: dict[str, Any] | None = None


def _count_ignored(keys, ignored: dict[str, int], name=_group) -> None:
    for key in keys:
        group = name(key)
        ignored[group] = ignored.get(group, 0) + 1


def _extract(obj: Any, arch: str | None, source: str = "checkpoint") -> _Extraction:
    fmt = detect_format(obj)
    ignored: dict[str, int] = {}
    spec = specs().get(arch) if arch else None
    if fmt not in ("rspnet", "sdtl-finetune", "sdtl-pretrain") and spec is not None and spec.adapt_checkpoint:
        adapted = spec.adapt_checkpoint(obj, source=source)  # a foreign layout of this arch (release file, HF folder)
        if adapted is not None:
            return _Extraction(adapted[0], adapted[1], adapted[2])
    if fmt == "rspnet":
        model = _strip_module(obj["model"])
        state = {}
        for key, value in model.items():
            if key.startswith(RSPNET_BACKBONE_PREFIX):
                state[key[len(RSPNET_BACKBONE_PREFIX):]] = value
            else:  # encoder_k (momentum encoder), fc1/fc2 (projection heads), queue, queue_ptr
                _count_ignored([key], ignored)
        drop = [k for k in state if k.startswith("linear.")]  # the pre-training classifier, [1, 512]
        for key in drop:
            del state[key]
        if drop:
            ignored[RSPNET_BACKBONE_PREFIX + "linear.*"] = len(drop)
        return _Extraction(fmt, state, ignored, recorded_arch=None)
    if fmt == "sdtl-finetune":
        model = obj.get("model")
        if not isinstance(model, Mapping):
            raise CheckpointError(f"{source}: sdtl fine-tune checkpoint without a 'model' state dict; re-save it",
                                  path=source)
        state = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
        _count_ignored([k for k in model if not k.startswith("encoder.")], ignored, lambda k: k.split(".")[0] + ".*")
        arch_name = obj.get("arch")
        return _Extraction(fmt, state, ignored, arch_name, _encoder_options(arch_name, obj.get("arch_options")))
    if fmt == "sdtl-pretrain":
        encoder = obj.get("encoder")
        if not isinstance(encoder, Mapping):
            raise CheckpointError(f"{source}: sdtl pre-train checkpoint without an 'encoder' state dict; "
                                  f"re-save it", path=source)
        if obj.get("head") is not None:
            ignored["head (pre-training task head)"] = len(obj["head"]) if isinstance(obj["head"], Mapping) else 1
        arch_name = obj.get("arch")
        return _Extraction(fmt, dict(encoder), ignored, arch_name, _encoder_options(arch_name, obj.get("arch_options")))
    state = _unwrap_state_dict(obj)
    if state is None:
        kind = type(obj).__name__
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else ""
        raise CheckpointError(
            f"{source}: no weights found (a {kind}{' with keys ' + keys if keys else ''}); expected an "
            "RSPNet, torchvision, sdtl or plain state-dict checkpoint",
            path=source,
        )
    if state and all(k.startswith(("encoder.", "head.")) for k in state) and any(k.startswith("encoder.") for k in state):
        # A bare VideoClassifier state dict: its encoder part is the backbone, its head is not.
        _count_ignored([k for k in state if k.startswith("head.")], ignored, lambda k: "head.*")
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    # The source model's own classifier inside an otherwise matching backbone (RSPNet's ``linear``,
    # torchvision's ``fc`` / ``head``): dropped, never loaded into the sdtl head.
    prefixes = spec.source_classifier if spec is not None and spec.source_classifier else ("linear.", "fc.")
    drop = [k for k in state if k.startswith(prefixes)]
    _count_ignored(drop, ignored, lambda k: k.split(".")[0] + ".* (source classifier)")
    for key in drop:
        del state[key]
    return _Extraction(fmt, state, ignored)


def extract_backbone_state(obj: Any, arch: str | None = None) -> dict[str, torch.Tensor]:
    """The encoder state dict inside a loaded checkpoint ``obj``, with every wrapping removed.

    RSPNet: ``encoder_q.encoder.*`` minus ``linear.*``; sdtl fine-tune: ``model["encoder.*"]``;
    sdtl pre-train: ``encoder``; plain/torchvision: the tensor dict minus ``module.`` and minus the
    source classifier of ``arch`` (``linear.*`` for c3d/r2plus1d_vcop, ``fc.*`` for torchvision archs).
    Keys are *not* checked here; :func:`load_encoder_weights` does that strictly.
    """
    return _extract(obj, arch).state


# ----------------------------------------------------------------------------------------------
# Strict loading


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` loaded."""

    source: str
    format: str
    arch: str | None
    num_tensors: int
    num_parameters: int
    ignored: dict[str, int] = field(default_factory=dict)
    filled_defaults: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"loaded {self.num_tensors} encoder tensors ({self.num_parameters:,} parameters) from {self.source} "
            f"(format {self.format}, arch {self.arch})"
        )
        if self.ignored:
            text += "; ignored " + ", ".join(f"{name} ({count})" for name, count in self.ignored.items())
        if self.filled_defaults:
            text += f"; {len(self.filled_defaults)} BatchNorm num_batches_tracked absent from the file kept at their defaults"
        return text

    __str__ = summary


def _num_parameters(state: Mapping[str, Any]) -> int:
    return sum(
        v.numel() for k, v in state.items() if isinstance(v, torch.Tensor) and not k.endswith(_BN_BUFFERS)
    )


def _shape(value: Any) -> str:
    return "x".join(map(str, value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _check_fit(state: dict[str, Any], module: nn.Module, *, source: str, fmt: str, what: str, hint: str = "") -> list[str]:
    """Raise CheckpointError unless ``state`` fits ``module`` exactly; return the tolerated missing BN counters."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    filled = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in filled]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        k
        for k in state
        if k in expected and (not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source}: does not fit {what} (detected checkpoint format: {fmt})"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            shown = [f"{k} (file {_shape(state[k])} vs model {_shape(expected[k])})" for k in mismatched]
            parts.append(f"{len(mismatched)} shape-mismatched key(s): {_listing(shown)}")
        guess = guess_arch(state)
        if guess is not None:
            keys = " ".join([f"model.arch={guess[0]}"] + [f"model.{k}={v}" for k, v in sorted(guess[1].items())])
            parts.append(f"the weights look like arch {_format_arch(*guess)}: use it with `{keys}` "
                         f"(config keys of finetune/pretrain) or `--arch {guess[0]}` (sdtl inspect/export)")
        if hint:
            parts.append(hint)
        raise CheckpointError("; ".join(parts), path=source)
    return filled


def _format_arch(arch: str, options: Mapping[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{arch!r}" + (f" ({opts})" if opts else "")


def _encoder_arch(encoder: nn.Module, arch: str | None) -> tuple[str | None, dict[str, Any]]:
    return arch or getattr(encoder, "sdtl_arch", None), dict(getattr(encoder, "sdtl_arch_options", {}) or {})


def load_encoder_weights(
    encoder: nn.Module,
    path_or_obj: str | os.PathLike | Mapping,
    arch: str | None = None,
    allow_unsafe_pickle: bool = False,
) -> LoadReport:
    """Load a checkpoint's backbone into ``encoder`` strictly and say what was loaded.

    ``path_or_obj`` is a file (read with :func:`safe_load`) or an already-loaded checkpoint.
    ``arch`` is the encoder's arch name (default: the ``sdtl_arch`` that ``build_encoder`` recorded),
    used in messages and to drop the right source classifier. Any missing, unexpected or
    shape-mismatched key raises :class:`~sdtl.errors.CheckpointError`; ``encoder`` is unchanged in that case.
    Pass ``model.encoder`` for a :class:`VideoClassifier`: the head is never touched.
    """
    if isinstance(encoder, VideoClassifier):
        raise TypeError("load_encoder_weights(model.encoder, ...): pass the encoder, not the VideoClassifier")
    if isinstance(path_or_obj, (str, os.PathLike)):
        obj = safe_load(path_or_obj, allow_unsafe_pickle=allow_unsafe_pickle)
        return _load_encoder(encoder, obj, arch, str(path_or_obj))
    return _load_encoder(encoder, path_or_obj, arch, "checkpoint object")


def _load_encoder(encoder: nn.Module, obj: Any, arch: str | None, source: str) -> LoadReport:
    arch, options = _encoder_arch(encoder, arch)
    extraction = _extract(obj, arch, source)
    what = f"arch {_format_arch(arch, options)}" if arch else f"encoder {type(encoder).__name__}"
    hint = ""
    if extraction.recorded_arch is not None:
        recorded = _format_arch(extraction.recorded_arch, extraction.recorded_options or {})
        hint = f"the checkpoint records arch {recorded}"
        if arch and extraction.recorded_arch != arch:
            raise CheckpointError(
                f"{source}: is an {extraction.format} checkpoint of arch {recorded}, but the model is arch "
                f"{_format_arch(arch, options)}; use the same arch (and options) it was trained with",
                path=source,
            )
    filled = _check_fit(extraction.state, encoder, source=source, fmt=extraction.format, what=what, hint=hint)
    state = dict(extraction.state)
    current = encoder.state_dict()
    for key in filled:
        state[key] = current[key]
    encoder.load_state_dict(state, strict=True)
    return LoadReport(
        source=source,
        format=extraction.format,
        arch=arch,
        num_tensors=len(extraction.state),
        num_parameters=_num_parameters(extraction.state),
        ignored=extraction.ignored,
        filled_defaults=filled,
    )


# ----------------------------------------------------------------------------------------------
# Guessing the arch of a bare state dict


def _shapes_match(state: Mapping[str, Any], arch: str, options: dict[str, Any]) -> bool:
    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            expected = build_encoder(arch, **options).state_dict()
    except UserError:
        return False
    given = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    required = {k for k in expected if not k.endswith("num_batches_tracked")}
    if not required <= set(given) or not set(given) <= set(expected):
        return False
    return all(given[k].shape == expected[k].shape for k in given)


def guess_arch(state: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(arch, options)`` whose encoder has exactly the keys and shapes of ``state``, else None."""
    for arch, spec in specs().items():
        probes = spec.width_probes
        if not probes:
            for options in [{}] + [{"variant": name} for name in spec.variants]:  # the published size, then variants
                if _shapes_match(state, arch, options):
                    return arch, options
            continue
        candidates: list[float] = []
        for key, reference in probes:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                raw = value.shape[0] / reference
                candidates += [raw, round(raw, 2), round(raw, 3)]
        for width in dict.fromkeys(candidates):  # ordered, deduplicated
            if width > 0 and _shapes_match(state, arch, {"width": width}):
                return arch, {"width": width}
    return None


# ----------------------------------------------------------------------------------------------
# Saving


_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)


def _check_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Refuse payloads that ``torch.load(weights_only=True)`` could not read back.

    Exact types on purpose: subclasses (namedtuple, defaultdict, numpy scalars, enums, Path) are
    pickled by class reference, which is exactly what weights-only loading refuses.
    """
    kind = type(obj)
    if kind in _SAFE_LEAVES or kind in (torch.Tensor, nn.Parameter):
        return
    if kind in (dict, OrderedDict):
        for key, value in obj.items():
            _check_weights_only_safe(key, f"{where} key {key!r}")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set, frozenset):
        for index, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{index}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot "
        "read back; store plain Python values (str, int, float, list, dict) or tensors instead"
    )


# The write-to-temp, fsync, rename pattern lives in sdtl.atomic (shared by every writer of run files).
_atomic_write = atomic_write


def save_checkpoint(obj: Any, path: str | os.PathLike, checksum: bool = False) -> Path:
    """Save ``obj`` with ``torch.save`` atomically: a crash leaves either the old file or the new one.

    ``torch.save`` writes through a file object of :mod:`sdtl.atomic`, so a full disk raises
    :class:`~sdtl.errors.NoSpaceError` naming ``path`` (not torch's ``unexpected pos``), with no temp
    file left. ``checksum``: also write ``NAME.sha256`` (sha256 of the bytes written) after it; the
    old checksum file is removed just before the rename, so a crash never pairs a file with another's
    checksum. Raises ``TypeError`` (a programming error) if ``obj`` holds anything that
    ``torch.load(weights_only=True)`` would refuse, so every sdtl checkpoint stays safely loadable.
    """
    _check_weights_only_safe(obj)
    path = Path(path)
    stale = (lambda: checksum_path(path).unlink(missing_ok=True)) if checksum else None
    digest = atomic_write_stream(path, lambda handle: torch.save(obj, handle), before_replace=stale)
    if checksum:
        write_checksum(path, digest)
    return path


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` becomes a copy of checkpoint ``src`` (a hard link where the filesystem has them: checkpoints
    are only ever replaced by a rename, never changed in place), atomically, with ``src``'s checksum
    file, if any. ``src`` must match its checksum (a :class:`~sdtl.errors.CheckpointError` otherwise):
    a corrupted file never gets a valid checksum by being copied."""
    src, dst = Path(src), Path(dst)
    problem = checkpoint_problem(src, trust_own_writes=True)
    if problem is not None:
        raise _bad_file(src, problem)
    digest = read_checksum(src)
    checksum_path(dst).unlink(missing_ok=True)  # never a moment with dst's new content and its old checksum
    atomic_link(src, dst)
    if digest:
        write_checksum(dst, digest)
    return dst


def export_encoder(
    model_or_encoder: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the encoder's state dict alone (no head), atomically.

    ``.safetensors`` -> safetensors (with ``arch``/``arch_options`` metadata when known); any other
    suffix -> a plain ``torch.save`` state dict. Both load back with :func:`load_encoder_weights`.
    """
    encoder = model_or_encoder.encoder if isinstance(model_or_encoder, VideoClassifier) else model_or_encoder
    # clone + contiguous: safetensors refuses shared or strided storage; also detaches from the live model.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in encoder.state_dict().items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        info = {"sdtl_format": "encoder", "version": str(SDTL_FORMAT_VERSION)}
        if getattr(encoder, "sdtl_arch", None):
            info["arch"] = encoder.sdtl_arch
            info["arch_options"] = json.dumps(getattr(encoder, "sdtl_arch_options", {}) or {})
        info.update(metadata or {})
        return _atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=info))
    return save_checkpoint(state, path)


# ----------------------------------------------------------------------------------------------
# sdtl fine-tune checkpoints and inspection


def build_model_from_checkpoint(
    path: str | os.PathLike, allow_unsafe_pickle: bool = False
) -> tuple[VideoClassifier, dict[str, Any]]:
    """Rebuild the :class:`VideoClassifier` saved in an sdtl fine-tune checkpoint and load it strictly.

    Arch, options and number of classes come from the payload, so evaluation needs no other flags.
    ``arch_options`` may include ``dropout`` next to the encoder options. Returns ``(model, payload)``
    with the model in eval mode on the CPU and ``model.class_names`` set.
    """
    payload = safe_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    fmt = detect_format(payload)
    if fmt != "sdtl-finetune":
        raise CheckpointError(
            f"{path}: is a {fmt} checkpoint, not an sdtl fine-tune checkpoint (the output of `sdtl finetune`); "
            "to start from pre-trained weights use it as the model's pretrained checkpoint instead",
            path=path,
        )
    for key in ("arch", "num_classes", "model"):
        if key not in payload:
            raise CheckpointError(f"{path}: sdtl fine-tune checkpoint lacks '{key}'; it is incomplete - re-save it",
                                  path=path)
    options = dict(payload.get("arch_options") or {})  # encoder options, plus dropout when the engine records it
    model = build_model(payload["arch"], int(payload["num_classes"]), **options)
    state = dict(payload["model"])
    what = f"arch {_format_arch(payload['arch'], options)} with {payload['num_classes']} classes"
    filled = _check_fit(state, model, source=str(path), fmt=fmt, what=what)
    current = model.state_dict()
    for key in filled:
        state[key] = current[key]
    model.load_state_dict(state, strict=True)
    model.class_names = list(payload.get("class_names") or [])
    return model.eval(), payload


def _count_tensors(obj: Any) -> tuple[int, int]:
    """(number of tensors, number of elements) anywhere in a loaded checkpoint."""
    if isinstance(obj, torch.Tensor):
        return 1, obj.numel()
    if isinstance(obj, Mapping):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    else:
        return 0, 0
    count = elements = 0
    for item in items:
        c, e = _count_tensors(item)
        count, elements = count + c, elements + e
    return count, elements


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else f"tensor {_shape(value)}"
    if isinstance(value, (list, tuple)) and depth < 2 and len(value) <= 200:
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, Mapping) and depth < 2 and len(value) <= 50:
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    return f"<{type(value).__name__}{f' of {len(value)}' if hasattr(value, '__len__') else ''}>"


_METADATA_KEYS = (
    "sdtl_format", "version", "arch", "arch_options", "task", "num_classes", "class_names", "epoch", "step_in_epoch",
    "best_loss", "best_acc", "best_metric", "metrics",
)  # fmt: skip


def describe_checkpoint(
    path: str | os.PathLike, arch: str | None = None, allow_unsafe_pickle: bool = False
) -> dict[str, Any]:
    """Everything ``sdtl inspect`` shows, as a JSON-serialisable dict.

    Keys: ``path``, ``file_bytes``, ``format``, ``metadata`` (epoch, stored arch, options, classes, ...),
    ``top_level_keys`` (first 30), ``num_top_level_keys``, ``file_tensors``, ``backbone`` (tensors / parameters / ignored groups, or
    ``error``), ``arch_guess`` (``{"arch", "options"}`` from key names and shapes, or None), and with
    ``arch`` given, ``loads_into`` = ``{"arch", "options", "ok", "error", "num_tensors"}``. Options for that
    check come from the checkpoint's record, else from the guess when it names the same arch.
    """
    path = Path(path)
    obj = safe_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    fmt = detect_format(obj)
    info: dict[str, Any] = {"path": str(path), "file_bytes": path.stat().st_size, "format": fmt}
    if isinstance(obj, Mapping):
        info["metadata"] = {k: _jsonable(obj[k]) for k in _METADATA_KEYS if k in obj}
        info["top_level_keys"] = [str(k) for k in list(obj)[:30]]
        info["num_top_level_keys"] = len(obj)
    else:
        info["metadata"], info["top_level_keys"], info["num_top_level_keys"] = {}, [], 0
    if _is_safetensors(path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored = handle.metadata() or {}
        info["metadata"].update(stored)
        if "arch_options" in stored:
            try:
                info["metadata"]["arch_options"] = json.loads(stored["arch_options"])
            except ValueError:
                pass
    info["file_tensors"], _ = _count_tensors(obj)
    extraction = None
    try:
        extraction = _extract(obj, arch, str(path))
        info["backbone"] = {
            "num_tensors": len(extraction.state),
            "num_parameters": _num_parameters(extraction.state),
            "ignored": extraction.ignored,
        }
        guess = guess_arch(extraction.state)
        info["arch_guess"] = {"arch": guess[0], "options": guess[1]} if guess else None
    except UserError as exc:
        info["backbone"] = {"error": str(exc)}
        info["arch_guess"] = None
    if arch is not None:
        options: dict[str, Any] = {}
        if extraction is not None and extraction.recorded_arch == arch:
            options = dict(extraction.recorded_options or {})
        elif info["arch_guess"] and info["arch_guess"]["arch"] == arch:
            options = dict(info["arch_guess"]["options"])
        result = {"arch": arch, "options": options, "ok": False, "error": None, "num_tensors": 0}
        try:
            encoder = build_encoder(arch, **options)
            report = _load_encoder(encoder, obj, arch, str(path))
            result.update(ok=True, num_tensors=report.num_tensors)
        except UserError as exc:
            result["error"] = str(exc)
        info["loads_into"] = result
    return info
