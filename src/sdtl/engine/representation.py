"""Representation evaluation of a frozen encoder: nearest-neighbour retrieval and a linear probe.

The two protocols self-supervised video papers report besides fine-tuning (``sdtl retrieval``,
``sdtl probe``; docs/representation.md has the protocol and where the references disagree):

* **features** (:func:`video_features`): every video of a list gives ``eval.num_clips`` (10) clips of
  ``data.clip_len`` frames whose starts are ``round(linspace(0, n - span, 10))`` (the test clips of
  :mod:`sdtl.data.sampling`), each centre-cropped (square of side min(H, W), resized to ``data.size``)
  and normalised with the encoder's mean/std; the encoder's own pooled output (``encoder(x)``: global
  average pool over T x H x W for the CNNs) of each clip, averaged over the clips of the video. The
  same deterministic transform for the query (test) and the gallery (train) lists.
* **retrieval** (:func:`recall_at_k`): each test video queries the training videos by cosine
  similarity; R@k = share of queries with at least one video of their class among the k most similar.
* **linear probe** (:func:`linear_probe`): multinomial logistic regression on standardised frozen
  features, L2 strength picked on a stratified validation part of the training list, refitted on the
  whole training list, scored on the test list. Full-batch L-BFGS in float64: deterministic.

Features are cached (:func:`cached_features`): one file per list, keyed by the checkpoint's content
hash, the arch, the dataset and its list (names and labels), the clip protocol and the decoder, so a
second call decodes nothing and a changed checkpoint never reuses stale features.

Called by :mod:`sdtl.studies.represent` (the CLI); usable from Python (:func:`run_retrieval`,
:func:`run_probe`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtl.atomic import atomic_write_text
from sdtl.engine import config as cfgmod
from sdtl.engine import distributed as dist_utils
from sdtl.errors import CheckpointError, ConfigError, DataError, UserError

log = logging.getLogger("sdtl.represent")

#: Bumped when the feature computation changes (invalidates every cache file).
FEATURE_VERSION = 1
RECALL_KS = (1, 5, 10, 20, 50)
#: L2 strengths of the probe (on mean cross-entropy over standardised features).
DEFAULT_WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROBE_MAX_ITER = 1000
PROBE_CLASSIFIER = ("multinomial logistic regression (softmax with bias) on standardised video features (mean/std "
                    "of the rows it is fitted on); minimises mean cross-entropy + weight_decay/2 * ||W||^2 (bias not "
                    "penalised) by full-batch L-BFGS in float64 with a strong-Wolfe line search, warm-started along "
                    "the grid from the strongest decay, the refit from zeros: deterministic")
SELECTION_RULE = ("highest validation acc@1; ties go to the lower validation cross-entropy, then to the "
                  "larger weight decay; the test list is never used to choose")
OUTPUTS = {"retrieval": ("retrieval.json", "retrieval.md"), "probe": ("probe.json", "probe.md")}
CACHE_FOLDER = "features"

#: ``--set`` keys these commands read (others would be silently ignored, so they are refused).
SETTABLE = {
    "data": None,  # every data.* key
    "eval": {"num_clips", "crops", "batch_size", "skip_corrupt"},
    "run": {"seed", "device", "deterministic", "threads", "progress"},
    "optim": {"amp"},
}

REFERENCE_DIFFERENCES = (
    ("pooling: the encoder's own global average pool (as RSPNet's retrieval.py); RSPNet's supplementary and "
     "VCOP's retrieve_clips.py use max pooling (VCOP: MaxPool3d (1,2,2) on conv5, then flatten, 9216-d for C3D)"),
    ("gallery crop: centre crop, deterministic, as the query; RSPNet's retrieval.py cuts gallery clips with its "
     "training augmentation (random-resized crop, area 0.25-1, random flip), so its numbers are slightly stochastic"),
    ("query crop: centre square of side min(H, W) resized to the clip size (as RSPNet); VCOP resizes to 128x171 "
     "and centre-crops 112"),
    "normalisation: the encoder's own mean/std (ImageNet for the CNNs, as RSPNet); VCOP does not normalise",
    ("clip starts: round(linspace(0, n - span, 10)) (as RSPNet's EvenNCrop); VCOP centres clips at "
     "linspace(8, n - 8, 10)"),
    ("gallery size: every training video; RSPNet's loader drops the last incomplete batch (drop_last, 1 video "
     "of UCF101 split 1)"),
    "ranking ties: stable, by gallery (training-list) order; RSPNet uses numpy's unstable argsort",
)


# ------------------------------------------------------------------------------------ checkpoints
@dataclass
class LoadedEncoder:
    """An encoder with a checkpoint's weights, and what was learnt about the checkpoint."""

    encoder: torch.nn.Module
    path: str
    sha256: str
    format: str
    arch: str
    options: dict
    arch_from: str  # "recorded in the checkpoint" | "--arch" (arch argument) | "guessed from the keys"
    load_summary: str
    recorded_input: dict = field(default_factory=dict)  # clip_len/size/mean/std of an sdtl checkpoint's config

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "format": self.format, "arch": self.arch,
                "arch_options": self.options, "arch_from": self.arch_from, "loaded": self.load_summary,
                "feature_dim": int(getattr(self.encoder, "feature_dim", 0) or 0)}


