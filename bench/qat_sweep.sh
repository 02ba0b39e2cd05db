#!/usr/bin/env bash
# Quantization on LeNet-5 at 8, 4 and 2 bits, over seeds: for each seed a float model
# (`convpress train`), then post-training quantization (`convpress quantize`) and
# quantization-aware training from it (`convpress qat`, 3 epochs at lr 0.002) at each width,
# with the quantizers' steps as calibrated and learned (`--step-sizes learned`, LSQ); prints
# test error as mean ± spread (half the range over the seeds) and writes it as JSON.
# Finished steps are kept, so a rerun only does what is missing. About 30 minutes on 2 cores.
#
#   bash bench/qat_sweep.sh            # SEEDS="1 2" BITS="8 4 2" OUT=runs/qat-sweep
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
out=${OUT:-runs/qat-sweep}
seeds=${SEEDS:-"1 2"}
widths=${BITS:-"8 4 2"}
mkdir -p "$out"
for s in $seeds; do
    f="$out/float-s$s"
    [ -f "$f/model.safetensors" ] ||
        "$bin" train --model lenet5 --seed "$s" --run-dir "$f" --no-progress >"$out/float-s$s.txt"
    for b in $widths; do
        [ -f "$out/ptq$b-s$s.cpz" ] ||
            "$bin" quantize --checkpoint "$f/model.safetensors" --bits "$b" \
                --out "$out/ptq$b-s$s.cpz" >"$out/ptq$b-s$s.txt"
        [ -f "$out/qat$b-s$s.cpz" ] ||
            "$bin" qat --checkpoint "$f/model.safetensors" --bits "$b" --epochs 3 --lr 0.002 \
                --seed "$s" --out "$out/qat$b-s$s.cpz" --run-dir "$out/qat$b-s$s.run" \
                --no-progress >"$out/qat$b-s$s.txt"
        [ -f "$out/lsq$b-s$s.cpz" ] ||
            "$bin" qat --checkpoint "$f/model.safetensors" --bits "$b" --epochs 3 --lr 0.002 \
                --seed "$s" --step-sizes learned --out "$out/lsq$b-s$s.cpz" \
                --run-dir "$out/lsq$b-s$s.run" --no-progress >"$out/lsq$b-s$s.txt"
    done
done
python3 - "$out" "$seeds" "$widths" <<'PY'
import json, re, sys
out, seeds, widths = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
line = re.compile(r"test accuracy \((\d+) images\): ([\d.]+)% float, ([\d.]+)% quantized")
def errors(kind, b):
    float_e, q_e, size = [], [], None
    for s in seeds:
        text = open(f"{out}/{kind}{b}-s{s}.txt").read()
        m = line.search(text)
        float_e.append(100 - float(m.group(2)))
        q_e.append(100 - float(m.group(3)))
        size = int(re.search(r"cpz: (\d+) bytes", text).group(1))
    return float_e, q_e, size
def ms(v):
    return sum(v) / len(v), (max(v) - min(v)) / 2
rows = []
print(f"LeNet-5 on MNIST, test error % over seeds {' '.join(seeds)} (mean ± half range)")
print(f"{'bits':>4} {'float':>13} {'PTQ':>13} {'QAT':>13} {'QAT LSQ':>13} {'file B':>8} {'LSQ B':>8}")
for b in widths:
    f, p, size = errors("ptq", b)
    _, q, qsize = errors("qat", b)
    _, l, lsize = errors("lsq", b)
    rows.append({"bits": int(b), "float": f, "ptq": p, "qat": q, "lsq": l,
                 "file_bytes": size, "qat_bytes": qsize, "lsq_bytes": lsize})
    cell = lambda v: "{:.2f} ± {:.2f}".format(*ms(v))
    print(f"{b:>4} {cell(f):>13} {cell(p):>13} {cell(q):>13} {cell(l):>13} {size:>8} {lsize:>8}")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
