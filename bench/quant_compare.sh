#!/usr/bin/env bash
# convpress's int8 runtime against its own f32 path and against PyTorch's int8 (FX graph mode,
# x86/fbgemm engine) and f32, on the same model shapes, batch sizes and threads (2). The two
# programs alternate for ROUNDS rounds, each of which alternates f32 and int8 internally
# (medians of 10); the table gives the median over rounds. Needs torch (bench/setup_torch.sh).
#
#   bash bench/quant_compare.sh LENET5_Q.cpz LENET5.safetensors [RESNET20_Q.cpz RESNET20.safetensors]
set -euo pipefail
bin=${CONVPRESS:-target/release/convpress}
rounds=${ROUNDS:-3}
seconds=${SECONDS_PER:-3}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=$(mktemp)
pairs=("$@")
[ ${#pairs[@]} -ge 2 ] || { echo "usage: $0 QUANTIZED.cpz FLOAT.safetensors [...]" >&2; exit 2; }
for ((r = 0; r < rounds; r++)); do
    for ((i = 0; i < ${#pairs[@]}; i += 2)); do
        q=${pairs[i]}
        f=${pairs[i + 1]}
        model=$("$bin" info --checkpoint "$f" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["arch"]["name"])')
        input=$("$bin" info --checkpoint "$f" --json | python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["arch"]["input"])))')
        "$bin" --threads 2 bench quant --checkpoint "$q" --float "$f" --batch 1,64 --seconds "$seconds" --json |
            sed "s|^{|{\"framework\":\"convpress\",\"file\":\"$(basename "$q")\",|" >>"$out"
        python3 "$here/torch_quant.py" --model "$model" --input "$input" --batch 1,64 --threads 2 \
            --seconds "$seconds" 2>/dev/null >>"$out"
    done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
rounds = sys.argv[2]
keys = sorted({(r["model"], r["file"], r["batch"]) for r in rows if r["framework"] == "convpress"})
print(f"{'model':<9} {'file':<18} {'batch':>5} {'convpress f32':>14} {'convpress int8':>15} {'torch f32':>10} {'torch int8':>11} {'int8 vs own f32':>16} {'vs torch int8':>14}")
for model, file, batch in keys:
    mine = lambda k: statistics.median(r[k] for r in rows if r["framework"] == "convpress" and (r["model"], r["file"], r["batch"]) == (model, file, batch))
    torch = lambda k: statistics.median(r[k] for r in rows if r["framework"] == "pytorch" and (r["model"], r["batch"]) == (model, batch))
    cf, ci, tf, ti = mine("f32_ms"), mine("int8_ms"), torch("f32_ms"), torch("int8_ms")
    print(f"{model:<9} {file:<18} {batch:>5} {cf:>11.3f} ms {ci:>12.3f} ms {tf:>7.3f} ms {ti:>8.3f} ms {cf / ci:>15.2f}x {ti / ci:>13.2f}x")
print(f"(ms per batch; medians over {rounds} rounds of each file, PyTorch's over every round of its model; 2 threads)")
PY
rm -f "$out"
