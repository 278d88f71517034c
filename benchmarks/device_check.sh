#!/usr/bin/env bash
# GPU check of sdtl on one CUDA machine (H100/H200), no network, in about 8 minutes; prints one table.
#
# Steps (each under its own `timeout`, all together under CHECK_BUDGET_S, default 450 s):
#   1a. the CUDA-marked tests:             python -m pytest -v -x -m cuda
#   2.  benchmarks/sd_overhead.py          (r2plus1d_vcop b32 and c3d b24 at 112 on CUDA)
#   2b. benchmarks/sd_overhead.py at the transformers' real size, 16x224x224, bf16 autocast:
#       videomae_vit_b b8 and mvit_v2_s b4, then both again with grad checkpointing (goal: SD step
#       <= 1.35x plain, peak <= 1.10x); run after step 6, before 1b, so it cannot squeeze steps 3..6
#   3.  benchmarks/train_throughput.py     (paper sizes; compute only + engine + projected wall time)
#   4.  2-epoch engine runs with optim.amp=bf16 and optim.amp=fp16 on `sdtl synth --preset small`
#   5.  `python -m torch.distributed.run --nproc_per_node=1 -m sdtl finetune` (world_size in metrics.jsonl)
#       plus a 1-rank NCCL process group doing an all_reduce (the engine joins a process group only
#       when WORLD_SIZE > 1, so step 5's run itself does not touch NCCL)
#   6.  resume on GPU: 2 epochs, then --resume auto --set optim.epochs=3; epochs 1..3 once each
#   1b. the rest of the suite (-m "not cuda", pytest-xdist if present), with whatever time is left
# The table lists 1..6 in order. Exit status 0 whatever failed: the table says which.
#
# The machine has no PyAV and no network: carry the wheel. Once, on any machine with pip and
# network (or a package index), from the repo root:
#   mkdir -p .whl .git/info && python3 -m pip download --only-binary=:all: --no-deps --implementation cp \
#     --python-version 3.11 --platform manylinux_2_28_x86_64 "av>=12" -d .whl/
#   grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# (--python-version 3.11 picks PyAV's newest cp311-abi3 wheel, av-18.1.0 today, which installs on any
# CPython >= 3.11; asking for 3.12 gets av 19, cp312-abi3, which a 3.11 python3 refuses.)
# then the device tool's call:
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=540)
# (The wheel is 36 MB; with the repo about 41 MB of the 64 MiB a call may carry. A wheel under
# shared/wheels/ travels without `carry`, or point AV_WHEEL=/path/to/av-*.whl at one.)
# The wheel goes in with `pip install --no-index --no-deps --target /tmp/sdtl-site` (the machine's
# python3 already has torch, numpy, pyyaml, matplotlib, tensorboard, tqdm, safetensors, pytest);
# sdtl runs from source: PYTHONPATH=src:/tmp/sdtl-site, `python -m sdtl`, nothing installed.
# Results: this stdout (table last) and in $OUT (else /tmp/sdtl-device-check-results): summary.txt,
# device_check.log (every step's output), train_throughput.json. KEEP_WORK=1 keeps the run folders.
set -u
cd "$(dirname "$0")/.." || exit 0
START=$(date +%s)
BUDGET=${CHECK_BUDGET_S:-450}
PY=${PYTHON:-python3}
SITE=${SDTL_SITE:-/tmp/sdtl-site}
WORK=$(mktemp -d /tmp/sdtl-device-check.XXXXXX)
RESULTS=${OUT:-/tmp/sdtl-device-check-results}
mkdir -p "$RESULTS"
LOG="$RESULTS/device_check.log"
: >"$LOG"
rm -f "$RESULTS/train_throughput.json" "$RESULTS/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1

