"""One typed configuration for a fine-tuning or pre-training run.

A run is described by nested dataclasses (data, model, optim, regularizer, eval, run), read from a
YAML recipe and overridden with ``section.key=value`` (``--set`` on the command line). Every key is
checked against the dataclass: an unknown key, a wrong type or a value out of range is a
:class:`~sdtl.errors.ConfigError` whose ``key`` is the dotted key,
so a typo can never be silently ignored. The effective config is written next to the run
(``OUT/config.yaml``) and stored in every checkpoint, which is what makes a result reproducible.

Recipes (``src/sdtl/recipes/*.yaml``) are plain YAML files with the same keys; there is no
inheritance between them, so what a recipe says is all it does.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sdtl.atomic import atomic_write_text
from sdtl.errors import ConfigError, UserError
from sdtl.models.spec import IMAGENET_MEAN, IMAGENET_STD
from sdtl.pretext import registry as pretext_registry
from sdtl.regularizers import registry
from sdtl.regularizers.section import RegularizerConfig


@dataclass
class DataConfig:
    """Where the labelled videos are and how clips are cut from them."""

    dataset: str = "synthetic"  # ucf101 | hmdb51 | kinetics400 | folder | csv | synthetic
    root: str = ""  # dataset root (for synthetic: the folder `sdtl synth` wrote)
    split: int = 1  # official split 1..3 (kinetics400 has one: 1)
    lists_dir: str | None = None  # your own split lists instead of the shipped official ones
    on_missing: str = "error"  # error | skip: files named in the lists but absent on disk
    clip_len: int | None = None  # frames per clip; unset = the encoder's (EncoderSpec.input)
    stride: int = 1
    size: int | None = None  # spatial crop side; unset = the encoder's
    mean: list[float] | None = None  # input normalisation; unset = the encoder's (its weights' statistics)
    std: list[float] | None = None
    crop_area: list[float] = field(default_factory=lambda: [0.25, 1.0])  # random-crop area range (train)
    val_fraction: float = 0.1  # held out of the training list for model selection (stratified)
    batch_size: int = 8  # per process; the total batch is batch_size x world size
    workers: int = 2
    prefetch_factor: int = 4  # batches each (persistent) worker prepares ahead
    backend: str = "auto"  # auto | pyav | torchcodec
    max_corrupt_fraction: float = 0.01  # stop when more training samples than this fail to decode


@dataclass
class ModelConfig:
    """Which encoder, at which width, initialised from which checkpoint."""

    arch: str = "r2plus1d_vcop"
    width: float = 1.0  # channel multiplier of sdtl-built encoders (1 = the reference layout)
    variant: str = ""  # "" = the published size; "tiny" = a CPU test size of the modern encoders
    drop_path: float = 0.0  # stochastic depth of transformer encoders (linear over depth where they do so)
    grad_checkpointing: bool = False  # activation checkpointing per transformer block: memory for compute
    dropout: float = 0.0  # before the linear head
    pretrained: str | None = None  # encoder checkpoint (RSPNet, torchvision, sdtl pretrain, ...)
    allow_unsafe_pickle: bool = False  # load a checkpoint that needs full unpickling (trusted files only)


@dataclass
class OptimConfig:
    """SGD with momentum (the paper's) or AdamW, and a per-epoch learning-rate schedule."""

    name: str = "sgd"  # sgd | adamw
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | multistep | constant
    min_lr_ratio: float = 1e-3  # cosine decays to lr * min_lr_ratio (RSPNet: lr / 1000)
    milestones: list[int] = field(default_factory=list)  # multistep epochs
    gamma: float = 0.1  # multistep factor
    warmup_epochs: int = 0  # linear warm-up from lr / (warmup_epochs + 1)
    head_lr_mult: float = 1.0  # learning-rate multiplier for the linear head
    label_smoothing: float = 0.0  # of the cross-entropy (fine-tuning)
    lp_epochs: int = 0  # LP-FT: train the head alone (encoder frozen, BN in eval) for the first N epochs
    layer_decay: float = 1.0  # layer-wise lr decay: stage i of L gets lr * d^(L+1-i), the head lr (1 = off)
    grad_clip: float | None = None  # max gradient norm; off by default
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16 + loss scaling; fp32 on CPU) | off | bf16 | fp16
    fused: str = "auto"  # auto (fused optimizer step on CUDA) | on | off


