#!/usr/bin/env bash
# Binarization on LeNet-5, over seeds: for each seed a float model (`convpress train`), then
# each method trained from it (`convpress binarize`, 3 epochs of Adam at lr 0.001, first and
# last layers in float, layer inputs `INPUTS`: float on the table-lookup kernels, or int8);
# prints test error (of the written file on convpress's runtime; XNOR-popcount kernels for xnor)
# as mean ± spread (half the range over the seeds) and writes it as JSON. Finished steps are
# kept, so a rerun only does what is missing. About 35 minutes on 2 cores, the float models aside.
#
#   bash bench/binarize_sweep.sh     # SEEDS="1 2" METHODS="binary-connect ..." INPUTS=float OUT=runs/binarize-sweep
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
out=${OUT:-runs/binarize-sweep}
seeds=${SEEDS:-"1 2"}
methods=${METHODS:-"binary-connect stochastic bwn xnor twn loss-aware few-multiplications"}
inputs=${INPUTS:-float}
mkdir -p "$out"
for s in $seeds; do
    f="$out/float-s$s"
    [ -f "$f/model.safetensors" ] ||
        "$bin" train --model lenet5 --seed "$s" --run-dir "$f" --no-progress >"$out/float-s$s.txt"
    for m in $methods; do
        [ -f "$out/$m-s$s.cpz" ] ||
            "$bin" binarize --checkpoint "$f/model.safetensors" --method "$m" --epochs 3 \
                --lr 0.001 --seed "$s" --inputs "$inputs" --out "$out/$m-s$s.cpz" --run-dir "$out/$m-s$s.run" \
                --no-progress >"$out/$m-s$s.txt"
    done
done
python3 - "$out" "$seeds" "$methods" <<'PY'
import json, re, sys
out, seeds, methods = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
line = re.compile(r"test accuracy \((\d+) images\): ([\d.]+)% float, ([\d.]+)% quantized")
def ms(v):
    return sum(v) / len(v), (max(v) - min(v)) / 2
cell = lambda v: "{:.2f} ± {:.2f}".format(*ms(v))
rows = []
print(f"LeNet-5 on MNIST, test error % over seeds {' '.join(seeds)} (mean ± half range)")
print(f"{'method':>15} {'float':>13} {'binarized':>13} {'file B':>8}")
for m in methods:
    f, b, size = [], [], None
    for s in seeds:
        text = open(f"{out}/{m}-s{s}.txt").read()
        g = line.search(text)
        f.append(100 - float(g.group(2)))
        b.append(100 - float(g.group(3)))
        size = int(re.search(r"cpz: (\d+) bytes", text).group(1))
    rows.append({"method": m, "float": f, "binarized": b, "file_bytes": size})
    print(f"{m:>15} {cell(f):>13} {cell(b):>13} {size:>8}")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