def content_hash(path: str | Path) -> str:
    """SHA-256 of a checkpoint's bytes (a folder: of its files' relative names and bytes, sorted)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_encoder_checkpoint(checkpoint: str | Path, arch: str | None = None,
                            allow_unsafe_pickle: bool = False) -> LoadedEncoder:
    """Build the encoder a checkpoint holds and load its weights strictly.

    Anything ``model.pretrained`` accepts: ``sdtl pretrain``'s ``encoder.pt`` and fine-tune checkpoints
    (arch and options recorded in them), RSPNet releases, torchvision, exported state dicts (arch
    guessed from the keys and shapes, else ``arch`` must be given). Errors name the checkpoint path.
    """
    from sdtl.models.checkpoints import (
        detect_format,
        extract_backbone_state,
        guess_arch,
        load_encoder_weights,
        safe_load,
    )
    from sdtl.models.classifier import arch_option_names, build_encoder
    from sdtl.models.registry import specs

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path", path=path)
    if arch is not None and arch not in specs():
        raise ConfigError("model.arch", f"{arch!r} is not a known arch", f"use one of: {', '.join(sorted(specs()))}")
    obj = safe_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    fmt = detect_format(obj)
    recorded_input: dict = {}
    if fmt in ("sdtl-finetune", "sdtl-pretrain") and obj.get("arch") in specs():
        recorded = obj["arch"]
        if arch is not None and arch != recorded:
            raise CheckpointError(f"{path}: an {fmt} checkpoint of arch {recorded!r}, not {arch!r}; leave the arch "
                                  f"out (it is recorded in the checkpoint)", path=path)
        names = arch_option_names(recorded)
        options = {k: v for k, v in dict(obj.get("arch_options") or {}).items() if k in names}
        arch, arch_from = recorded, "recorded in the checkpoint"
        data = (obj.get("config") or {}).get("data") or {}
        recorded_input = {k: data[k] for k in ("clip_len", "size", "mean", "std") if data.get(k) is not None}
    else:
        try:
            guess = guess_arch(extract_backbone_state(obj, arch))
        except UserError:
            guess = None
        if arch is not None:
            options = dict(guess[1]) if guess and guess[0] == arch else {}
            arch_from = "given (--arch)"
        elif guess is not None:
            arch, options = guess
            arch_from = "guessed from the checkpoint's keys and shapes"
        else:
            raise CheckpointError(f"{path}: cannot tell the architecture from its keys ({fmt} checkpoint); "
                                  f"give it (--arch, one of {', '.join(sorted(specs()))})", path=path)
    encoder = build_encoder(arch, **options)
    report = load_encoder_weights(encoder, obj, arch)
    del obj
    return LoadedEncoder(encoder=encoder.eval(), path=str(path.resolve()), sha256=content_hash(path), format=fmt,
                         arch=arch, options=dict(options), arch_from=arch_from,
                         load_summary=report.summary().replace("checkpoint object", str(path)),
                         recorded_input=recorded_input)


# --------------------------------------------------------------------------------------- config
def representation_config(loaded: LoadedEncoder, settings: dict | None = None, overrides: list[str] | None = None):
    """``(cfg, input_from)``: the :class:`~sdtl.engine.config.FinetuneConfig` whose data/eval/run sections
    say what to decode, and where its clip_len/size/mean/std came from.

    Layers, later wins: 10 centre clips per video; the clip size and mean/std recorded in an sdtl
    checkpoint's config; ``settings`` (nested dict, e.g. from command-line flags); ``overrides``
    (``data.key=value``). Unset clip size and statistics come from the encoder's spec
    (:func:`~sdtl.engine.config.resolve_input`). Keys these commands do not read are refused.
    """
    base = {"data": dict(loaded.recorded_input), "eval": {"num_clips": 10, "crops": 1},
            "model": {"arch": loaded.arch, "variant": str(loaded.options.get("variant", "") or "")}}
    given = cfgmod._merge(settings or {}, cfgmod.parse_overrides(overrides))
    for section, keys in given.items():
        allowed = SETTABLE.get(section, set())
        if not isinstance(keys, dict) or (allowed is not None and not set(keys) <= allowed):
            bad = section if not isinstance(keys, dict) else f"{section}.{min(set(keys) - allowed)}"
            readable = ", ".join(f"{s}.{k}" for s in ("eval", "run", "optim") for k in sorted(SETTABLE[s]))
            hint = ("the encoder and its options come from the checkpoint (or --arch)" if section == "model" else
                    f"these commands read data.* and {readable}")
            raise UserError(f"config key {bad}: not used by representation evaluation; {hint}")
    merged = cfgmod._merge(base, given)
    cfg = cfgmod.absolute_paths(cfgmod.from_dict(cfgmod.FinetuneConfig, merged, where=""))
    cfgmod.validate_ranges(cfg)
    given_data = given.get("data") or {}
    input_from = {k: ("given" if given_data.get(k) is not None else
                      "the checkpoint's recorded config" if k in loaded.recorded_input else
                      f"the encoder's spec ({loaded.arch})") for k in ("clip_len", "size", "mean", "std")}
    return cfg, input_from


# ------------------------------------------------------------------------------------- features
@dataclass
class FeatureSet:
    """Per-video features of one list, in list order; ``valid`` is False for undecodable videos."""

    features: torch.Tensor  # float32 [N, D]
    labels: torch.Tensor  # long [N]
    names: list[str]
    valid: torch.Tensor  # bool [N]
    failed: list = field(default_factory=list)  # [(path, reason)]
    file: str = ""
    cached: bool = False
    seconds: float = 0.0

    def usable(self) -> FeatureSet:
        keep = self.valid
        return dataclasses.replace(self, features=self.features[keep], labels=self.labels[keep],
                                   names=[n for n, k in zip(self.names, keep.tolist()) if k],
                                   valid=self.valid[keep])


def protocol_key(cfg, loaded: LoadedEncoder, subset: str, records, classes) -> dict:
    """Everything the features of ``subset`` depend on (the cache key)."""
    from sdtl.data.video_io import decoder_identity
    from sdtl.engine.runtime import amp_dtype

    d = cfg.data
    listing = "\n".join(f"{r.name}\t{r.label}\t{r.path}" for r in records)
    device = dist_utils.resolve_device(cfg.run.device)
    return {
        "version": FEATURE_VERSION,
        "checkpoint_sha256": loaded.sha256, "arch": loaded.arch, "arch_options": loaded.options,
        "dataset": d.dataset, "root": str(Path(d.root).resolve()), "split": d.split, "lists_dir": d.lists_dir,
        "subset": subset, "num_videos": len(records),
        "videos_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "classes_sha256": hashlib.sha256("\n".join(classes).encode()).hexdigest(),
        "clip_len": d.clip_len, "stride": d.stride, "size": d.size, "num_clips": cfg.eval.num_clips,
        "crops": cfg.eval.crops, "mean": [float(v) for v in d.mean], "std": [float(v) for v in d.std],
        "decoder": decoder_identity(d.backend), "precision": str(amp_dtype(cfg.optim.amp, device) or "float32"),
        "feature": "encoder output (pooled), mean over clips",
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _clip_dataset(cfg, records, classes):
    from sdtl.data.datasets import VideoClipDataset

    d = cfg.data
    return VideoClipDataset(records, classes, mode="test", num_clips=cfg.eval.num_clips, crops=cfg.eval.crops,
                            clip_len=d.clip_len, stride=d.stride, size=d.size, backend=d.backend, seed=cfg.run.seed,
                            skip_corrupt=True, norm=(tuple(d.mean), tuple(d.std)))


@torch.no_grad()
def video_features(encoder, dataset, info, clips_per_forward: int, workers: int, amp=None,
                   desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``(features [N, D] float32, valid [N] bool, failed)``: the mean over each video's clips of the
    encoder's pooled output, for a test-mode dataset of N videos (gathered over ranks)."""
    from sdtl.engine.evaluate import forward_batches, make_eval_loader
    from sdtl.engine.runtime import progress

    loader = make_eval_loader(dataset, clips_per_forward, info, workers)
    bar = progress(len(loader), desc or "", info.is_main and desc is not None)
    encoder.eval()
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    failed: list = []
    for batch, feats in forward_batches(encoder, loader, clips_per_forward, info.device, amp, bar, failed):
        feats = feats.double()
        vids = torch.as_tensor(batch["video_index"]).long()
        for v in vids.unique().tolist():
            mask = vids == v
            sums[v] = sums.get(v, 0) + feats[mask].sum(0)
            counts[v] = counts.get(v, 0) + int(mask.sum())
    bar.close()
    merged_sums, merged_counts, all_failed = {}, {}, []
    for s, c, f in dist_utils.all_gather_objects(info, (sums, counts, failed)):
        merged_sums.update(s)
        merged_counts.update(c)
        all_failed.extend(f)
    dim = int(getattr(encoder, "feature_dim", 0) or (next(iter(merged_sums.values())).numel() if merged_sums else 0))
    out = torch.full((len(dataset), dim), float("nan"), dtype=torch.float32)
    valid = torch.zeros(len(dataset), dtype=torch.bool)
    for v, total in merged_sums.items():
        out[v] = (total / merged_counts[v]).float()
        valid[v] = True
    return out, valid, all_failed