# ----------------------------------------------------------------------------------------- setup
echo "== setup: $(date -u +%FT%TZ), budget ${BUDGET}s, work dir $WORK" | tee -a "$LOG"
if ! "$PY" -c "import av" 2>/dev/null; then
  WHEEL=""
  for cand in ${AV_WHEEL:-} .whl/av-*.whl shared/wheels/av-*.whl shared/.whl/av-*.whl; do
    [ -f "$cand" ] && { WHEEL=$cand; break; }
  done
  if [ -n "$WHEEL" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEEL" >>"$LOG" 2>&1 \
      || echo "setup: pip could not install $WHEEL (see the log)" | tee -a "$LOG"
  else
    echo "setup: PyAV missing and no av-*.whl under .whl/ or shared/wheels/ (see this script's header)" | tee -a "$LOG"
  fi
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys, torch
try:
    import av
    pyav = f"PyAV {av.__version__}"
except Exception as exc:
    pyav = f"PyAV missing ({exc})"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device visible"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {gpu}, {pyav}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>&1 | tee -a "$LOG"

# -------------------------------------------------------------------------------------- machinery
declare -A STATUS FIGURE DURATION
ORDER=("1a cuda tests" "1b rest of suite" "2 sd_overhead" "2b sd_overhead 224" "3 train_throughput" "4 amp bf16/fp16" "5 torchrun 1 proc"
       "6 resume on GPU")

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# tmo MAX: this step's timeout, MAX capped by the time left; 0 when too little is left to try
tmo() {
  local l; l=$(left)
  if (( l < 20 )); then echo 0; elif (( $1 < l )); then echo "$1"; else echo "$l"; fi
}

# run_logged NAME MAX CMD...: run under timeout, output to $WORK/NAME.log and the combined log; sets RC
run_logged() {
  local name=$1 max=$2; shift 2
  local t; t=$(tmo "$max")
  local file="$WORK/${name// /_}.log"
  LAST_LOG=$file
  if (( t == 0 )); then RC=125; echo "(skipped: no time left)" >"$file"; return; fi
  echo "== $name (timeout ${t}s): $*" | tee -a "$LOG"
  timeout -k 10 "$t" "$@" >"$file" 2>&1
  RC=$?
  cat "$file" >>"$LOG"
  echo "== $name: exit $RC" >>"$LOG"
}

# record STEP STATUS FIGURE T0
record() {
  STATUS[$1]=$2
  FIGURE[$1]=$3
  DURATION[$1]=$(( $(date +%s) - $4 ))
  echo "-- $1: $2 | $3" | tee -a "$LOG"
  if [ "$2" != PASS ] && [ -n "${LAST_LOG:-}" ] && [ -f "$LAST_LOG" ]; then
    echo "   last lines of $(basename "$LAST_LOG"):"; tail -n 12 "$LAST_LOG" | sed 's/^/   | /' | cut -c1-220
  fi
}

status_of() {  # status from an exit code: PASS, FAIL (exit N), TIMEOUT, SKIP
  case $1 in
    0) echo PASS ;; 124|137) echo TIMEOUT ;; 125) echo SKIP ;; *) echo "FAIL($1)" ;;
  esac
}

pytest_figure() {  # the closing summary line, or PASSED/FAILED counts so far when it was cut off
  local summary
  summary=$(grep -E "(passed|failed|error|skipped|deselected|no tests ran)" "$1" | grep -E " in [0-9.]+s" | tail -n 1 | tr -d '=' \
            | sed 's/^ *//; s/ *$//')
  if [ -n "$summary" ]; then echo "$summary"; else
    echo "cut off: $(grep -c ' PASSED' "$1") passed, $(grep -c -E ' (FAILED|ERROR)' "$1") failed so far"
  fi
}

# A run's config.yaml runtime + metrics.jsonl + results.json, checked against expectations
cat >"$WORK/check_run.py" <<'EOF'
"""check_run.py RUN_DIR [amp=bf16] [epochs=2] [world_size=1]: prints FIGURE: ..., exit 1 on a problem."""
import json, math, sys
from pathlib import Path

import yaml

d = Path(sys.argv[1])
want = dict(a.split("=", 1) for a in sys.argv[2:])
if not (d / "config.yaml").exists():
    print(f"FIGURE: no run in {d.name} (see the log)")
    sys.exit(1)
problems = []
rt = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("runtime") or {} if (d / "config.yaml").exists() else {}
recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()] \
    if (d / "metrics.jsonl").exists() else []
epochs = [r["epoch"] for r in recs if r.get("epoch", 0) >= 1]
train = [r for r in recs if "train_loss" in r]
if "amp" in want and rt.get("amp") != want["amp"]:
    problems.append(f"runtime amp {rt.get('amp')!r}, wanted {want['amp']}")
