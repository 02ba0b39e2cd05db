#!/usr/bin/env bash
# convpress against PyTorch on the CPU: the same models, batches and thread count, measured
# in one go and interleaved (convpress, then PyTorch, per configuration), with ratios printed.
#
#   bash bench/compare.sh                      # lenet5 at batch 64 and 1, 2 threads
#   MODELS="lenet5 resnet20" BATCHES=64 THREADS=2 SECONDS_PER=3 bash bench/compare.sh
#
# Needs PyTorch (bench/setup_torch.sh installs it; benchmark only). Run on an idle machine:
# both sides use every thread they are given. Raw JSON lines go to bench/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
models=${MODELS:-lenet5}
batches=${BATCHES:-64,1}
threads=${THREADS:-2}
seconds=${SECONDS_PER:-3}
out=${OUT_JSONL:-bench/results.jsonl}

bash bench/setup_torch.sh >&2
cargo build --release -q
bin=target/release/convpress
: >"$out"
for model in $models; do
  for batch in ${batches//,/ }; do
    echo "measuring $model batch $batch ($threads threads) ..." >&2
    "$bin" --threads "$threads" bench train --model "$model" --batch "$batch" \
      --seconds "$seconds" --json | tee -a "$out" >/dev/null
    python3 bench/torch_bench.py --model "$model" --batch "$batch" --threads "$threads" \
      --target-seconds "$seconds" 2>/dev/null | tee -a "$out" >/dev/null
  done
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
key = lambda r: (r["model"], r["batch"], r["threads"], r["mode"])
by = {}
for r in rows:
    by.setdefault(key(r), {})[r["framework"]] = r
print(f"{'model':<10} {'batch':>5} {'threads':>7} {'mode':<6} {'convpress img/s':>16} {'pytorch img/s':>14} {'ratio':>6}")
for k, v in by.items():
    if "convpress" in v and "pytorch" in v:
        c, p = v["convpress"]["images_per_sec"], v["pytorch"]["images_per_sec"]
        print(f"{k[0]:<10} {k[1]:>5} {k[2]:>7} {k[3]:<6} {c:>16.1f} {p:>14.1f} {c / p:>6.2f}")
PY
