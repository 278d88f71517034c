"""``sdtl retrieval`` and ``sdtl probe``: how good a frozen encoder's features are, without fine-tuning.

The command-line side of :mod:`sdtl.engine.representation` (protocol, cache and metrics live there;
docs/representation.md explains the choices and where RSPNet's code, its paper and VCOP disagree).
This module turns flags into config keys and errors about those keys back into the flags typed.
"""
from __future__ import annotations

import argparse

from sdtl.errors import CheckpointError, ConfigError, UserError

#: flag -> (config key, type); only flags given on the command line are passed on (unset ones leave
#: the checkpoint's recorded value or the encoder's own).
DATA_FLAGS = {
    "--dataset": ("data.dataset", str, "ucf101 | hmdb51 | kinetics400 | folder | csv | synthetic"),
    "--root": ("data.root", str, ("dataset root (the folder holding the class folders; for synthetic, what "
                                  "`sdtl synth` wrote)")),
    "--split": ("data.split", int, "official split 1..3 (default 1)"),
    "--lists-dir": ("data.lists_dir", str, "your own split lists instead of the shipped official ones"),
    "--on-missing": ("data.on_missing", str, "error | skip: videos named in the lists but absent (default error)"),
    "--clip-len": ("data.clip_len", int, ("frames per clip (default: the checkpoint's recorded clip length, else "
                                          "the encoder's, e.g. 16)")),
    "--stride": ("data.stride", int, "frame stride inside a clip (default 1)"),
    "--size": ("data.size", int, "crop side in pixels (default: recorded, else the encoder's, e.g. 112)"),
    "--backend": ("data.backend", str, "video decoder: auto | pyav | torchcodec"),
    "--workers": ("data.workers", int, "DataLoader worker processes (default 2)"),
    "--batch-size": ("data.batch_size", int, "clips per forward pass (default 8; e.g. 80 on a large GPU)"),
    "--device": ("run.device", str, "auto | cpu | cuda"),
}


PROBE_FLAGS = {
    "--val-fraction": ("data.val_fraction", float, ("share of each class of the training list held out to choose "
                                                    "the weight decay (default 0.1)")),
}


def _add_flags(group, flags: dict) -> None:
    for flag, (key, kind, text) in flags.items():
        group.add_argument(flag, dest=key.replace(".", "__"), type=kind, default=None,
                           metavar=flag[2:].upper().replace("-", "_"), help=f"{text} [{key}]")


def _add_common(p: argparse.ArgumentParser) -> None:
    from sdtl.cli_options import add_set

    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="encoder checkpoint: anything model.pretrained accepts (sdtl pretrain's encoder.pt, an sdtl "
                        "fine-tune checkpoint, an RSPNet release, torchvision, an exported state dict)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new or empty folder, or one these commands wrote (reports are replaced, the feature "
                        "cache features/ is shared)")
    p.add_argument("--arch", default=None,
                   help="encoder arch when the checkpoint does not record one and its keys do not tell")
    _add_flags(p.add_argument_group("dataset (as sdtl finetune's data.* keys)"), DATA_FLAGS)
    add_set(p, "set a data/eval/run key, e.g. --set data.val_fraction=0.2 --set eval.num_clips=10 "
               "--set eval.skip_corrupt=true --set optim.amp=off")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where computed features are kept (default OUT/features); share it between output folders")
    p.add_argument("--recompute", action="store_true",
                   help="compute the features again even when the cache has them (e.g. after re-encoding videos)")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load a checkpoint that needs full unpickling (runs code from the file)")


def _settings(args) -> tuple[dict, dict]:
    """``(nested settings, {config key: flag as typed})`` from the data flags given."""
    nested: dict = {}
    given: dict = {}
    for flag, (key, _, _) in {**DATA_FLAGS, **PROBE_FLAGS}.items():
        value = getattr(args, key.replace(".", "__"), None)
        if value is None:
            continue
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
        given[key] = f"{flag} {value}"
    return nested, given


def _numbers(text: str, flag: str, kind=float) -> list:
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated {'integers' if kind is int else 'numbers'}, "
                        f"e.g. {'1,5,10,20,50' if kind is int else '1e-4,1e-3,0.01,0.1,1,10'}") from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag} {text}: need positive values")
    return values