if "epochs" in want and epochs != list(range(1, int(want["epochs"]) + 1)):
    problems.append(f"metrics.jsonl epochs {epochs}, wanted 1..{want['epochs']} once each")
if "world_size" in want and {r.get("world_size") for r in train} != {int(want["world_size"])}:
    problems.append(f"world_size {sorted({r.get('world_size') for r in train}, key=str)}, wanted {want['world_size']}")
if any(not math.isfinite(r["train_loss"]) for r in train):
    problems.append("non-finite train_loss")
if rt.get("device", "").split(":")[0] != "cuda":
    problems.append(f"ran on {rt.get('device')!r}, not cuda")
res = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else None
if res is None:
    problems.append("no results.json")
parts = [f"amp {rt.get('amp')}{'+scaler' if rt.get('grad_scaler') else ''}", f"epochs {epochs}"]
if train:
    parts.append(f"{train[-1]['clips_per_s']:.0f} clips/s, wait {100 * train[-1]['data_wait']:.0f}%")
    parts.append(f"world_size {train[-1].get('world_size')}")
if res is not None:
    parts.append(f"test acc@1 {res['video_acc1']:.1f}%")
print("FIGURE: " + ", ".join(parts) + ("; PROBLEM: " + "; ".join(problems) if problems else ""))
sys.exit(1 if problems else 0)
EOF

# check_run STEPDIR ARGS...: sets RC and FIG from check_run.py
check_run() {
  local out
  out=$("$PY" "$WORK/check_run.py" "$@" 2>&1)
  RC=$?
  echo "$out" >>"$LOG"
  FIG=$(echo "$out" | grep '^FIGURE: ' | tail -n 1 | sed 's/^FIGURE: //')
  [ -n "$FIG" ] || FIG=$(echo "$out" | tail -n 1 | cut -c1-160)
}

SDTL=("$PY" -m sdtl -q)
SMALL=(--config synthetic_small --set "data.root=$WORK/synth" --set run.device=cuda --set data.workers=4)

# ------------------------------------------------------------------------------------------ steps
# 1a. the tests marked cuda
T0=$(date +%s)
run_logged "1a cuda tests" 120 "$PY" -m pytest -v -x -m cuda -p no:cacheprovider tests
FIG=$(pytest_figure "$LAST_LOG")
ST=$(status_of $RC)
if [ "$ST" = PASS ] && ! grep -q -E "[0-9]+ passed" <<<"$FIG"; then ST="FAIL(none ran)"  # all skipped: no CUDA?
elif [ "$ST" = PASS ] && grep -q -E "[0-9]+ skipped" <<<"$FIG"; then ST="PASS*"; fi  # a skip with CUDA visible
record "1a cuda tests" "$ST" "$FIG" "$T0"

# 2. SD overhead at the paper's configs
T0=$(date +%s)
run_logged "2 sd_overhead" 60 "$PY" benchmarks/sd_overhead.py --device cuda
# rows: ARCH w=W TxSxS b=B plain_ms sd_ms time_ratio plain_MiB sd_MiB mem_ratio Mparams
FIG=$(awk '/ b=[0-9]+/ {printf "%s%s %s: time x%s mem x%s", sep, $1, $(NF-7), $(NF-4), $(NF-1); sep="; "}' \
      "$LAST_LOG" 2>/dev/null)
ST=$(status_of $RC)
if [ "$ST" = PASS ]; then
  awk '/ b=[0-9]+/ { if ($(NF-4) > 1.35 || $(NF-1) > 1.05) bad=1 } END { exit bad }' "$LAST_LOG" || FIG="$FIG (over target 1.35/1.05)"
fi
record "2 sd_overhead" "$ST" "${FIG:-no figures}" "$T0"

# 3. training throughput: compute only, engine, projection
T0=$(date +%s)
run_logged "3 train_throughput" 170 "$PY" benchmarks/train_throughput.py --device cuda --steps 12 \
  --json "$RESULTS/train_throughput.json"