@dataclass
class EvalConfig:
    """Test protocol and model selection."""

    num_clips: int = 10  # clips per test video, starts uniformly spread
    crops: int = 1  # 1 (centre) or 3 spatial crops
    val_clips: int = 3  # clips per validation video during training
    select: str = "val_video_acc1"  # metric that picks the best checkpoint
    every: int = 1  # validate every N epochs (and always at the last)
    skip_corrupt: bool = False  # test: skip undecodable videos instead of refusing
    probe_videos: int = 32  # fixed probe clips for the forgetting diagnostics
    retention: str | None = None  # retention_probe.pt of the pre-training: frozen pretext head's accuracy per epoch
    batch_size: int = 0  # 0 = same as data.batch_size


@dataclass
class RunConfig:
    """Everything about running rather than learning."""

    seed: int = 0
    deterministic: bool = False  # deterministic kernels; with it a resumed CPU run is bit-exact
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    progress: bool = True  # per-epoch progress bar
    tensorboard: bool = True  # kept for old recipes: false turns TensorBoard off even when run.trackers names it
    # Where the per-epoch metrics also go (sdtl.engine.trackers): tensorboard (OUT/tb), mlflow, wandb.
    # mlflow and wandb are optional extras: pip install 'sdtl[mlflow]' / 'sdtl[wandb]'.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    mlflow_uri: str = ""  # "" = $MLFLOW_TRACKING_URI if set, else a SQLite store in the run (OUT/mlflow.db)
    mlflow_experiment: str = "sdtl"
    wandb_project: str = "sdtl"
    wandb_mode: str = "auto"  # auto (online with $WANDB_API_KEY, $WANDB_MODE if set, else offline) | offline | online
    channels_last: str = "auto"  # auto (channels_last_3d on CUDA) | on | off: memory format of model and clips
    cudnn_benchmark: bool = True  # cuDNN autotuning (CUDA; never with deterministic)
    compile: bool = False  # torch.compile the model (pays off on long runs; first steps are slow)
    compile_backend: str = "inductor"  # torch.compile backend (e.g. inductor, cudagraphs, aot_eager, eager)
    # Mid-epoch checkpoints (last.pt) every N optimizer steps and/or every M minutes; 0 = only at epoch ends.
    # A stop request (SIGINT, SIGTERM, SIGUSR1) always writes one, whatever these say.
    checkpoint_every_steps: int = 0
    checkpoint_every_minutes: float = 0.0


@dataclass
class SlurmConfig:
    """Resources of a ``--slurm`` job (sbatch options, through submitit). Where a run executes, not what
    it computes: never part of a run's identity (a resume or a sweep may change it freely)."""

    nodes: int = 1
    gpus_per_node: int = 1  # 0: a CPU job
    tasks_per_node: int = 0  # processes (ranks) per node; 0 = one per GPU, or 1 without GPUs
    cpus_per_task: int = 8
    mem: str = ""  # per node, sbatch's --mem syntax ("64G", "500M"); "" = the cluster's default
    time: str = "24:00:00"  # [D-]HH:MM:SS, HH:MM:SS, MM:SS or minutes; a requeued job gets it again
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    extra: list[str] = field(default_factory=list)  # more sbatch options: ["exclusive", "mail-type=END"]
    setup: list[str] = field(default_factory=list)  # shell lines run first in the job ("module load ...")
    signal_delay_s: int = 120  # SIGUSR1 this long before the time limit: write the state and requeue
    max_requeues: int = 20  # requeues after preemption / time limit before the job gives up
    array_parallelism: int = 16  # `sweep --slurm`: jobs of the array running at once
    job_name: str = ""  # "" = sdtl-<command>-<name of --out>


#: config sections that say where a run executes, not what it computes: left out of a run's identity
NOT_IDENTITY = ("slurm",)


@dataclass
class FinetuneConfig:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class PretrainDataConfig:
    """Unlabelled videos for self-supervised pre-training."""

    root: str = ""  # a folder searched recursively for videos, or the folder `sdtl synth` wrote
    list_file: str | None = None  # optional text file of video paths relative to root
    clip_len: int | None = None  # unset = the encoder's (EncoderSpec.input)
    size: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_area: list[float] = field(default_factory=lambda: [0.25, 1.0])  # random-crop area range
    batch_size: int = 16
    workers: int = 2
    prefetch_factor: int = 4
    backend: str = "auto"
    max_corrupt_fraction: float = 0.01


