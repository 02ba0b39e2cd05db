#!/usr/bin/env bash
# Every compact rewrite of LeNet-5 and ResNet-20 (`convpress rewrite --to FORM`), each
# fine-tuned, in one folder; prints one table of parameters, FLOPs, whole-model latency at
# batch 1 and 64 (measured in turns with the original) and test accuracy before fine-tuning
# and after, and writes it as JSON. Finished runs are kept. The trained models come from
# `convpress train --model lenet5 --run-dir runs/lenet5` and `convpress train --model
# resnet20 --epochs 3 --train-limit 10000 --run-dir runs/resnet20`.
#
#   bash bench/compact_rewrites.sh   # OUT=runs/compact LENET5=... RESNET20=...
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
out=${OUT:-runs/compact}
lenet5=${LENET5:-runs/lenet5/model.safetensors}
resnet20=${RESNET20:-runs/resnet20/model.safetensors}
mkdir -p "$out"
run() { # name checkpoint form flags...
    local name=$1 ckpt=$2 form=$3
    shift 3
    [ -f "$out/$name/report.json" ] ||
        "$bin" rewrite --to "$form" --checkpoint "$ckpt" --run-dir "$out/$name" --force \
            --no-progress "$@" >"$out/$name.txt" 2>&1 || echo "$name failed: see $out/$name.txt"
}
for f in separable crelu rotations; do
    run "lenet5-$f" "$lenet5" "$f" --epochs 2
done
for f in separable fire crelu rotations dihedral; do
    run "resnet20-$f" "$resnet20" "$f" --epochs 3 --train-limit 10000
done
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for f in sorted(glob.glob(f"{out}/*/report.json")):
    r = json.load(open(f))
    name = os.path.basename(os.path.dirname(f))
    lat = r["latency"]
    rows.append({
        "run": name, "form": r["form"],
        "params": r["params"], "flops": r["flops"],
        "b1_speedup": lat["before_b1_ms"] / lat["after_b1_ms"],
        "b64_speedup": lat["before_b64_ms"] / lat["after_b64_ms"],
        "accuracy": [r["accuracy_before"], r["accuracy_after"], r["accuracy_finetuned"]],
        "finetune_epochs": r["finetune_epochs"],
    })
print(f"{'run':<26} {'params':>18} {'x fewer':>8} {'FLOPs x':>8} {'b1 x':>6} {'b64 x':>6} {'original':>9} {'rewritten':>10} {'tuned':>7}")
for r in rows:
    p, fl, a = r["params"], r["flops"], r["accuracy"]
    tuned = f"{100 * a[2]:.2f}%" if a[2] is not None else "-"
    print(f"{r['run']:<26} {p[0]:>8} -> {p[1]:<6} {p[0] / p[1]:>7.2f}x {fl[0] / fl[1]:>7.2f}x {r['b1_speedup']:>5.2f}x {r['b64_speedup']:>5.2f}x {100 * a[0]:>8.2f}% {100 * a[1]:>9.2f}% {tuned:>7}")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