def cached_features(cfg, loaded: LoadedEncoder, info, lists: dict, cache_dir: Path, recompute: bool = False
                    ) -> dict[str, FeatureSet]:
    """``{subset: FeatureSet}`` for ``lists`` = ``{subset: (records, classes)}``: read from ``cache_dir``
    when a file with the same key is there (nothing decoded), else computed and written (rank 0)."""
    from sdtl.engine.runtime import amp_dtype
    from sdtl.models.checkpoints import safe_load, save_checkpoint

    out = {}
    moved = False
    for subset, (records, classes) in lists.items():
        key = protocol_key(cfg, loaded, subset, records, classes)
        path = Path(cache_dir) / f"{subset}-{key_digest(key)[:24]}.pt"
        payload = None
        if path.is_file() and not recompute:
            try:
                payload = safe_load(path)
            except UserError as exc:
                log.warning("%s: unreadable feature cache (%s); computing the features again", path, exc)
            if payload is not None and payload.get("key") != json.loads(json.dumps(key)):
                log.warning("%s: cache file of another protocol; computing the features again", path)
                payload = None
        hit = dist_utils.broadcast_object(info, payload is not None)  # rank 0 decides for every rank
        if hit and payload is None:
            payload = safe_load(path)
        if hit:
            out[subset] = FeatureSet(payload["features"].float(), payload["labels"].long(), list(payload["names"]),
                                     payload["valid"].bool(), [tuple(f) for f in payload["failed"]], str(path),
                                     cached=True, seconds=float(payload.get("seconds", 0.0)))
            log.info("%s features: %d videos from the cache %s", subset, len(records), path)
            continue
        if not moved:
            loaded.encoder.to(info.device)
            moved = True
        t0 = time.perf_counter()
        dataset = _clip_dataset(cfg, records, classes)
        feats, valid, failed = video_features(
            loaded.encoder, dataset, info, cfg.eval.batch_size or cfg.data.batch_size, cfg.data.workers,
            amp_dtype(cfg.optim.amp, info.device),
            desc=f"features ({subset} list)" if cfg.run.progress else None)
        seconds = time.perf_counter() - t0
        labels = torch.as_tensor([int(r.label) for r in records], dtype=torch.long)
        names = [r.name for r in records]
        failed = [(str(p), str(r)) for p, r in failed]
        if info.is_main:
            save_checkpoint({"sdtl_features": FEATURE_VERSION, "key": json.loads(json.dumps(key)),
                             "features": feats, "valid": valid, "labels": labels, "names": names,
                             "failed": [list(f) for f in failed], "seconds": seconds}, path)
            log.info("%s features: %d videos in %.1f s -> %s", subset, len(records), seconds, path)
        out[subset] = FeatureSet(feats, labels, names, valid, failed, str(path), cached=False, seconds=seconds)
    return out


