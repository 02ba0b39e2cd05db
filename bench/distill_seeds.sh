#!/usr/bin/env bash
# Knowledge distillation against training alone, over seeds: for each student and seed, one
# `convpress distill` run at ALPHA (default 0.9, T = 4) from the TEACHER checkpoint and one at
# alpha 0 (the labels alone: the same command, data order, schedule and seed, with no
# teacher term). Prints test errors (of 10,000) as mean ± standard deviation and writes them
# as JSON. With HINT=student-layer:teacher-layer:epochs (e.g. layers.2:layers.2:2) a third run
# per seed trains FitNets' hint first (those epochs of the EPOCHS), then distils. Finished runs
# are kept, so a rerun only does what is missing.
#
#   bash bench/distill_seeds.sh   # TEACHER=runs/lenet5/model.safetensors SEEDS="1 2 3 4 5"
#                                 # STUDENTS="lenet300:0.1 lenet5:0.25" EPOCHS=20 LR=0.01
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
out=${OUT:-runs/distill-seeds}
teacher=${TEACHER:-runs/lenet5/model.safetensors}
seeds=${SEEDS:-"1 2 3 4 5"}
students=${STUDENTS:-"lenet300:0.1 lenet5:0.25"}
epochs=${EPOCHS:-20}
lr=${LR:-0.01}
temp=${T:-4}
alpha=${ALPHA:-0.9}
hint=${HINT:-}
mkdir -p "$out"
for st in $students; do
    model=${st%%:*}
    width=${st##*:}
    for s in $seeds; do
        for a in 0 "$alpha"; do
            d="$out/$model-w$width-a$a-s$s"
            [ -f "$d/model.safetensors" ] ||
                "$bin" distill --teacher "$teacher" --student "$model" --width "$width" \
                    --alpha "$a" --temperature "$temp" --epochs "$epochs" --lr "$lr" \
                    --seed "$s" --run-dir "$d" --force --no-progress >"$d.txt" 2>&1
        done
        if [ -n "$hint" ]; then
            IFS=: read -r hs ht he <<<"$hint"
            d="$out/$model-w$width-hint-s$s"
            [ -f "$d/model.safetensors" ] ||
                "$bin" distill --teacher "$teacher" --student "$model" --width "$width" \
                    --alpha "$alpha" --temperature "$temp" --epochs "$epochs" --lr "$lr" \
                    --seed "$s" --hint-student "$hs" --hint-teacher "$ht" --hint-epochs "$he" \
                    --run-dir "$d" --force --no-progress >"$d.txt" 2>&1
        fi
    done
done
python3 - "$out" "$seeds" "$students" "$alpha" "$temp" "$hint" <<'PY'
import json, statistics, sys
out, seeds, students, alpha, temp, hint = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4], sys.argv[5], sys.argv[6]
rows = []
for st in students:
    model, width = st.split(":")
    row = {"student": model, "width": float(width), "alpha": float(alpha), "temperature": float(temp)}
    runs = [("a0", "alone"), (f"a{alpha}", "distilled")] + ([("hint", "fitnets")] if hint else [])
    for a, key in runs:
        errs = []
        for s in seeds:
            last = open(f"{out}/{model}-w{width}-{a}-s{s}/metrics.jsonl").read().split("\n")[-2]
            errs.append(round((1 - json.loads(last)["test_acc"]) * 10000))
        row[key] = errs
    rows.append(row)
print(f"{'student':<18} {'seeds':>5} {'alone: errors':>22} {'distilled: errors':>22} {'gap':>8}")
for r in rows:
    a, d = r["alone"], r["distilled"]
    fmt = lambda e: f"{statistics.mean(e):.1f} ± {statistics.stdev(e) if len(e) > 1 else 0:.1f}"
    print(f"{r['student'] + ' x' + str(r['width']):<18} {len(a):>5} {fmt(a):>22} {fmt(d):>22} {statistics.mean(a) - statistics.mean(d):>8.1f}")
    print(f"{'':<18} {'':>5} {str(a):>22} {str(d):>22}")
    if "fitnets" in r:
        print(f"{'  FitNets (hint ' + hint + ')':<28} {fmt(r['fitnets']):>22} {str(r['fitnets'])}")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