#: the ``task`` section: ``name`` and every registered pretext task's keys, flat (derived from
#: :data:`sdtl.pretext.registry.PRETEXT`; each task's options dataclass checks and describes itself)
PretrainTaskConfig = pretext_registry.section_class(__name__)


@dataclass
class PretrainConfig:
    description: str = ""
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    task: PretrainTaskConfig = field(default_factory=PretrainTaskConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


KINDS = {"finetune": FinetuneConfig, "pretrain": PretrainConfig}

# Allowed values of string options, checked up front so a typo fails before any work starts. The
# `regularizer` section's (name, and each method's option choices) come from the registry: choices_for.
CHOICES = {
    "data.dataset": ("ucf101", "hmdb51", "kinetics400", "folder", "csv", "synthetic"),
    "data.on_missing": ("error", "skip"),
    "data.backend": ("auto", "pyav", "torchcodec"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "multistep", "constant"),
    "optim.amp": ("auto", "off", "bf16", "fp16"),
    "optim.fused": ("auto", "on", "off"),
    "run.channels_last": ("auto", "on", "off"),
    "run.trackers": ("tensorboard", "mlflow", "wandb"),  # a list: each item one of these
    "run.wandb_mode": ("auto", "offline", "online"),
    "eval.select": ("val_video_acc1", "val_clip_acc1", "val_mean_class_acc", "val_loss", "last"),
    "run.device": ("auto", "cpu", "cuda"),
}


def choices_for(section_key: str) -> tuple | None:
    """Allowed values of ``section.key`` (None: any)."""
    section, _, key = section_key.partition(".")
    if section == "regularizer":
        return registry.choices().get(key)
    if section_key == "task.name":
        return pretext_registry.names()
    return CHOICES.get(section_key)


# --------------------------------------------------------------------------------------- loading
def recipe_dir() -> Path:
    return Path(str(resources.files("sdtl") / "recipes"))


def list_recipes() -> list[dict]:
    """Name, kind and description of every shipped recipe."""
    out = []
    for path in sorted(recipe_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        out.append({"name": path.stem, "kind": raw.get("kind", "finetune"),
                    "description": raw.get("description", ""), "path": str(path)})
    return out


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = recipe_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            names = ", ".join(r["name"] for r in list_recipes())
            raise UserError(f"config {name_or_path}: no such recipe or file; "
                            f"use one of: {names} (see `sdtl recipes`) or a path to a YAML file")
    elif not path.exists():
        raise UserError(f"config {name_or_path}: file not found; give a YAML path or a recipe name")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config {path}: not valid YAML ({exc}); fix the file") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config {path}: expected a mapping of sections at the top level")
    return raw, str(path)


def parse_overrides(items: list[str] | None) -> dict:
    """``["optim.lr=0.01", "model.arch=c3d"]`` -> nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
        key, _, value = item.partition("=")
        key = key.strip()
        if not key:
            raise UserError(f"override {item!r}: empty key; expected section.key=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        node = nested
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"set both as a value and as a section (override {item!r})",
                                  "set either the section's keys or the value, not both")
        node[parts[-1]] = parsed
    return nested


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(name_or_path: str, overrides: list[str] | None = None, kind: str = "finetune"):
    """Read a recipe or YAML file, apply ``overrides`` (``["optim.lr=0.01", ...]``) and validate the
    types and choices (:func:`validate_ranges` checks the values). Bad input raises
    :class:`~sdtl.errors.ConfigError` naming the key, or :class:`~sdtl.errors.UserError` for the file."""
    raw, source = _read_yaml(name_or_path)
    raw.pop("decoder", None)  # informational lines of a run's config.yaml (which decoder it used,
    raw.pop("runtime", None)  # what the auto options resolved to)
    file_kind = raw.pop("kind", kind)
    if file_kind != kind:
        raise UserError(f"config {name_or_path}: this is a {file_kind} recipe, not a {kind} one; "
                        f"run `sdtl {file_kind}` with it, or pick a {kind} recipe from `sdtl recipes`")
    merged = _merge(raw, parse_overrides(overrides))
    return absolute_paths(from_dict(KINDS[kind], merged, where=""))


# Keys that name files or folders. Stored absolute: a run's config.yaml and checkpoints are read again
# by `sdtl evaluate`, a resumed run and `sdtl demo` from other working directories.
PATH_KEYS = ("data.root", "data.lists_dir", "data.list_file", "model.pretrained", "eval.retention")


def absolute_paths(cfg):
    """Make every path-valued key of ``cfg`` absolute (relative to the current directory), in place."""
    import os

    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        owner = getattr(cfg, section, None)
        value = getattr(owner, key, None) if owner is not None else None
        if isinstance(value, str) and value:
            setattr(owner, key, os.path.abspath(os.path.expanduser(value)))
    return cfg


def config_from_dict(data: dict, kind: str = "finetune"):
    """A stored config (a run's config.yaml, a checkpoint's ``config``) as a typed config."""
    data = dict(data)
    data.pop("kind", None)
    data.pop("decoder", None)
    data.pop("runtime", None)
    stored_data = data.get("data")
    if isinstance(stored_data, dict) and "clip_len" in stored_data and "mean" not in stored_data:
        # written before each encoder carried its own statistics: it was trained on ImageNet's
        stored_data = data["data"] = dict(stored_data)
        stored_data["mean"], stored_data["std"] = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return from_dict(KINDS[kind], data, where="")


def resolve_input(cfg) -> None:
    """Fill ``data.clip_len`` / ``size`` / ``mean`` / ``std`` left unset from the encoder's spec (in place)
    and refuse clips the encoder cannot take, naming the key and the valid values, before any decoding."""
    from sdtl.models.registry import spec_of

    if cfg.model.variant and "variant" not in _arch_options(cfg.model.arch):
        raise ConfigError("model.variant", f"model.arch={cfg.model.arch} has no variants",
                          "leave it empty (the published size)")
    spec_input = spec_of(cfg.model.arch).input_of({"variant": cfg.model.variant})
    d = cfg.data
    d.clip_len = spec_input.frames if d.clip_len is None else d.clip_len
    d.size = spec_input.size if d.size is None else d.size
    d.mean = list(spec_input.mean) if d.mean is None else d.mean
    d.std = list(spec_input.std) if d.std is None else d.std
    for key, values in (("data.mean", d.mean), ("data.std", d.std)):
        if len(values) != 3 or (key == "data.std" and min(values) <= 0):
            raise ConfigError(key, f"{values} is not three {'positive ' if key == 'data.std' else ''}numbers "
                              "(R, G, B, for pixels in [0, 1])", "leave it unset for the encoder's own")
    spec_input.check(d.clip_len, d.size, cfg.model.arch)


def _arch_options(arch: str) -> list[str]:
    from sdtl.models.classifier import arch_option_names

    return arch_option_names(arch)


def to_dict(cfg) -> dict:
    out = asdict(cfg)
    if isinstance(getattr(cfg, "regularizer", None), RegularizerConfig):
        out["regularizer"] = cfg.regularizer.to_dict()  # flat, as recipes and existing runs spell it
    return out


def dump_config(cfg, path: Path, kind: str, decoder: str | None = None, runtime: dict | None = None) -> None:
    head = {"kind": kind, **({"decoder": decoder} if decoder else {}), **({"runtime": runtime} if runtime else {})}
    # Atomic: a resume reads config.yaml back as the run's identity, so half a file must never exist
    # (a truncated YAML can still parse, and the missing keys would silently take their defaults).
    atomic_write_text(path, yaml.safe_dump({**head, **to_dict(cfg)}, sort_keys=False))


# ------------------------------------------------------------------------------------ validation
def from_dict(cls, data: Any, where: str):
    if not isinstance(data, dict):
        if where:
            raise ConfigError(where, f"expected a mapping, got {type(data).__name__} {data!r}")
        raise UserError(f"config top level: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(key, "unknown key", f"valid keys here are: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    cfg = cls(**kwargs)
    _check_choices(cfg, where)
    return cfg


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    if tp is RegularizerConfig:
        return _regularizer_from_dict(value, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except UserError:
                continue
        raise _type_error(key, tp, value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and "off" in (choices_for(".".join(key.split(".")[-2:])) or ()):
            return "on" if value else "off"  # YAML 1.1 reads on/off as booleans
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _type_error(key, tp, value)
    raise _type_error(key, tp, value)


def _type_error(key: str, tp, value) -> ConfigError:
    name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
    return ConfigError(key, f"expected {name}, got {type(value).__name__} {value!r}")


def _check_choices(cfg, where: str) -> None:
    for f in dataclasses.fields(cfg):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        _check_choice(key, value)


def _check_choice(key: str, value) -> None:
    allowed = choices_for(".".join(key.split(".")[-2:]))
    if allowed is None:
        return
    for item in value if isinstance(value, list) else [value]:  # a list key: each item is one of the choices
        if item not in allowed:
            raise ConfigError(key, f"{item!r} is not one of {', '.join(allowed)}")


def _regularizer_from_dict(data: Any, where: str) -> RegularizerConfig:
    """The flat ``regularizer`` section: name, weight and every registered method's keys, typed by
    the options dataclass that declares them."""
    if not isinstance(data, dict):
        raise ConfigError(where, f"expected a mapping, got {type(data).__name__} {data!r}")
    types_of = {"name": str, "weight": float, **{k: key.type for k, key in registry.option_keys().items()}}
    unknown = sorted(set(data) - set(types_of))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key", f"valid keys here are: {', '.join(sorted(types_of))}")
    cfg = RegularizerConfig(**{k: _coerce(types_of[k], v, f"{where}.{k}") for k, v in data.items()})
    for k in types_of:
        _check_choice(f"{where}.{k}", getattr(cfg, k))
    return cfg


def validate_ranges(cfg) -> None:
    """Value checks that types alone cannot express (run before any work starts)."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(key, f"{msg} (got {_get(cfg, key)!r})")

    resolve_input(cfg)

    if isinstance(cfg, FinetuneConfig):
        r = cfg.regularizer
        need(r.weight >= 0, "regularizer.weight", "must be >= 0; use 0 for plain fine-tuning")
        _check_regularizer_keys(r)
        _check_regularizer_options(cfg)
        need(0 <= cfg.optim.lp_epochs < cfg.optim.epochs, "optim.lp_epochs",
             f"must be in [0, optim.epochs={cfg.optim.epochs}): LP-FT needs epochs left to fine-tune")
        need(cfg.data.split in (1, 2, 3), "data.split", "official splits are 1, 2 or 3")
        need(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        need(0 <= cfg.data.max_corrupt_fraction <= 1, "data.max_corrupt_fraction", "must be in [0, 1]")
        need(cfg.eval.num_clips >= 1, "eval.num_clips", "must be >= 1")
        need(cfg.eval.val_clips >= 1, "eval.val_clips", "must be >= 1")
        need(cfg.eval.crops in (1, 3), "eval.crops", "must be 1 or 3")
        need(cfg.eval.every >= 1, "eval.every", "must be >= 1")
        need(cfg.eval.batch_size >= 0, "eval.batch_size", "must be >= 0")
    data = cfg.data
    need(data.clip_len >= 1, "data.clip_len", "must be >= 1")
    need(data.size >= 8, "data.size", "must be >= 8 pixels")
    need(data.batch_size >= 1, "data.batch_size", "must be >= 1")
    need(len(data.crop_area) == 2 and 0 < data.crop_area[0] <= data.crop_area[1] <= 1, "data.crop_area",
         "must be [min, max] with 0 < min <= max <= 1, e.g. [0.25, 1.0]")
    need(data.workers >= 0, "data.workers", "must be >= 0")
    need(data.prefetch_factor >= 1, "data.prefetch_factor", "must be >= 1")
    need(cfg.run.checkpoint_every_steps >= 0, "run.checkpoint_every_steps", "must be >= 0 (0 = only at epoch ends)")
    need(cfg.run.checkpoint_every_minutes >= 0, "run.checkpoint_every_minutes", "must be >= 0 (0 = off)")
    _check_trackers(cfg.run)
    o = cfg.optim
    need(o.epochs >= 1, "optim.epochs", "must be >= 1")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(o.grad_clip is None or o.grad_clip > 0, "optim.grad_clip", "must be > 0, or null to disable")
    need(o.schedule != "multistep" or bool(o.milestones), "optim.milestones",
         "multistep needs a list of epochs, e.g. [50, 70, 90]")
    need(0 < o.layer_decay <= 1, "optim.layer_decay", "must be in (0, 1]; 1 = off, VideoMAE uses 0.75")
    need(isinstance(cfg, FinetuneConfig) or o.lp_epochs == 0, "optim.lp_epochs",
         "LP-FT is a fine-tuning schedule; pre-training has no linear-probe stage, leave it at 0")
    need(cfg.model.width > 0, "model.width", "must be > 0")
    need(0 <= cfg.model.dropout < 1, "model.dropout", "must be in [0, 1)")
    need(0 <= cfg.model.drop_path < 1, "model.drop_path", "must be in [0, 1)")
    need(0 <= o.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
    check_slurm(cfg.slurm)
    if isinstance(cfg, PretrainConfig):
        _check_task_keys(cfg.task)
        pretext_registry.options_of(cfg.task)  # each task's range checks (ConfigError naming task.<key>)


def _check_trackers(run: RunConfig) -> None:
    """``run.trackers``: known names (also checked on load), each once; the options they read. Whether
    mlflow / wandb are installed is checked by the run itself (:func:`sdtl.engine.trackers.check_installed`),
    so that evaluating a run that used them needs neither."""
    for item in run.trackers:
        _check_choice("run.trackers", item)
    twice = sorted({t for t in run.trackers if run.trackers.count(t) > 1})
    if twice:
        raise ConfigError("run.trackers", f"{twice[0]!r} is named twice (got {run.trackers!r})", "name each tracker once")
    for key in ("mlflow_experiment", "wandb_project"):
        if not getattr(run, key).strip():
            raise ConfigError(f"run.{key}", "must not be empty", f"the default is {getattr(RunConfig, key)!r}")


#: sbatch options the ``slurm`` section sets itself: refused in ``slurm.extra`` (say them with their key)
SLURM_OWN_OPTIONS = {"nodes": "nodes", "gpus-per-node": "gpus_per_node", "ntasks-per-node": "tasks_per_node",
                     "cpus-per-task": "cpus_per_task", "mem": "mem", "time": "time", "partition": "partition",
                     "account": "account", "qos": "qos", "constraint": "constraint", "job-name": "job_name",
                     "signal": "signal_delay_s", "array": "array_parallelism", "output": None, "error": None,
                     "requeue": None, "open-mode": None, "wckey": None}


def slurm_minutes(text: str) -> int:
    """sbatch's ``--time`` formats -> whole minutes (rounded up): ``MM``, ``MM:SS``, ``HH:MM:SS``,
    ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``. ``ValueError`` for anything else."""
    text = str(text).strip()
    days, rest = (text.split("-", 1) if "-" in text else ("0", text))
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise ValueError(text)
    nums = [int(p) for p in parts]
    if "-" in text:  # D-HH, D-HH:MM, D-HH:MM:SS
        h, m, sec = (nums + [0, 0])[:3]
    elif len(nums) == 3:
        h, m, sec = nums
    elif len(nums) == 2:
        h, m, sec = 0, nums[0], nums[1]
    else:
        h, m, sec = 0, nums[0], 0
    seconds = ((int(days) * 24 + h) * 60 + m) * 60 + sec
    return -(-seconds // 60)


def check_slurm(s: SlurmConfig) -> None:
    """The ``slurm`` section's values, before anything is submitted (types were checked on load)."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"slurm.{key}", f"{msg} (got {getattr(s, key)!r})")

    need(s.nodes >= 1, "nodes", "must be >= 1")
    need(s.gpus_per_node >= 0, "gpus_per_node", "must be >= 0 (0: a CPU job)")
    need(s.tasks_per_node >= 0, "tasks_per_node", "must be >= 0 (0: one per GPU, or 1 without GPUs)")
    need(s.gpus_per_node == 0 or s.tasks_per_node in (0, s.gpus_per_node), "tasks_per_node",
         f"sdtl runs one process per GPU: leave it at 0 or set it to slurm.gpus_per_node={s.gpus_per_node}")
    need(s.cpus_per_task >= 1, "cpus_per_task", "must be >= 1")
    need(s.mem == "" or re.fullmatch(r"[0-9]+[KMGT]?", s.mem) is not None, "mem",
         "sbatch's --mem: a number with an optional K/M/G/T suffix, e.g. 64G; \"\" = the cluster's default")
    try:
        minutes = slurm_minutes(s.time)
    except ValueError:
        minutes = -1
    need(minutes > 0, "time", "a time limit as sbatch takes it: MM, HH:MM:SS or D-HH:MM:SS, e.g. 24:00:00")
    need(0 <= s.signal_delay_s < minutes * 60, "signal_delay_s",
         f"must be >= 0 and below slurm.time ({minutes} min): the job's warning before its time limit")
    need(s.max_requeues >= 0, "max_requeues", "must be >= 0")
    need(s.array_parallelism >= 1, "array_parallelism", "must be >= 1")
    for key in ("partition", "account", "qos", "constraint", "job_name"):
        need(not re.search(r"\s", getattr(s, key)), key, "must not contain spaces")
    for item in s.extra:
        name = item.split("=", 1)[0].strip().lstrip("-")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError("slurm.extra", f"{item!r} is not an sbatch option; write them as "
                              "[\"exclusive\", \"mail-type=END\"] (long names, no leading --)")
        if name in SLURM_OWN_OPTIONS:
            own = SLURM_OWN_OPTIONS[name]
            raise ConfigError("slurm.extra", f"{item!r}: " + (f"set it with slurm.{own}" if own else
                              "sdtl sets this option itself (logs under OUT/slurm, requeue on preemption)"))


def _check_task_keys(task) -> None:
    """A ``task`` key set away from its default for another task than ``task.name``: refuse it."""
    defaults = PretrainTaskConfig()
    for key, users in pretext_registry.task_keys().items():
        if task.name not in users and getattr(task, key) != getattr(defaults, key):
            raise ConfigError(f"task.{key}", f"used only by task.name={' or '.join(users)}, not {task.name!r}",
                              "remove it, or set task.name to one of those")


def _check_regularizer_keys(r: RegularizerConfig) -> None:
    """A key set for another regularizer than ``regularizer.name`` would silently do nothing: refuse it."""
    keys = registry.option_keys()
    for key, spec in keys.items():
        users = spec.users
        if r.name in users or r.name == registry.NONE or getattr(r, key) == spec.default():
            continue
        raise ConfigError(f"regularizer.{key}", f"used only by regularizer.name={' or '.join(users)}, not {r.name!r}",
                          "remove it, or set regularizer.name to one of those")


def _check_regularizer_options(cfg) -> None:
    """The named regularizer's options check themselves (ranges; rules against other sections). With
    ``none`` every method's keys are checked, so no later ``name=`` inherits a bad value."""
    r = cfg.regularizer
    try:
        if r.name == registry.NONE:
            for name in registry.REGULARIZERS:
                r.options_for(name)
        else:
            r.options.check_run(cfg)
    except ValueError as exc:  # "regularizer.<key>: <rule> (got <value>)"
        raise config_error_from(exc, "regularizer") from exc


def config_error_from(exc: ValueError, section: str) -> ConfigError:
    """A :class:`ConfigError` from a ``ValueError`` of a lower layer (the regularizers) that begins with
    the key it is about (``"regularizer.k: must be >= 1 (got 0)"``); without one, the ``section``."""
    text = str(exc)
    head, sep, rest = text.partition(": ")
    if sep and head.startswith(f"{section}.") and " " not in head:
        return ConfigError(head, rest)
    return ConfigError(section, text)


def is_config_key(key: str) -> bool:
    """Whether ``key`` (``optim.lr``, ``optim.milestones[0]``) names a value of a finetune or pretrain
    config: something ``section.key=value`` can set (not a section, not a misspelt key)."""
    parts = key.split("[", 1)[0].split(".")
    return any(_is_leaf(cls, parts) for cls in KINDS.values())


def _is_leaf(cls, parts: list[str]) -> bool:
    node: Any = cls
    for i, part in enumerate(parts):
        if node is RegularizerConfig:  # flat keys: name, weight and every registered option
            return i == len(parts) - 1 and (part in ("name", "weight") or part in registry.option_keys())
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return False
        hints = typing.get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
    return not (node is RegularizerConfig or (isinstance(node, type) and dataclasses.is_dataclass(node)))


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