def check_decoded(features: FeatureSet, subset: str, skip: bool) -> int:
    """Refuse a list with undecodable videos (naming them) unless ``skip``; the number left out."""
    distinct: dict[str, str] = {}
    for path, reason in features.failed:
        distinct.setdefault(str(path), str(reason))
    if distinct and not skip:
        listing = "; ".join(f"{p}: {r}" for p, r in list(distinct.items())[:10])
        raise DataError(f"{len(distinct)} videos of the {subset} list cannot be decoded, so the results would not "
                        f"be comparable: {listing}. Fix or remove them, or set eval.skip_corrupt=true to leave them "
                        f"out", path=next(iter(distinct)))
    if distinct:
        log.warning("%d undecodable %s videos left out (eval.skip_corrupt)", len(distinct), subset)
    return int((~features.valid).sum())


# -------------------------------------------------------------------------------------- retrieval
def recall_at_k(query: torch.Tensor, query_labels, gallery: torch.Tensor, gallery_labels,
                ks=RECALL_KS, chunk: int = 1024) -> dict[int, float]:
    """R@k in percent: the share of queries with a gallery item of their own label among the k most
    cosine-similar gallery items.

    Ranking: descending similarity, ties in gallery order (a stable sort), so results do not depend on
    the sort's implementation. A k larger than the gallery ranks the whole gallery. Zero vectors have
    similarity 0 with everything.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise UserError(f"recall ks {list(ks)}: need positive integers")
    if len(gallery) == 0 or len(query) == 0:
        raise UserError(f"retrieval needs queries and a gallery (got {len(query)} queries, {len(gallery)} "
                        f"gallery items)")
    q = F.normalize(query.double(), dim=1)
    g = F.normalize(gallery.double(), dim=1)
    ql = torch.as_tensor(query_labels).long()
    gl = torch.as_tensor(gallery_labels).long()
    depth = min(max(ks), len(g))
    hits = dict.fromkeys(ks, 0)
    for start in range(0, len(q), chunk):
        sim = q[start:start + chunk] @ g.T
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :depth]
        match = gl[order] == ql[start:start + chunk, None]
        # rank of the first same-class item (depth when none within reach)
        first = torch.where(match.any(1), match.float().argmax(1), torch.full_like(ql[start:start + chunk], depth))
        for k in ks:
            hits[k] += int((first < min(k, depth)).sum())
    return {k: 100.0 * hits[k] / len(q) for k in ks}


# ----------------------------------------------------------------------------------- linear probe
def _standardiser(x: torch.Tensor):
    mean = x.mean(0, keepdim=True)
    std = x.std(0, unbiased=False, keepdim=True).clamp_min(1e-6)
    return lambda z: (z - mean) / std


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int = PROBE_MAX_ITER, init: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Multinomial logistic regression: minimise ``mean CE(xW + b, y) + weight_decay / 2 * ||W||^2`` (the
    bias is not penalised) by full-batch L-BFGS in float64. Returns ``(W [D, C], b [C], iterations)``.

    Strictly convex for ``weight_decay > 0``: one optimum, found deterministically from zeros (or ``init``).
    """
    x = x.double()
    y = y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=torch.float64) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), iterations


