#!/usr/bin/env bash
# The training-step speed levers of issue 5, one at a time, on the MMVAE+ reference network (configs/
# polymnist_reference.yaml: the authors' network, DReG, K 1, batch 64, fp32 unless bf16 is the lever), each a
# fresh `mmebm bench train` process on the real shards. "authors" = every lever off: NCHW convs, nn.Upsample
# then 3x3 conv, one decoder call per stratum. Prints one JSON line per measurement (and writes them to
# $OUT, default runs/bench_levers.jsonl) and a summary table with the ratio to the authors' structure and to
# the 5.8 tuples/s measured on the authors' own code on this machine (issue 5).
# bf16 autocast runs fewer steps (BF16_STEPS): without native bf16 (an AVX2-only CPU) it is several times slower.
# ONLY=REGEX runs only the rows whose label matches; --summary FILE prints the table of an earlier run's JSON lines.
# Usage: launch/bench_levers.sh [STEPS] [THREADS]   (run it on a quiet machine: nothing else on the cores)
#        launch/bench_levers.sh --summary FILE
set -euo pipefail
MMEBM=${MMEBM:-.venv/bin/mmebm}
STEPS=${1:-4}
THREADS=${2:-2}
BF16_STEPS=${BF16_STEPS:-1}
OUT=${OUT:-runs/bench_levers.jsonl}
CONFIG=${CONFIG:-configs/polymnist_reference.yaml}
OFF="model.batched_decode=false model.channels_last=false model.subpixel_upsample=false"
if [ "${1:-}" = --summary ]; then
  OUT=$2
else
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

measure() {  # measure LABEL THREADS OVERRIDES...   (STEPS_NOW, PROCS_NOW override $STEPS and 1 process for one row)
  local label=$1 threads=$2 steps=${STEPS_NOW:-$STEPS} procs=${PROCS_NOW:-1}; shift 2
  if [ -n "${ONLY:-}" ] && ! [[ $label =~ $ONLY ]]; then return 0; fi
  local batch=$((64 / procs))  # the global batch stays 64 (DDP averages the ranks' gradients)
  local cmd=("$MMEBM" bench train --config "$CONFIG" --batch-size "$batch" --steps "$steps" --warmup 1
             --processes "$procs" --no-laplace --threads "$threads" --json "$@")
  echo "== $label: ${cmd[*]}" >&2
  "${cmd[@]}" | python3 -c '
import json, sys
label = sys.argv[1]
for line in sys.stdin:
    row = json.loads(line)
    row["lever"] = label
    print(json.dumps(row))' "$label" | tee -a "$OUT"
}

# shellcheck disable=SC2086  # $OFF is a list of overrides
measure "authors (all levers off)" "$THREADS" $OFF
measure "+ batched decode" "$THREADS" model.batched_decode=true model.channels_last=false model.subpixel_upsample=false
measure "+ channels_last" "$THREADS" model.batched_decode=false model.subpixel_upsample=false
measure "+ sub-pixel upsampling" "$THREADS" model.batched_decode=false model.channels_last=false
measure "all levers on" "$THREADS" model.batched_decode=true
measure "default (channels_last, sub-pixel)" "$THREADS"
measure "default, 1 thread" 1
PROCS_NOW=2 measure "default, 2 processes x 1 thread (DDP)" 1
STEPS_NOW=$BF16_STEPS measure "default + bf16 autocast" "$THREADS" train.mixed_precision=bf16
measure "default + torch.compile" "$THREADS" train.compile=true
# shellcheck disable=SC2086
measure "narrow (width 16), levers off" "$THREADS" model.width=16 $OFF
measure "narrow (width 16), default" "$THREADS" model.width=16
fi

python3 - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = next((r for r in rows if r["lever"].startswith("authors")), rows[0])["samples_per_s"]
roof = {}  # the best dense matmul rate seen at each total thread count (the roof measurement is noisy)
for r in rows:
    roof[r["roof_threads"]] = max(roof.get(r["roof_threads"], 0.0), r["roof_gflops"])
print(f"{'lever':40} {'tuples/s':>9} {'s/step':>7} {'vs authors':>10} {'vs 5.8/s':>8} {'encode ms':>9} {'decode ms':>9} "
      f"{'backward ms':>11} {'GFLOP/step':>10} {'GFLOP/s':>7} {'% roof':>6} {'rss MB':>7}")
for r in rows:
    phases = {k: float("nan") if v is None else v for k, v in r["phases_ms"].items()}
    print(f"{r['lever']:40} {r['samples_per_s']:9.2f} {r['seconds_per_step']:7.2f} {r['samples_per_s'] / base:9.2f}x "
          f"{r['samples_per_s'] / 5.8:7.2f}x {phases.get('encode', float('nan')):9.0f} "
          f"{phases.get('decode', float('nan')):9.0f} {phases.get('backward', float('nan')):11.0f} "
          f"{r['gflop_per_step']:10.0f} {r['achieved_gflops']:7.1f} {100 * r['achieved_gflops'] / roof[r['roof_threads']]:5.0f}% "
          f"{max(r['peak_rss_mb']):7.0f}")
roofs = ", ".join(f"{g:.0f} GFLOP/s at {t} thread(s)" for t, g in sorted(roof.items()))
print(f"vs authors: against the authors' structure in this code (same machine, same run); vs 5.8/s: against the "
      f"authors' own code as measured when issue 5 was filed (another machine); phases are per step (encode and "
      f"decode: forward only); % roof: of the best dense fp32 1024^3 matmul rate seen at the row's total thread "
      f"count ({roofs})")
EOF
