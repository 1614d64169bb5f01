#!/usr/bin/env bash
# The training-step speed levers of issue 5, one at a time, on the MMVAE+ reference network (configs/
# polymnist_reference.yaml: the authors' network, DReG, K 1, batch 64, fp32 unless bf16 is the lever), each a
# fresh `mmebm bench train` process on the real shards. "authors" = every lever off: NCHW convs, nn.Upsample
# then 3x3 conv, one decoder call per stratum. Prints one JSON line per measurement (and writes them to
# $OUT, default runs/bench_levers.jsonl) and a summary table with the ratio to the authors' structure and to
# the 5.8 tuples/s measured on the authors' own code on this machine (issue 5).
# Usage: launch/bench_levers.sh [STEPS] [THREADS]   (run it on a quiet machine: nothing else on the cores)
set -euo pipefail
MMEBM=${MMEBM:-.venv/bin/mmebm}
STEPS=${1:-4}
THREADS=${2:-2}
OUT=${OUT:-runs/bench_levers.jsonl}
CONFIG=${CONFIG:-configs/polymnist_reference.yaml}
OFF="model.batched_decode=false model.channels_last=false model.subpixel_upsample=false"
mkdir -p "$(dirname "$OUT")"
: >"$OUT"

measure() {  # measure LABEL THREADS OVERRIDES...
  local label=$1 threads=$2; shift 2
  echo "== $label: $MMEBM bench train --config $CONFIG --batch-size 64 --steps $STEPS --warmup 1 --processes 1 --threads $threads $*" >&2
  "$MMEBM" bench train --config "$CONFIG" --batch-size 64 --steps "$STEPS" --warmup 1 --processes 1 --no-laplace \
    --threads "$threads" --json "$@" | python3 -c '
import json, sys
label = sys.argv[1]
for line in sys.stdin:
    row = json.loads(line)
    row["lever"] = label
    print(json.dumps(row))' "$label" | tee -a "$OUT"
}

# shellcheck disable=SC2086  # $OFF is a list of overrides
measure "authors (all levers off)" "$THREADS" $OFF
measure "+ batched decode" "$THREADS" model.channels_last=false model.subpixel_upsample=false
measure "+ channels_last" "$THREADS" model.batched_decode=false model.subpixel_upsample=false
measure "+ sub-pixel upsampling" "$THREADS" model.batched_decode=false model.channels_last=false
measure "all levers on (default)" "$THREADS"
measure "all on, 1 thread" 1
measure "all on + bf16 autocast" "$THREADS" train.mixed_precision=bf16
measure "all on + torch.compile" "$THREADS" train.compile=true
measure "all on, narrow (width 16)" "$THREADS" model.width=16

python3 - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = rows[0]["samples_per_s"]
print(f"{'lever':32} {'tuples/s':>9} {'s/step':>7} {'vs authors':>10} {'vs 5.8/s':>8} {'decode ms':>9} {'backward ms':>11} {'rss MB':>7}")
for r in rows:
    phases = {k: float("nan") if v is None else v for k, v in r["phases_ms"].items()}
    print(f"{r['lever']:32} {r['samples_per_s']:9.1f} {r['seconds_per_step']:7.2f} {r['samples_per_s'] / base:9.2f}x "
          f"{r['samples_per_s'] / 5.8:7.2f}x {phases.get('decode', float('nan')):9.0f} "
          f"{phases.get('backward', float('nan')):11.0f} {max(r['peak_rss_mb']):7.0f}")
EOF
