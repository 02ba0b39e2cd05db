#!/usr/bin/env bash
# A compressed student fine-tuned alone against distilled: LeNet-5 pruned by magnitude to
# SPARSITY (default 0.99) in one short AGP run (`convpress prune`, PRUNE_EPOCHS epochs), then
# for each seed EPOCHS more epochs with the pruned weights held at zero, once on the labels
# alone (`convpress distill --alpha 0`: the same command, data order and schedule, no
# teacher term) and once with the dense LeNet-5 as teacher (alpha 0.9, T = 4). Prints test
# errors (of 10,000) as mean ± standard deviation and how much of the pruned model's lost
# accuracy distillation recovers. Finished runs are kept.
#
#   bash bench/distill_compressed.sh   # TEACHER=runs/lenet5/model.safetensors SEEDS="1 2 3"
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
out=${OUT:-runs/distill-compressed}
teacher=${TEACHER:-runs/lenet5/model.safetensors}
seeds=${SEEDS:-"1 2 3"}
sparsity=${SPARSITY:-0.99}
prune_epochs=${PRUNE_EPOCHS:-1}
epochs=${EPOCHS:-2}
mkdir -p "$out"
pruned="$out/pruned"
[ -f "$pruned/model.safetensors" ] ||
    "$bin" prune --checkpoint "$teacher" --sparsity "$sparsity" --epochs "$prune_epochs" \
        --run-dir "$pruned" --force --no-progress >"$out/pruned.txt" 2>&1
for s in $seeds; do
    for a in 0 0.9; do
        d="$out/a$a-s$s"
        [ -f "$d/model.safetensors" ] ||
            "$bin" distill --teacher "$teacher" --student "$pruned/model.safetensors" \
                --alpha "$a" --epochs "$epochs" --lr 0.01 --seed "$s" --run-dir "$d" --force \
                --no-progress >"$d.txt" 2>&1
    done
done
python3 - "$out" "$seeds" "$teacher" <<'PY'
import json, os, statistics, sys
out, seeds, teacher = sys.argv[1], sys.argv[2].split(), sys.argv[3]
def last_acc(d):
    return json.loads(open(f"{d}/metrics.jsonl").read().split("\n")[-2])["test_acc"]
dense = last_acc(os.path.dirname(teacher))
pruned = last_acc(f"{out}/pruned")
alone = [round((1 - last_acc(f"{out}/a0-s{s}")) * 10000) for s in seeds]
dist = [round((1 - last_acc(f"{out}/a0.9-s{s}")) * 10000) for s in seeds]
m = lambda e: statistics.mean(e)
sd = lambda e: statistics.stdev(e) if len(e) > 1 else 0.0
dense_err = round((1 - dense) * 10000)
print(f"dense teacher: {dense_err} errors; pruned (before the runs): {round((1 - pruned) * 10000)} errors")
print(f"fine-tuned alone: {m(alone):.1f} ± {sd(alone):.1f} {alone}")
print(f"distilled:        {m(dist):.1f} ± {sd(dist):.1f} {dist}")
lost = m(alone) - dense_err
print(f"errors lost to pruning after fine-tuning: {lost:.1f}; distillation recovers {m(alone) - m(dist):.1f} of them ({100 * (m(alone) - m(dist)) / lost if lost > 0 else float('nan'):.0f}%)")
json.dump({"dense_errors": dense_err, "alone": alone, "distilled": dist, "sparsity": os.environ.get("SPARSITY", "0.99")}, open(f"{out}/summary.json", "w"), indent=1)
PY
