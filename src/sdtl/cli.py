"""The ``sdtl`` command line.

Each area of the package registers its own subcommands (``register(subparsers)``); this module only
wires them together, configures logging and turns errors into exit codes:
0 success, 1 a run that failed while running (:class:`~sdtl.errors.RunFailed`), 2 bad input
(:class:`~sdtl.errors.UserError`), 75 a run stopped on request with its state written
(:class:`~sdtl.errors.RunInterrupted`: SIGINT, SIGTERM, SIGUSR1; resume it), 130 interrupted at once
(a second Ctrl-C). ``--debug`` / ``SDTL_DEBUG=1`` print the traceback of an error with its cause.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from sdtl import __version__
from sdtl.cli_options import add_set
from sdtl.errors import ConfigError, RunInterrupted, SdtlError, UserError


def _add_run_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--config", metavar="NAME_OR_PATH",
                   help=f"{kind} recipe name (see `sdtl recipes`) or YAML file; optional with --resume "
                        f"(then the run's own config.yaml is used)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (must be new unless --resume)")
    add_set(p, "override a config key (repeatable), e.g. " + (
        "--set optim.lr=0.01 --set regularizer.weight=100" if kind == "finetune" else
        "--set optim.epochs=40 --set task.strides=[1,2,4,8]"))
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue a run: 'auto' = DIR/checkpoints/last.pt if present, else start fresh; "
                        "or a checkpoint path")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (same as --set run.deterministic=true)")
    add_slurm_options(p)


def add_slurm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm", action="store_true",
                   help="submit this command as a Slurm job (resources: the config's slurm section, e.g. "
                        "--set slurm.gpus_per_node=4 --set slurm.time=48:00:00); prints the job id and its log. "
                        "Preempted or timed-out jobs write their state, requeue and resume. Needs sdtl[slurm]")
    p.add_argument("--wait", action="store_true",
                   help="with --slurm: wait for the job and exit with its status (0 done, 1 failed, 75 stopped)")


def _load_run_config(args, kind: str):
    from pathlib import Path

    from sdtl.engine import config as cfgmod

    overrides = list(args.overrides)
    if args.deterministic:
        overrides.append("run.deterministic=true")
    source = args.config
    existing = Path(args.out) / "config.yaml"
    if args.resume and existing.exists():
        # The stored config is the run's identity: a resume continues it; only explicit --set /
        # --deterministic change it (warned and recorded in OUT/config_changes.jsonl).
        if source is not None and Path(source).resolve() != existing.resolve():
            logging.getLogger("sdtl").warning("--config %s ignored: resuming %s with its own config.yaml "
                                              "(change keys with --set)", source, args.out)
        source = str(existing)
    elif source is None:
        raise UserError("--config is required (a recipe from `sdtl recipes` or a YAML file); it may be "
                        "left out only with --resume on a run directory that has config.yaml")
    return cfgmod.load_config(source, overrides, kind=kind)


def _check_slurm_flags(args) -> bool:
    """True when the command is to be submitted to Slurm; ``--wait`` alone is a mistake."""
    if args.wait and not args.slurm:
        raise UserError("--wait waits for a Slurm job: use it with --slurm")
    return bool(args.slurm)


def cmd_finetune(args) -> int:
    from sdtl.engine.finetune import run_finetune

    cfg = _load_run_config(args, "finetune")
    if _check_slurm_flags(args):
        from sdtl.engine.slurm import submit_run

        results = submit_run("finetune", cfg, args.out, args.resume, wait=args.wait)
        if results:
            print(f"video acc@1 {results['video_acc1']:.2f} -> {args.out}/results.json")
        return 0
    results = run_finetune(cfg, args.out, resume=args.resume)
    if results:
        from sdtl.engine.evaluate import accuracy_line

        print(f"{accuracy_line(results, len(results['per_class_acc']))} -> {args.out}/results.json")
    return 0


def cmd_pretrain(args) -> int:
    from sdtl.engine.pretrain import run_pretrain

    cfg = _load_run_config(args, "pretrain")
    if _check_slurm_flags(args):
        from sdtl.engine.slurm import submit_run

        result = submit_run("pretrain", cfg, args.out, args.resume, wait=args.wait)
        path = result and result["encoder"]
    else:
        path = run_pretrain(cfg, args.out, resume=args.resume)
    if path:
        print(f"encoder checkpoint: {path}  (fine-tune with --set model.pretrained={path})")
    return 0


def cmd_evaluate(args) -> int:
    from sdtl.engine.evaluate import evaluate_checkpoint
    from sdtl.engine.evaluate import accuracy_line

    res = evaluate_checkpoint(args.checkpoint, args.out, args.overrides, args.allow_unsafe_pickle)
    if res:
        print(f"{accuracy_line(res, len(res['per_class_acc']))} -> {args.out}/results.json")
    return 0


def cmd_recipes(args) -> int:
    from sdtl.engine.config import list_recipes

    rows = list_recipes()
    if args.show:  # the YAML alone, so `sdtl recipes --show NAME > my.yaml` is a valid config
        from sdtl.engine.config import recipe_dir

        path = recipe_dir() / f"{args.show}.yaml"
        if not path.exists():
            raise UserError(f"--show {args.show}: no such recipe; use one of: "
                            f"{', '.join(r['name'] for r in rows)}")
        sys.stdout.write(path.read_text())
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['kind']:<8}  {r['description']}")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from sdtl.models import build_encoder, describe_checkpoint, export_encoder, load_encoder_weights

    if Path(args.out).exists():  # never overwrite a file sdtl did not write
        raise UserError(f"--out {args.out}: already exists; choose a new file name (export never overwrites)")
    info = describe_checkpoint(args.checkpoint, allow_unsafe_pickle=args.allow_unsafe_pickle)
    guess = info.get("arch_guess") or {}
    arch = args.arch or guess.get("arch")
    if not arch:
        raise UserError(f"{args.checkpoint}: cannot tell the architecture from its keys; pass --arch")
    options = dict(guess.get("options") or {}) if guess.get("arch") == arch else {}
    encoder = build_encoder(arch, **options)
    report = load_encoder_weights(encoder, args.checkpoint, arch, allow_unsafe_pickle=args.allow_unsafe_pickle)
    path = export_encoder(encoder, args.out)
    print(f"{report.summary()}\nencoder ({arch} {options}) -> {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # torch-free: names the regularizers in finetune --help
    from sdtl.regularizers.registry import REGULARIZERS

    parser = argparse.ArgumentParser(
        prog="sdtl", description="Self-distillation guided transfer learning for video action recognition.")
    parser.add_argument("--version", action="version", version=f"sdtl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback with its cause (same as SDTL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "finetune", help="fine-tune an encoder (optionally with self-distillation)",
        description="Fine-tune a pre-trained (or random) encoder plus a linear head on labelled videos, "
                    "with the paper's self-distillation regularizer when regularizer.weight > 0 (or another "
                    f"of regularizer.name: {', '.join(n for n in REGULARIZERS if n != 'sd')}; "
                    "LP-FT with optim.lp_epochs, "
                    "layer-wise lr decay with optim.layer_decay). Selects the "
                    "checkpoint on a validation part of the training list, tests the selected and the last "
                    "one with the multi-clip protocol, and writes config.yaml, metrics.jsonl, train.log, "
                    "curves.png, checkpoints/, results.json into --out.",
        epilog="example: sdtl finetune --config ucf101_r21d_sd --out runs/r21d --set data.root=/data/UCF101 "
               "--set model.pretrained=/weights/model_best_r21d_200epoch.pth.tar")
    _add_run_args(p, "finetune")
    p.set_defaults(func=cmd_finetune, resume_hint=RESUME_HINT)

    p = sub.add_parser("evaluate", help="multi-clip test of a fine-tuned checkpoint",
                       description="Test a checkpoint written by `sdtl finetune` with the protocol and dataset "
                                   "recorded in it (override any key with --set); writes results.json and "
                                   "confusion.png into --out.",
                       epilog="example: sdtl evaluate --checkpoint runs/r21d/checkpoints/best.pt --out runs/r21d/eval "
                              "--set eval.crops=3")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="an sdtl fine-tuning checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json and confusion.png go")
    add_set(p, "override the checkpoint's config, e.g. --set data.root=/data/UCF101 "
                "--set eval.num_clips=10 --set eval.crops=3")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load a checkpoint that needs full unpickling (runs code from the file)")
    p.set_defaults(func=cmd_evaluate)

    from sdtl.pretext.registry import PRETEXT

    p = sub.add_parser("pretrain", help=f"self-supervised pre-training (task.name: {' or '.join(PRETEXT)})",
                       description="Pre-train an encoder on unlabelled videos by predicting the playback speed "
                                   "(frame stride) of clips; writes checkpoints/encoder.pt (encoder + pretext "
                                   "head) and retention_probe.pt (for fine-tuning's eval.retention) into --out.",
                       epilog="example: sdtl synth --out synth && sdtl pretrain --config synthetic_pretrain "
                              "--out runs/pre --set data.root=synth")
    _add_run_args(p, "pretrain")
    p.set_defaults(func=cmd_pretrain, resume_hint=RESUME_HINT)

    p = sub.add_parser("export", help="write a checkpoint's encoder alone (state dict .pt or .safetensors)")
    p.add_argument("checkpoint", metavar="CKPT", help="any checkpoint sdtl can load (sdtl, RSPNet, torchvision, ...)")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.safetensors or FILE.pt")
    p.add_argument("--arch", default=None, help="architecture (default: guessed from the checkpoint)")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load a checkpoint that needs full unpickling (runs code from the file)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recipes", help="list shipped recipes")
    p.add_argument("--show", metavar="NAME", help="print one recipe's YAML")
    p.set_defaults(func=cmd_recipes)

    from sdtl.data import cli as data_cli
    from sdtl.data import synthetic
    from sdtl.models import cli as models_cli
    from sdtl.studies import compare, demo, represent, sweep, tune, wise

    for area in (wise, sweep, tune, demo, compare, represent, synthetic, data_cli, models_cli):
        area.register(sub)
    return parser


#: what to do after an interrupt or a stop request (a subcommand's ``resume_hint`` default): the training
#: commands resume with their own flag; every other command (and a study, which says more) is re-run
RESUME_HINT = "resume with --resume auto"
RERUN_HINT = "run the same command again"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the records of sweeps and comparisons
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("SDTL_DEBUG", "") not in ("", "0")
    resume_hint = getattr(args, "resume_hint", None) or RERUN_HINT
    try:
        return int(args.func(args) or 0)
    except SdtlError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        print(render_error(exc, resume_hint), file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `sdtl inspect ... | head`
        return 0
    except KeyboardInterrupt:
        if debug:
            import traceback

            traceback.print_exc()
        kept = "; completed epochs are in the run's checkpoints" if resume_hint == RESUME_HINT else ""
        print(f"sdtl: interrupted{kept} ({resume_hint})", file=sys.stderr)
        return 130


def render_error(exc: SdtlError, resume_hint: str) -> str:
    """The one line the CLI prints for a library error (the library speaks of config keys; here they
    become ``--set`` hints, and a stopped run says how to continue)."""
    if isinstance(exc, RunInterrupted):
        return f"sdtl: {exc} ({resume_hint})"
    if isinstance(exc, ConfigError):
        from sdtl.engine.config import is_config_key

        if is_config_key(exc.key):  # optim.milestones[1] is set as the whole list
            return f"sdtl: error: {exc.for_cli()} (set it with --set {exc.key.split('[', 1)[0]}=VALUE)"
        # a misspelt key or a whole section: there is no such key to set
        return f"sdtl: error: {exc.for_cli()} (config keys are set with --set SECTION.KEY=VALUE)"
    if isinstance(exc, UserError):
        return f"sdtl: error: {exc.for_cli()}"
    return f"sdtl: run failed: {exc}"

if __name__ == "__main__":
    sys.exit(main())