def _scores(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    pred = logits.argmax(1)
    k5 = min(5, num_classes)
    top5 = (logits.topk(k5, dim=1).indices == y[:, None]).any(1)
    per_class = [float((pred[y == c] == c).double().mean()) * 100 for c in range(num_classes) if (y == c).any()]
    return {"acc1": 100.0 * float((pred == y).double().mean()), "acc5": 100.0 * float(top5.double().mean()),
            "mean_class_acc": sum(per_class) / len(per_class) if per_class else float("nan"),
            "loss": float(F.cross_entropy(logits, y))}


def choose(grid: list[dict]) -> int:
    """Index of the selected row (:data:`SELECTION_RULE`)."""
    def key(i):
        row = grid[i]
        acc = row["val_acc1"] if not math.isnan(row["val_acc1"]) else -math.inf
        loss = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
        return (acc, -loss, row["weight_decay"])

    return max(range(len(grid)), key=key)


def linear_probe(train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y, num_classes: int,
                 val_mask: torch.Tensor | None, weight_decays=DEFAULT_WEIGHT_DECAYS,
                 max_iter: int = PROBE_MAX_ITER) -> dict:
    """Pick the weight decay on the validation rows of the training features (``val_mask``), refit on
    all training rows, score the test rows. Features are standardised with the statistics of the rows
    a classifier is fitted on. With one weight decay there is nothing to choose (``val_mask`` unused).

    Returns ``{"selected": {...}, "grid": [...], "test": {acc1, acc5, mean_class_acc, loss}, "train": {...}}``.
    """
    decays = sorted({float(v) for v in weight_decays}, reverse=True)  # strong -> weak: warm starts
    if not decays or min(decays) <= 0:
        raise UserError(f"weight decays {list(weight_decays)}: need positive numbers, e.g. 1e-4,1e-3,...,10")
    x = train_x.double()
    y = torch.as_tensor(train_y).long()
    grid: list[dict] = []
    if len(decays) > 1:
        if val_mask is None or not bool(val_mask.any()) or bool(val_mask.all()):
            raise UserError("choosing the weight decay needs a validation part of the training list with videos on "
                            "both sides (data.val_fraction > 0 and >= 2 videos per class); or give one weight decay")
        fit_rows, val_rows = ~val_mask, val_mask
        norm = _standardiser(x[fit_rows])
        xf, xv = norm(x[fit_rows]), norm(x[val_rows])
        state = None
        for wd in decays:
            w, b, iters = fit_logistic(xf, y[fit_rows], num_classes, wd, max_iter, state)
            state = (w, b)
            val = _scores(xv @ w + b, y[val_rows], num_classes)
            fit = _scores(xf @ w + b, y[fit_rows], num_classes)
            grid.append({"weight_decay": wd, "val_acc1": val["acc1"], "val_loss": val["loss"],
                         "val_mean_class_acc": val["mean_class_acc"], "fit_acc1": fit["acc1"], "iterations": iters})
        pick = grid[choose(grid)]
        chosen = pick["weight_decay"]
    else:
        chosen = decays[0]
    norm = _standardiser(x)
    xt = norm(x)
    w, b, iters = fit_logistic(xt, y, num_classes, chosen, max_iter)
    test = _scores(norm(test_x.double()) @ w + b, torch.as_tensor(test_y).long(), num_classes)
    train = _scores(xt @ w + b, y, num_classes)
    selected = {"weight_decay": chosen, "rule": SELECTION_RULE if len(decays) > 1 else "the one weight decay given",
                "refit_iterations": iters}
    if grid:
        row = next(r for r in grid if r["weight_decay"] == chosen)
        selected.update(val_acc1=row["val_acc1"], val_loss=row["val_loss"])
    return {"selected": selected, "grid": sorted(grid, key=lambda r: r["weight_decay"]), "test": test,
            "train": {"acc1": train["acc1"], "loss": train["loss"]}}


# ------------------------------------------------------------------------------------ the commands
def claim_out(out_dir: Path, cache_dir: Path) -> None:
    """``out_dir`` must be new, empty, or a folder these commands wrote into (their reports or the
    feature cache): they never write into someone else's folder."""
    from sdtl.engine.runlock import is_lock_file

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {out_dir}: is a file; give a new or empty directory")
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"feature cache {cache_dir}: is a file; give a directory")
    if not out_dir.is_dir():
        return
    held = {p.name for p in out_dir.iterdir() if not is_lock_file(p)}
    ours = {name for names in OUTPUTS.values() for name in names} | {CACHE_FOLDER}
    if held and not held & ours:
        listing = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
        raise UserError(f"output folder {out_dir}: not empty and not written by sdtl retrieval/probe (it holds "
                        f"{listing}); choose a new or empty directory")


