"""The ``sdtl`` command line.

Each area of the package registers its own subcommands (``register(subparsers)``); this module only
wires them together, configures logging and turns errors into exit codes:
0 success, 1 a run that failed while running (:class:`~sdtl.errors.RunFailed`), 2 bad input
(:class:`~sdtl.errors.UserError`), 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys

from sdtl import __version__
from sdtl.errors import RunFailed, UserError


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable, into ``args.overrides``): the same option on every command that takes it."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_run_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--config", metavar="NAME_OR_PATH",
                   help=f"{kind} recipe name (see `sdtl recipes`) or YAML file; optional with --resume "
                        f"(then the run's own config.yaml is used)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (must be new unless --resume)")
    _add_set(p, "override a config key (repeatable), e.g. " + (
        "--set optim.lr=0.01 --set regularizer.weight=100" if kind == "finetune" else
        "--set optim.epochs=40 --set task.strides=[1,2,4,8]"))
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue a run: 'auto' = DIR/checkpoints/last.pt if present, else start fresh; "
                        "or a checkpoint path")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (same as --set run.deterministic=true)")


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


def cmd_finetune(args) -> int:
    from sdtl.engine.finetune import run_finetune

    cfg = _load_run_config(args, "finetune")
    results = run_finetune(cfg, args.out, resume=args.resume)
    if results:
        print(f"video acc@1 {results['video_acc1']:.2f}  acc@5 {results['video_acc5']:.2f}  "
              f"clip acc@1 {results['clip_acc1']:.2f}  mean-class {results['mean_class_acc']:.2f}  "
              f"-> {args.out}/results.json")
    return 0


def cmd_pretrain(args) -> int:
    from sdtl.engine.pretrain import run_pretrain

    cfg = _load_run_config(args, "pretrain")
    path = run_pretrain(cfg, args.out, resume=args.resume)
    if path:
        print(f"encoder checkpoint: {path}  (fine-tune with --set model.pretrained={path})")
    return 0


def cmd_evaluate(args) -> int:
    from sdtl.engine.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, args.out, args.overrides, args.allow_unsafe_pickle)
    if res:
        print(f"video acc@1 {res['video_acc1']:.2f}  acc@5 {res['video_acc5']:.2f}  clip acc@1 "
              f"{res['clip_acc1']:.2f}  mean-class {res['mean_class_acc']:.2f}  -> {args.out}/results.json")
    return 0


def cmd_wise(args) -> int:
    from sdtl.studies.wise import DEFAULT_ALPHAS, parse_alphas, run_wise, text_table

    alphas = parse_alphas(args.alphas) if args.alphas is not None else DEFAULT_ALPHAS
    report = run_wise(args.finetuned, args.out, pretrained=args.pretrained, alphas=alphas,
                      overrides=args.overrides, allow_unsafe_pickle=args.allow_unsafe_pickle)
    if report:
        print(f"{text_table(report)}\n-> {args.out}/wise.json, wise.md, wise.png")
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


def cmd_sweep(args) -> int:
    from sdtl.studies.sweep import run_sweep

    import shlex

    run_sweep(args.config, args.grid, args.seeds, args.out, sets=args.overrides, dry_run=args.dry_run,
              parallel=args.parallel, extend=args.extend, command=shlex.join(["sdtl", *args.argv]))
    return 0


def cmd_compare(args) -> int:
    import shlex

    from sdtl.studies.compare import run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    run_compare(args.out, methods=methods, seeds=args.seeds, lr=args.lr, data_dir=args.data,
                command=shlex.join(["sdtl", *args.argv]), sets=args.overrides)
    return 0


def cmd_demo(args) -> int:
    from sdtl.studies.demo import run_demo

    run_demo(args.out, quick=args.quick, seeds=args.seeds, data_dir=args.data, force=args.force,
             lr_grid=args.lr_grid)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdtl", description="Self-distillation guided transfer learning for video action recognition.")
    parser.add_argument("--version", action="version", version=f"sdtl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "finetune", help="fine-tune an encoder (optionally with self-distillation)",
        description="Fine-tune a pre-trained (or random) encoder plus a linear head on labelled videos, "
                    "with the paper's self-distillation regularizer when regularizer.weight > 0 (or another "
                    "of regularizer.name: fixed_teacher, ema_sd, l2sp, delta, bss; LP-FT with optim.lp_epochs, "
                    "layer-wise lr decay with optim.layer_decay). Selects the "
                    "checkpoint on a validation part of the training list, tests the selected and the last "
                    "one with the multi-clip protocol, and writes config.yaml, metrics.jsonl, train.log, "
                    "curves.png, checkpoints/, results.json into --out.",
        epilog="example: sdtl finetune --config ucf101_r21d_sd --out runs/r21d --set data.root=/data/UCF101 "
               "--set model.pretrained=/weights/model_best_r21d_200epoch.pth.tar")
    _add_run_args(p, "finetune")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="multi-clip test of a fine-tuned checkpoint",
                       description="Test a checkpoint written by `sdtl finetune` with the protocol and dataset "
                                   "recorded in it (override any key with --set); writes results.json and "
                                   "confusion.png into --out.",
                       epilog="example: sdtl evaluate --checkpoint runs/r21d/checkpoints/best.pt --out runs/r21d/eval "
                              "--set eval.crops=3")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="an sdtl fine-tuning checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="where results.json and confusion.png go")
    _add_set(p, "override the checkpoint's config, e.g. --set data.root=/data/UCF101 "
                "--set eval.num_clips=10 --set eval.crops=3")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load a checkpoint that needs full unpickling (runs code from the file)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("wise", help="WiSE-FT: evaluate weight-space ensembles of pre-trained and fine-tuned weights",
                       description="WiSE-FT (Wortsman et al., CVPR 2022): evaluate theta_alpha = (1-alpha)*theta_0 + "
                                   "alpha*theta_1 for each alpha on the run's validation part and on the test list "
                                   "(protocol and dataset from the fine-tuned checkpoint; override with --set). "
                                   "theta_1 is the fine-tuned model; theta_0 is an encoder checkpoint with the "
                                   "fine-tuned model's head, or another fine-tune checkpoint of the same arch and "
                                   "classes. The alpha with the best validation video acc@1 is selected (ties: the "
                                   "largest alpha); test is reported beside it. Writes wise.json, wise.md and "
                                   "wise.png into a new or empty --out.",
                       epilog="example: sdtl wise --finetuned runs/r21d/checkpoints/best.pt --out runs/r21d/wise "
                              "--alphas 0,0.25,0.5,0.75,1")
    p.add_argument("--finetuned", required=True, metavar="CKPT", help="theta_1: a checkpoint of `sdtl finetune`")
    p.add_argument("--pretrained", metavar="CKPT", default=None,
                   help="theta_0: an encoder checkpoint (RSPNet, sdtl pretrain, exported) or a fine-tune "
                        "checkpoint of the same arch and classes (default: the run's model.pretrained)")
    p.add_argument("--alphas", metavar="A,B,...", default=None,
                   help="comma-separated alphas in [0, 1] (default: 0,0.1,...,1; 0 = theta_0, 1 = theta_1)")
    p.add_argument("--out", required=True, metavar="DIR", help="new or empty directory for wise.json/md/png")
    _add_set(p, "override the checkpoint's config, e.g. --set data.root=/data/UCF101 --set eval.num_clips=10")
    p.add_argument("--allow-unsafe-pickle", action="store_true",
                   help="DANGEROUS: load checkpoints that need full unpickling (runs code from the files)")
    p.set_defaults(func=cmd_wise)

    p = sub.add_parser("sweep", help="a grid over config keys x seeds (e.g. a lambda sweep), mean ± std table",
                       description="Run the product of the --grid values x seeds 0..N-1 as ordinary fine-tuning runs "
                                   "in OUT/runs/<point>/seed<k>. Re-running the same command skips finished runs and "
                                   "resumes unfinished ones. Writes sweep.json, sweep.md (mean ± std over seeds of the "
                                   "validation accuracy that selected each checkpoint and of its test accuracy; the "
                                   "best point on validation is marked) and sweep.png.",
                       epilog="example: sdtl sweep --config ucf101_r21d_sd --grid regularizer.weight=0.1,1,10,100,1000 "
                              "--seeds 3 --out sweeps/lambda --set data.root=/data/UCF101 "
                              "--set model.pretrained=/weights/model_best_r21d_200epoch.pth.tar")
    p.add_argument("--config", required=True, metavar="NAME_OR_PATH", help="fine-tuning recipe name or YAML file")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2,...",
                   help="a swept config key and its values (repeatable: the sweep runs the product), "
                        "e.g. --grid regularizer.weight=0.1,1,10 --grid optim.lr=0.01,0.1; list values as [a,b]")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per point (default 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (new, or this sweep's to continue it)")
    _add_set(p, "override a config key for every run, as in finetune (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="runs at a time, as child processes; on a multi-GPU box each gets one GPU (default 1)")
    p.add_argument("--extend", action="store_true",
                   help="add values or seeds to the sweep already in --out (finished runs are reused)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("pretrain", help="self-supervised pre-training (playback-speed prediction)",
                       description="Pre-train an encoder on unlabelled videos by predicting the playback speed "
                                   "(frame stride) of clips; writes checkpoints/encoder.pt (encoder + pretext "
                                   "head) and retention_probe.pt (for fine-tuning's eval.retention) into --out.",
                       epilog="example: sdtl synth --out synth && sdtl pretrain --config synthetic_pretrain "
                              "--out runs/pre --set data.root=synth")
    _add_run_args(p, "pretrain")
    p.set_defaults(func=cmd_pretrain)

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

    p = sub.add_parser("demo", help="compare scratch / plain / self-distillation over seeds on the embedded "
                                    "synthetic dataset",
                       description="The paper's comparison on the embedded synthetic dataset: from scratch, "
                                   "plain fine-tuning and self-distillation from a pre-trained encoder, over "
                                   "seeds, with forgetting diagnostics and paired 95% intervals. --quick starts "
                                   "from the shipped pre-trained encoder (about 5 min on 2 cores); the full demo "
                                   "pre-trains its own (under 30 min); --lr-grid runs the learning-rate study "
                                   "behind the demo's settings.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="3 seeds from the shipped encoder (default out sdtl-demo-quick)")
    mode.add_argument("--lr-grid", action="store_true",
                      help="scratch / plain / SD (λ 1, 10, 100) over SGD lr 0.001-0.1 x 3 seeds, and the selection "
                           "rule on validation (default out sdtl-lr-grid)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: sdtl-demo, sdtl-demo-quick or sdtl-lr-grid by mode)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: full 5, quick 3, lr-grid 3)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="reuse a synthetic dataset written by `sdtl synth --preset small` (default: generate into OUT/data)")
    p.add_argument("--force", action="store_true",
                   help="use a non-empty --out that is not a demo folder (its files are kept; refused if it already "
                        "holds a name the demo writes, e.g. summary.md or runs/)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="self-distillation vs L2-SP, DELTA, BSS, LP-FT, ... on the embedded benchmark",
                       description="Fine-tune the shipped pre-trained encoder on the embedded synthetic benchmark with "
                                   "each method (scratch, plain, sd, fixed_teacher, ema_sd, l2sp, delta, bss, lp_ft, "
                                   "llrd), each method's own hyper-parameter picked from a small fixed grid on "
                                   "validation, over seeds; writes compare.md/json/png with test accuracy at the "
                                   "picked setting and paired differences to plain fine-tuning (95%% CI). About 35 "
                                   "min on 2 CPU cores for all methods and 3 seeds.",
                       epilog="example: sdtl compare --methods sd,l2sp,lp_ft --seeds 3 --out sdtl-compare")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default sdtl-compare)")
    p.add_argument("--methods", default=None, metavar="A,B,...",
                   help="comma-separated subset (default: all; plain is always included as the reference)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every method and grid value (default 3)")
    p.add_argument("--lr", type=float, default=0.01,
                   help="SGD learning rate for every method (default 0.01: where plain fine-tuning forgets, see docs/compare.md)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="reuse a dataset written by `sdtl synth --preset small` (default: generate into OUT/data)")
    _add_set(p, "override a key of the benchmark recipe (synthetic_small) for every run, e.g. --set optim.epochs=6")
    p.set_defaults(func=cmd_compare)

    from sdtl.data import cli as data_cli
    from sdtl.data import synthetic
    from sdtl.models import cli as models_cli

    synthetic.register(sub)
    data_cli.register(sub)
    models_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the records of sweeps and comparisons
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"sdtl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RunFailed as exc:
        print(f"sdtl: run failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `sdtl inspect ... | head`
        return 0
    except KeyboardInterrupt:
        print("sdtl: interrupted; completed epochs are in the run's checkpoints (resume with --resume auto)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
