#!/usr/bin/env bash
# Does the stage and recipe machinery cost training speed? Trains LeNet-5 the same way with
# `convpress train` and with a one-stage recipe run by `convpress compress`, ROUNDS times
# interleaved, and prints each run's images per second (mean over its epochs, from its
# metrics.jsonl), the medians, and their ratio (recipe / train; 1.0 is no overhead). Odd
# rounds start with `train`, even rounds with `compress`, so neither always runs first.
#
#   ROUNDS=3 EPOCHS=2 bash bench/pipeline_overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
EPOCHS=${EPOCHS:-2}
BIN=target/release/convpress
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/train.toml" <<TOML
description = "pipeline overhead: one train stage"
[report]
latency-seconds = 0.01
batches = [1]
[[stage]]
kind = "train"
model = "lenet5"
epochs = $EPOCHS
TOML
mean_rate() { # metrics.jsonl -> mean images/s over its epochs
  python3 -c 'import json,sys; r=[json.loads(l)["images_per_sec"] for l in open(sys.argv[1]) if l.strip()]; print(sum(r)/len(r))' "$1"
}
train_rates=(); recipe_rates=()
run_train() {
  "$BIN" train --model lenet5 --epochs "$EPOCHS" --no-progress --run-dir "$work/train-$1" > /dev/null 2>&1
}
run_recipe() {
  "$BIN" compress --recipe "$work/train.toml" --no-progress --run-dir "$work/recipe-$1" > /dev/null 2>&1
}
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then run_train "$r"; run_recipe "$r"; else run_recipe "$r"; run_train "$r"; fi
  t=$(mean_rate "$work/train-$r/metrics.jsonl")
  c=$(mean_rate "$work/recipe-$r/stages/01-train/metrics.jsonl")
  echo "round $r: convpress train $t img/s, compress (train stage) $c img/s"
  train_rates+=("$t"); recipe_rates+=("$c")
done
python3 - "${train_rates[*]}" "${recipe_rates[*]}" <<'PY'
import statistics, sys
t = [float(x) for x in sys.argv[1].split()]
c = [float(x) for x in sys.argv[2].split()]
mt, mc = statistics.median(t), statistics.median(c)
print(f"median: convpress train {mt:.0f} img/s, recipe train stage {mc:.0f} img/s, ratio {mc / mt:.3f}")
PY