def _describe_protocol(cfg, feats: dict[str, FeatureSet], loaded: LoadedEncoder, input_from: dict) -> dict:
    from sdtl.data.video_io import decoder_identity

    d = cfg.data
    return {
        "clips_per_video": cfg.eval.num_clips, "crops": cfg.eval.crops,
        "clip": f"{d.clip_len} frames, stride {d.stride}; starts round(linspace(0, n - span, {cfg.eval.num_clips})); "
                f"shorter videos loop",
        "crop": (f"centre square (side min(H, W)) resized to {d.size}, same for every list (deterministic)"
                 if cfg.eval.crops == 1 else f"3 squares along the long side resized to {d.size}, averaged"),
        "normalisation": {"mean": list(d.mean), "std": list(d.std)},
        "input_from": dict(input_from),
        "feature": f"the encoder's pooled output ({loaded.arch}: global average pool), "
                   f"{loaded.encoder.feature_dim}-d per clip, mean over the clips of a video",
        "decoder": decoder_identity(d.backend),
        "encoder_mode": "eval (BatchNorm running statistics)",
        "cache": {s: {"file": f.file, "cached": f.cached, "seconds": f.seconds} for s, f in feats.items()},
    }


def _dataset_info(cfg, classes, feats: dict[str, FeatureSet]) -> dict:
    d = cfg.data
    return {"dataset": d.dataset, "root": d.root, "split": d.split, "lists_dir": d.lists_dir,
            "num_classes": len(classes), **{f"num_{s}_videos": len(f.names) for s, f in feats.items()}}


def _in_folder(kind: str, out_dir: Path, body):
    from sdtl.engine.rundir import remove_if_only_bookkeeping
    from sdtl.engine.runlock import rank0_lock

    created = not out_dir.exists()
    try:
        with rank0_lock(out_dir, kind):
            return body()
    except UserError:
        if created and out_dir.is_dir():
            remove_if_only_bookkeeping(out_dir)  # bad input leaves no folder behind
        raise


def _run(kind: str, checkpoint, out_dir, arch, settings, overrides, cache_dir, recompute, allow_unsafe_pickle,
         analyse) -> dict:
    """Claim ``out_dir``, load the checkpoint, resolve the config (bad input fails here, nothing written), then
    under the folder's lock: the features of both lists (cached), ``analyse(cfg, feats, classes)`` on rank 0,
    and the report it returns written as ``<kind>.json`` / ``<kind>.md``."""
    from sdtl.engine.build import build_datasets
    from sdtl.engine.runtime import configure_determinism

    out_dir = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir / CACHE_FOLDER
    claim_out(out_dir, cache)
    loaded = load_encoder_checkpoint(checkpoint, arch, allow_unsafe_pickle)
    cfg, input_from = representation_config(loaded, settings, overrides)

    def body() -> dict:
        t0 = time.perf_counter()
        info = dist_utils.setup(cfg.run.device)
        try:
            configure_determinism(cfg.run.deterministic, cfg.run.threads)
            listing_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))
            train, _, test, classes = build_datasets(listing_cfg)  # lists only: nothing is decoded here
            feats = cached_features(cfg, loaded, info, {"train": (train.records, classes),
                                                        "test": (test.records, classes)}, cache, recompute)
            skipped = {s: check_decoded(f, s, cfg.eval.skip_corrupt) for s, f in feats.items()}
            if not info.is_main:
                return {}
            report = analyse(cfg, {s: f.usable() for s, f in feats.items()}, classes)
            report.update({"checkpoint": loaded.describe(), "dataset": _dataset_info(cfg, classes, feats),
                           "protocol": _describe_protocol(cfg, feats, loaded, input_from),
                           "skipped_corrupt": skipped, "elapsed_s": time.perf_counter() - t0})
            write_report(out_dir, kind, report)
            return report
        finally:
            dist_utils.teardown()

    return _in_folder(kind, out_dir, body)