ST=$(status_of $RC)
FIG=$("$PY" - "$RESULTS/train_throughput.json" <<'EOF' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
out = []
for arch in ("r2plus1d_vcop", "c3d"):
    ok = [x for x in r.get("compute_only", []) if x.get("arch") == arch and "error" not in x]
    if ok:
        b = max(ok, key=lambda x: x["sd_clips_s"])
        out.append(f"{arch} best SD {b['sd_clips_s']:.0f} clips/s ({b['precision']}, {'CL' if b['format'] == 'channels_last' else 'contig'})")
e = r.get("engine") or {}
if "clips_per_s" in e:
    out.append(f"engine {e['clips_per_s']:.0f} clips/s, wait {100 * e['data_wait']:.0f}%, {e['workers']} workers")
elif e:
    out.append(f"engine: {e.get('error', '')[:60]}")
proj = r.get("projection", {})
eng = [v for k, v in proj.items() if "engine" in k]
if eng:
    out.append(f"paper run {eng[0].split('(')[0].strip()}")
print("; ".join(out))
EOF
)
[ "$ST" = PASS ] && grep -q "engine:" <<<"$FIG" && ST="PASS*"  # compute part ran, engine did not
record "3 train_throughput" "$ST" "${FIG:-no figures}" "$T0"

# 4. AMP runs on the synthetic small set
T0=$(date +%s)
run_logged "4a synth small" 60 "${SDTL[@]}" synth --preset small --pool-size 0 --out "$WORK/synth"
if (( RC != 0 )); then
  record "4 amp bf16/fp16" "$(status_of $RC)" "sdtl synth failed" "$T0"
else
  FIGS=(); ST4=PASS
  for amp in bf16 fp16; do
    run_logged "4 amp $amp" 60 "${SDTL[@]}" finetune "${SMALL[@]}" --set optim.epochs=2 --set "optim.amp=$amp" \
      --out "$WORK/amp_$amp"
    s=$(status_of $RC)
    check_run "$WORK/amp_$amp" "amp=$amp" epochs=2
    (( RC != 0 )) && [ "$s" = PASS ] && s="FAIL(check)"
    [ "$s" = PASS ] || [ "$ST4" != PASS ] || ST4=$s  # the first problem is the step's status
    FIGS+=("$amp: $FIG")
  done
  record "4 amp bf16/fp16" "$ST4" "${FIGS[0]} | ${FIGS[1]}" "$T0"
fi

# 5. torchrun with one process, and a 1-rank NCCL group
T0=$(date +%s)
if [ -d "$WORK/synth" ]; then
  run_logged "5 torchrun 1 proc" 70 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m sdtl -q finetune "${SMALL[@]}" --set optim.epochs=1 --out "$WORK/ddp1"
  ST=$(status_of $RC)
  check_run "$WORK/ddp1" world_size=1 epochs=1
  (( RC != 0 )) && [ "$ST" = PASS ] && ST="FAIL(check)"
  FIG5=$FIG
else
  ST=SKIP; FIG5="no synthetic data (step 4 failed)"
