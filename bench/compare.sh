#!/usr/bin/env bash
# convpress against PyTorch on the CPU: the same models, batches and thread count, measured
# in one go and interleaved (convpress, then PyTorch, per configuration), with ratios printed.
#
#   bash bench/compare.sh                      # lenet5 at batch 64 and 1, 2 threads
#   MODELS="lenet5 resnet20" BATCHES=64 THREADS=2 SECONDS_PER=3 ROUNDS=3 bash bench/compare.sh
#   ENGINES="convpress burn" bash bench/compare.sh   # also convpress with Burn's own ops
#
# Each configuration is measured ROUNDS times (default 3), interleaved, and the median is kept:
# shared machines drift by tens of percent from one minute to the next.
# Needs PyTorch (bench/setup_torch.sh installs it; benchmark only). Run on an idle machine:
# both sides use every thread they are given. Raw JSON lines go to bench/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
models=${MODELS:-lenet5}
batches=${BATCHES:-64,1}
threads=${THREADS:-2}
seconds=${SECONDS_PER:-3}
rounds=${ROUNDS:-3}
engines=${ENGINES:-convpress}
out=${OUT_JSONL:-bench/results.jsonl}

bash bench/setup_torch.sh >&2
cargo build --release -q
bin=target/release/convpress
: >"$out"
for round in $(seq "$rounds"); do
  for model in $models; do
    for batch in ${batches//,/ }; do
      echo "round $round: $model batch $batch ($threads threads) ..." >&2
      for engine in $engines; do
        "$bin" --threads "$threads" --ops "$engine" bench train --model "$model" \
          --batch "$batch" --seconds "$seconds" --json | tee -a "$out" >/dev/null
      done
      python3 bench/torch_bench.py --model "$model" --batch "$batch" --threads "$threads" \
        --target-seconds "$seconds" 2>/dev/null | tee -a "$out" >/dev/null
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    who = r["framework"] if r["framework"] == "pytorch" else f"convpress/{r.get('ops', 'convpress')}"
    key = (r["model"], r["batch"], r["threads"], r["mode"])
    by.setdefault(key, {}).setdefault(who, []).append(r["images_per_sec"])
print(f"{'model':<10} {'batch':>5} {'threads':>7} {'mode':<6} {'engine':<19} {'img/s':>9} "
      f"{'pytorch img/s':>14} {'ratio':>6}   (medians of {max(len(v) for d in by.values() for v in d.values())} rounds)")
for k, v in by.items():
    if "pytorch" not in v:
        continue
    p = statistics.median(v["pytorch"])
    for who, xs in sorted(v.items()):
        if who == "pytorch":
            continue
        c = statistics.median(xs)
        print(f"{k[0]:<10} {k[1]:>5} {k[2]:>7} {k[3]:<6} {who:<19} {c:>9.1f} {p:>14.1f} {c / p:>6.2f}")
PY