def run_retrieval(checkpoint, out_dir, *, arch: str | None = None, settings: dict | None = None,
                  overrides: list[str] | None = None, cache_dir=None, ks=RECALL_KS, recompute: bool = False,
                  allow_unsafe_pickle: bool = False) -> dict:
    """``sdtl retrieval``: test videos query training videos; writes retrieval.json and retrieval.md.

    ``settings``: nested config values (``{"data": {"dataset": "ucf101", "root": ...}}``); ``overrides``:
    ``["data.key=value", ...]`` on top. Returns the report on rank 0 (``{}`` on other ranks). Bad input
    raises :class:`UserError` before anything is written.
    """
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise UserError(f"recall ks {list(ks)}: need positive integers, e.g. 1,5,10,20,50")

    def analyse(cfg, feats, classes) -> dict:
        gallery, query = feats["train"], feats["test"]
        recall = recall_at_k(query.features, query.labels, gallery.features, gallery.labels, ks)
        return {
            "task": "retrieval",
            "recall": {f"R@{k}": v for k, v in recall.items()},
            "query": "test list", "gallery": "training list",
            "num_queries": len(query.names), "num_gallery": len(gallery.names),
            "similarity": "cosine",
            "hit": "a query counts at k when any of its k most similar gallery videos has its class",
            "ties": "equal similarities rank in gallery (training-list) order",
            "k_beyond_gallery": [k for k in ks if k > len(gallery.names)],
            "differences_from_references": list(REFERENCE_DIFFERENCES),
        }

    return _run("retrieval", checkpoint, out_dir, arch, settings, overrides, cache_dir, recompute,
                allow_unsafe_pickle, analyse)


def run_probe(checkpoint, out_dir, *, arch: str | None = None, settings: dict | None = None,
              overrides: list[str] | None = None, cache_dir=None, weight_decays=DEFAULT_WEIGHT_DECAYS,
              recompute: bool = False, allow_unsafe_pickle: bool = False, max_iter: int = PROBE_MAX_ITER) -> dict:
    """``sdtl probe``: a linear classifier on frozen features; writes probe.json and probe.md.

    The validation part: ``data.val_fraction`` of each class of the training list (stratified, UCF101
    groups kept together, seed ``run.seed``), as ``sdtl finetune`` holds it out.
    """
    decays = sorted({float(v) for v in weight_decays})
    if not decays or decays[0] <= 0:
        raise UserError(f"weight decays {list(weight_decays)}: need positive numbers, e.g. 1e-4,1e-3,0.01,0.1,1,10")

    def analyse(cfg, feats, classes) -> dict:
        from sdtl.data.datasets import VideoRecord, stratified_split

        train, test = feats["train"], feats["test"]
        records = [VideoRecord(Path(n), int(lab), n) for n, lab in zip(train.names, train.labels.tolist())]
        _, held = stratified_split(records, fraction=cfg.data.val_fraction, seed=cfg.run.seed)
        held_names = {r.name for r in held}
        val_mask = torch.as_tensor([n in held_names for n in train.names], dtype=torch.bool)
        if len(decays) > 1 and not bool(val_mask.any()):
            raise ConfigError("data.val_fraction", f"{cfg.data.val_fraction} holds out no training videos, so the "
                              "weight decay cannot be chosen", "set it > 0 (e.g. 0.1), or give one weight decay")
        t0 = time.perf_counter()
        result = linear_probe(train.features, train.labels, test.features, test.labels, len(classes), val_mask,
                              decays, max_iter)
        return {
            "task": "linear_probe",
            "test": {k: result["test"][k] for k in ("acc1", "acc5", "mean_class_acc")},
            "selected": result["selected"], "grid": result["grid"], "train": result["train"],
            "classifier": PROBE_CLASSIFIER,
            "validation_part": f"stratified data.val_fraction={cfg.data.val_fraction} of each class of the training "
                               f"list, seed {cfg.run.seed} (UCF101 groups kept together); the selected weight decay "
                               f"is refitted on the whole training list",
            "num_fit": int((~val_mask).sum()), "num_val": int(val_mask.sum()),
            "num_train": len(train.names), "num_test": len(test.names), "probe_s": time.perf_counter() - t0,
        }

    return _run("probe", checkpoint, out_dir, arch, settings, overrides, cache_dir, recompute,
                allow_unsafe_pickle, analyse)