fi
run_logged "5b nccl probe" 40 "$PY" - <<'EOF'
import os
import torch
import torch.distributed as dist
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
t = torch.arange(4.0, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
print(f"NCCL_OK {'.'.join(map(str, torch.cuda.nccl.version()))} sum={t.sum().item():g}")
dist.destroy_process_group()
EOF
NCCL=$(grep -o 'NCCL_OK [^ ]*' "$LAST_LOG" | sed 's/NCCL_OK/NCCL/')
if [ -n "$NCCL" ]; then FIG5="$FIG5; 1-rank $NCCL all_reduce ok"
elif (( RC == 125 )); then FIG5="$FIG5; NCCL probe not started"
else FIG5="$FIG5; NCCL probe failed"; [ "$ST" = PASS ] && ST="FAIL(nccl)"; fi
record "5 torchrun 1 proc" "$ST" "$FIG5" "$T0"

# 6. resume on GPU: 2 epochs, then --resume auto to 3
T0=$(date +%s)
if [ -d "$WORK/synth" ]; then
  run_logged "6a resume first" 60 "${SDTL[@]}" finetune "${SMALL[@]}" --set optim.epochs=2 --out "$WORK/resume"
  ST=$(status_of $RC)
  if [ "$ST" = PASS ]; then
    run_logged "6b resume auto" 60 "${SDTL[@]}" finetune --out "$WORK/resume" --resume auto --set optim.epochs=3
    ST=$(status_of $RC)
  fi
  check_run "$WORK/resume" epochs=3
  (( RC != 0 )) && [ "$ST" = PASS ] && ST="FAIL(check)"
  [ "$ST" = SKIP ] && FIG="not started (no time left)"
  record "6 resume on GPU" "$ST" "$FIG" "$T0"
else
  record "6 resume on GPU" SKIP "no synthetic data (step 4 failed)" "$T0"
fi

# 2b. SD overhead of the transformers at their real size (16x224x224, bf16 autocast), each config under
# its own timeout; run here, after 3..6, so that it takes its time from 1b's share only
T0=$(date +%s)
ST=PASS; FIGS=(); OVER=""; FAILLOG=""
for conf in "videomae_vit_b 8" "mvit_v2_s 4" "videomae_vit_b 8 --grad-checkpointing" "mvit_v2_s 4 --grad-checkpointing"; do
  read -r arch batch ckpt <<<"$conf"
  run_logged "2b sd_overhead $arch b$batch${ckpt:+ ckpt}" 75 "$PY" benchmarks/sd_overhead.py --device cuda \
    --arch "$arch" --batch "$batch" --amp bf16 ${ckpt:+"$ckpt"} --steps 10
  s=$(status_of $RC)
  # row: SDROW arch variant TxSxS bB mode plain_ms sd_ms time_ratio ok plain_MiB sd_MiB mem_ratio ok step_peak Mparams
  row=$(awk '$1 == "SDROW" {printf "%s %s %s: time x%s mem x%s (%.1f GiB)", $2, $5, $6, $9, $13, $12 / 1024}' "$LAST_LOG" 2>/dev/null)
  awk '$1 == "SDROW" && ($10 != "yes" || $14 != "yes") {bad=1} END {exit !bad}' "$LAST_LOG" 2>/dev/null && OVER=" (over goal 1.35/1.10)"
  if [ "$s" = PASS ] && [ -z "$row" ]; then s="FAIL(no row)"; fi
  [ "$s" = PASS ] || [ "$ST" != PASS ] || { ST=$s; FAILLOG=$LAST_LOG; }  # the first problem is the step's status
  FIGS+=("${row:-$arch b$batch${ckpt:+ ckpt}: $s}")
done
LAST_LOG=${FAILLOG:-$LAST_LOG}  # record shows the tail of the first failed config's log
FIG=$(IFS=';'; echo "${FIGS[*]}" | sed 's/;/; /g')
record "2b sd_overhead 224" "$ST" "$FIG$OVER" "$T0"

# 1b. the rest of the suite, in the time left
T0=$(date +%s)
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
run_logged "1b rest of suite" 600 "$PY" -m pytest -v -x -m "not cuda" -p no:cacheprovider "${XDIST[@]}" tests
FIG=$(pytest_figure "$LAST_LOG")
[ ${#XDIST[@]} -gt 0 ] && FIG="$FIG (xdist -n 8)"
ST=$(status_of $RC)
[ "$ST" = SKIP ] && FIG="not started (no time left)"
record "1b rest of suite" "$ST" "$FIG" "$T0"

# ------------------------------------------------------------------------------------------ table
{
  echo
  echo "sdtl device check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")' 2>/dev/null), total $(( $(date +%s) - START )) s of ${BUDGET}"
  printf '%-20s %-14s %5s  %s\n' step status s "key figure"
  printf '%-20s %-14s %5s  %s\n' -------------------- -------------- ----- ----------
  for s in "${ORDER[@]}"; do
    printf '%-20s %-14s %5s  %s\n' "$s" "${STATUS[$s]:-SKIP}" "${DURATION[$s]:-0}" "${FIGURE[$s]:-not run}" | cut -c1-400
  done
  echo "PASS* = passed with a caveat in its figure (tests skipped, or the engine part did not run);"
  echo "TIMEOUT/SKIP = cut by its timeout / not started for lack of time (CHECK_BUDGET_S=$BUDGET)"
} >"$RESULTS/summary.txt"
if [ -f "$WORK/3_train_throughput.log" ]; then
  echo; echo "== step 3 output (benchmarks/train_throughput.py)"; cat "$WORK/3_train_throughput.log"
fi
cat "$RESULTS/summary.txt"  # last, so that the tail of this output holds the table
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"  # synthetic data and run folders; the logs are in $RESULTS
exit 0