def _call(args, run, **extra) -> dict:
    settings, given = _settings(args)
    try:
        return run(args.checkpoint, args.out, arch=args.arch, settings=settings, overrides=args.overrides,
                   cache_dir=args.cache_dir, recompute=args.recompute, allow_unsafe_pickle=args.allow_unsafe_pickle,
                   **extra)
    except ConfigError as exc:
        if exc.key in given:  # the user typed a flag, not a key: name the flag
            raise UserError(f"{given[exc.key]}: {exc.problem}" + (f"; {exc.hint}" if exc.hint else "")) from None
        if exc.key == "model.arch" and args.arch is not None:
            raise UserError(f"--arch {args.arch}: {exc.problem}" + (f"; {exc.hint}" if exc.hint else "")) from None
        raise
    except CheckpointError as exc:
        raise UserError(f"--checkpoint {exc.template}") from None
    except UserError as exc:
        text = exc.template
        for said, flag in (("output folder ", "--out "), ("feature cache ", "--cache-dir ")):
            if text.startswith(said):
                raise UserError(flag + text[len(said):]) from None
        raise


def _cmd_retrieval(args) -> int:
    from sdtl.engine.representation import run_retrieval

    ks = _numbers(args.topk, "--topk", int)
    report = _call(args, run_retrieval, ks=ks)
    if report:
        recall = " | ".join(f"{k} {v:.2f}" for k, v in report["recall"].items())
        print(f"retrieval ({report['num_queries']} queries, {report['num_gallery']} gallery): {recall} "
              f"-> {args.out}/retrieval.json, retrieval.md")
    return 0


def _cmd_probe(args) -> int:
    from sdtl.engine.representation import probe_acc5, run_probe

    decays = _numbers(args.weight_decays, "--weight-decays")
    report = _call(args, run_probe, weight_decays=decays)
    if report:
        t, sel = report["test"], report["selected"]
        print(f"linear probe: test acc@1 {t['acc1']:.2f}{probe_acc5(report)} | mean-class "
              f"{t['mean_class_acc']:.2f} (weight decay {sel['weight_decay']:g}) -> {args.out}/probe.json, probe.md")
    return 0


def register(sub) -> None:
    """Add ``retrieval`` and ``probe`` to the ``sdtl`` subcommands."""
    p = sub.add_parser(
        "retrieval", help="nearest-neighbour video retrieval with frozen features (R@1/5/10/20/50)",
        description="Test videos query training videos: 10 evenly spaced clips per video, centre crop (query and "
                    "gallery alike), the encoder's pooled feature averaged over the clips, cosine similarity; "
                    "R@k = share of queries with a video of their class among the k nearest. Features are cached "
                    "(a second call decodes nothing). Writes retrieval.json and retrieval.md into --out. Protocol "
                    "and how it differs from RSPNet's and VCOP's: docs/representation.md.",
        epilog="example: sdtl retrieval --checkpoint /weights/model_best_r21d_200epoch.pth.tar --dataset ucf101 "
               "--root /data/UCF101 --out runs/r21d_retrieval --batch-size 80")
    _add_common(p)
    p.add_argument("--topk", default="1,5,10,20,50", metavar="K,K,...", help="recall cut-offs (default 1,5,10,20,50)")
    p.set_defaults(func=_cmd_retrieval)

    p = sub.add_parser(
        "probe", help="linear probe: logistic regression on frozen features",
        description="Multinomial logistic regression on the frozen encoder's video features (the same cached "
                    "features as sdtl retrieval); the L2 weight decay is chosen on a stratified validation part of "
                    "the training list (data.val_fraction), refitted on the whole training list and scored on the "
                    "test list. Deterministic. Writes probe.json and probe.md into --out.",
        epilog="example: sdtl probe --checkpoint runs/pre/checkpoints/encoder.pt --dataset synthetic --root synth "
               "--out runs/pre/probe")
    _add_common(p)
    p.add_argument("--weight-decays", default="1e-4,1e-3,1e-2,1e-1,1,10", metavar="W,W,...",
                   help="L2 strengths to choose from on validation (default 1e-4,...,10; one value: no choice)")
    _add_flags(p, PROBE_FLAGS)
    p.set_defaults(func=_cmd_probe)