# ------------------------------------------------------------------------------------------ reports
def probe_acc5(report: dict) -> str:
    """`` | acc@5 …`` of a probe report, or nothing where it is always 100 (5 classes or fewer)."""
    from sdtl.engine.evaluate import acc5_informative

    shown = acc5_informative(report["dataset"]["num_classes"])
    return f" | acc@5 {report['test']['acc5']:.2f}" if shown else ""


def write_report(out_dir: Path, kind: str, report: dict) -> None:
    """``<kind>.md`` then ``<kind>.json`` (last: its presence marks a finished evaluation), atomically.
    A previous report of the same kind in this folder is replaced (logged)."""
    from sdtl.engine.evaluate import write_json

    json_name, md_name = OUTPUTS[kind]
    old = out_dir / json_name
    if old.is_file():
        try:
            previous = json.loads(old.read_text()).get("checkpoint", {}).get("path")
        except (OSError, ValueError, AttributeError):
            previous = "?"
        log.warning("%s: replacing the previous %s (checkpoint %s)", out_dir, json_name, previous)
    markdown = retrieval_markdown(report) if kind == "retrieval" else probe_markdown(report)
    atomic_write_text(out_dir / md_name, markdown)
    write_json(out_dir / json_name, report)


def _header(report: dict, title: str) -> list[str]:
    ck, ds, pr = report["checkpoint"], report["dataset"], report["protocol"]
    opts = ", ".join(f"{k}={v}" for k, v in ck["arch_options"].items())
    return [
        f"# {title}",
        "",
        f"- checkpoint: `{ck['path']}` ({ck['format']}, sha256 {ck['sha256'][:12]}…)",
        f"- encoder: {ck['arch']}{f' ({opts})' if opts else ''}, arch {ck['arch_from']}; {ck['feature_dim']}-d features",
        f"- dataset: {ds['dataset']} split {ds['split']} (`{ds['root']}`), {ds['num_classes']} classes",
        f"- clips: {pr['clips_per_video']} per video, {pr['clip']}",
        f"- crop: {pr['crop']}",
        f"- normalisation: mean {pr['normalisation']['mean']}, std {pr['normalisation']['std']}",
        "- clip size and statistics from: " + "; ".join(f"{k} {v}" for k, v in pr["input_from"].items()),
        f"- feature: {pr['feature']}",
        f"- decoder: {pr['decoder']}",
    ]


def retrieval_markdown(report: dict) -> str:
    ks = list(report["recall"])
    lines = _header(report, "Video retrieval (test queries the training list)")
    lines += [
        (f"- {report['num_queries']} queries (test list) against {report['num_gallery']} gallery videos (training "
         f"list); cosine similarity; {report['hit']}; {report['ties']}"),
        "",
        "| " + " | ".join(ks) + " |",
        "|" + "---:|" * len(ks),
        "| " + " | ".join(f"{v:.2f}" for v in report["recall"].values()) + " |",
        "",
        "Differences from the published protocols (RSPNet, VCOP): see docs/representation.md.",
    ]
    if report["k_beyond_gallery"]:
        lines.append(f"k larger than the gallery ({report['k_beyond_gallery']}) ranks the whole gallery.")
    return "\n".join(lines) + "\n"


def probe_markdown(report: dict) -> str:
    sel, test = report["selected"], report["test"]
    lines = _header(report, "Linear probe on frozen features")
    lines += [
        f"- classifier: {report['classifier']}",
        f"- validation: {report['validation_part']} ({report['num_fit']} fit / {report['num_val']} validation videos)",
        f"- selection: {sel['rule']}",
        "",
        (f"**test acc@1 {test['acc1']:.2f}**{probe_acc5(report)} | mean-class {test['mean_class_acc']:.2f} "
         f"({report['num_test']} test videos; weight decay {sel['weight_decay']:g}, refitted on {report['num_train']} "
         f"training videos)"),
    ]
    if report["grid"]:
        lines += ["", "| weight decay | val acc@1 | val loss | fit acc@1 | |", "|---:|---:|---:|---:|---|"]
        for row in report["grid"]:
            mark = "← selected" if row["weight_decay"] == sel["weight_decay"] else ""
            lines.append(f"| {row['weight_decay']:g} | {row['val_acc1']:.2f} | {row['val_loss']:.4f} | "
                         f"{row['fit_acc1']:.2f} | {mark} |")
    return "\n".join(lines) + "\n"
