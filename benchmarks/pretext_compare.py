"""Which pre-training puts the most into an encoder? Scratch vs playback speed vs RSPNet on the synthetic set.

Run as committed on 2026-12-02 (70 min on two busy CPU cores); the README's RSPNet section has the table:
speed pre-training beats scratch by ~22 points after fine-tuning, the synthetic RSPNet recipe does not
learn on this budget (≈ scratch). One script, run from the repository root, writes ``OUT/summary.md`` and
``OUT/summary.json``:

    python benchmarks/pretext_compare.py --out pretext-compare [--seeds 3]

1. ``sdtl synth --preset small`` (labelled videos + the unlabelled pool);
2. three encoders of the demo's arch (R(2+1)D-10, width 1/8): *scratch* (random init, seed 0), *speed*
   (``sdtl pretrain --config synthetic_pretrain``: the recipe that made the shipped demo encoder) and
   *rspnet* (``sdtl pretrain --config synthetic_rspnet_pretrain``), both on the same pool;
3. each frozen encoder: ``sdtl retrieval`` (R@1, R@5) and ``sdtl probe`` (test acc@1) on the synthetic
   labelled set, 16-frame 32-px clips as the demo fine-tunes;
4. plain fine-tuning (λ = 0, ``synthetic_small``) from each encoder for seeds 0..S-1; test video acc@1
   mean ± std, and each pre-trained encoder against scratch and rspnet against speed as paired differences
   over seeds with a 95% t-interval.

Nothing is chosen by looking at test numbers: every setting is the recipes' own, fixed before the run.
Runs already finished in OUT are reused (a second call only redoes what is missing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sdtl.studies.stats import describe_difference, mean_std, paired_difference  # noqa: E402

CLIP = ["--clip-len", "16", "--size", "32", "--set", "data.backend=pyav"]


def sdtl(*args: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "sdtl", "-q", *args]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def scratch_encoder(path: Path) -> Path:
    if not path.exists():
        import torch

        from sdtl.models import build_encoder

        torch.manual_seed(0)
        torch.save(build_encoder("r2plus1d_vcop", width=0.125).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.log"
    data = out / "data"
    if not (data / "meta.json").exists():
        sdtl("synth", "--preset", "small", "--out", str(data), log=log)

    encoders = {"scratch": scratch_encoder(out / "scratch_encoder.pt")}
    for name, recipe in (("speed", "synthetic_pretrain"), ("rspnet", "synthetic_rspnet_pretrain")):
        run = out / f"pretrain_{name}"
        if not (run / "checkpoints" / "encoder.pt").exists():
            resume = ["--resume", "auto"] if run.exists() else []
            sdtl("pretrain", "--config", recipe, "--out", str(run), "--set", f"data.root={data}", *resume, log=log)
        encoders[name] = run / "checkpoints" / "encoder.pt"

    rows: dict[str, dict] = {}
    for name, enc in encoders.items():
        rep = out / f"repr_{name}"
        common = ["--checkpoint", str(enc), "--dataset", "synthetic", "--root", str(data), "--out", str(rep), *CLIP]
        if not (rep / "retrieval.json").exists():
            sdtl("retrieval", *common, log=log)
        if not (rep / "probe.json").exists():
            sdtl("probe", *common, log=log)
        retrieval = json.loads((rep / "retrieval.json").read_text())
        probe = json.loads((rep / "probe.json").read_text())
        tests = []
        for seed in range(args.seeds):
            run = out / f"finetune_{name}" / f"seed{seed}"
            if not (run / "results.json").exists():
                init = [] if name == "scratch" else ["--set", f"model.pretrained={enc}"]
                resume = ["--resume", "auto"] if run.exists() else []
                sdtl("finetune", "--config", "synthetic_small", "--out", str(run), "--set", f"data.root={data}",
                     "--set", "regularizer.weight=0", "--set", f"run.seed={seed}", *init, *resume, log=log)
            tests.append(json.loads((run / "results.json").read_text())["video_acc1"])
        rows[name] = {"retrieval": retrieval, "probe": probe, "finetune_test": tests}

    def recall(row, k):
        return float(row["retrieval"]["recall"][f"R@{k}"])

    lines = ["# Scratch vs playback-speed vs RSPNet pre-training on the synthetic set", "",
             f"`python benchmarks/pretext_compare.py --out {args.out} --seeds {args.seeds}` (R(2+1)D-10 width 1/8, "
             "16×32×32 clips; 5 tempo classes, chance 20%; retrieval and probe on frozen encoders, test list "
             "queries / is scored; fine-tuning: plain, λ = 0, `synthetic_small`).", "",
             "| encoder | retrieval R@1 | R@5 | linear probe test acc@1 | plain fine-tuning test acc@1 (mean ± std) |",
             "|---|---|---|---|---|"]
    for name, row in rows.items():
        m, s = mean_std(row["finetune_test"])
        lines.append(f"| {name} | {recall(row, 1):.1f} | {recall(row, 5):.1f} | "
                     f"{row['probe']['test']['acc1']:.1f} | {m:.1f} ± {s:.1f} |")
    lines.append("")
    seeds = list(range(args.seeds))
    diffs = {}
    for a, b in (("speed", "scratch"), ("rspnet", "scratch"), ("rspnet", "speed")):
        d = paired_difference(rows[a]["finetune_test"], rows[b]["finetune_test"], seeds)
        diffs[f"{a}-{b}"] = d
        lines.append("- " + describe_difference(d, f"fine-tuning from {a} − from {b}"))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "differences": diffs}, indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
