#!/usr/bin/env bash
# Per-operation milliseconds (LeNet-5 and ResNet-20 layers at batch 64): convpress's kernels,
# Burn's own ops and PyTorch, interleaved, ROUNDS times (default 3), medians printed.
#
#   bash bench/compare_ops.sh
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
seconds=${SECONDS_PER:-1}
rounds=${ROUNDS:-3}
out=${OUT_JSONL:-bench/ops.jsonl}
bash bench/setup_torch.sh >&2
cargo build --release -q
bin=target/release/convpress
: >"$out"
for round in $(seq "$rounds"); do
  echo "round $round ..." >&2
  for engine in convpress burn; do
    "$bin" --threads "$threads" --ops "$engine" bench ops --seconds "$seconds" --json >>"$out"
  done
  python3 bench/torch_ops.py --threads "$threads" --seconds "$seconds" 2>/dev/null >>"$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    who = "pytorch" if r["framework"] == "pytorch" else r["ops"]
    d = by.setdefault(r["op"], {}).setdefault(who, ([], []))
    d[0].append(r["forward_ms"]); d[1].append(r["forward_backward_ms"])
med = lambda xs: statistics.median(xs)
print(f"{'op (batch 64), ms':<34} {'forward: convpress':>18} {'burn':>7} {'pytorch':>8} {'x pt':>5}"
      f" {'fwd+bwd: convpress':>19} {'burn':>7} {'pytorch':>8} {'x pt':>5}")
for op, d in by.items():
    c, b, p = (d.get(k, ([float('nan')], [float('nan')])) for k in ("convpress", "burn", "pytorch"))
    f = [med(x[0]) for x in (c, b, p)]
    t = [med(x[1]) for x in (c, b, p)]
    print(f"{op:<34} {f[0]:>18.2f} {f[1]:>7.2f} {f[2]:>8.2f} {f[2] / f[0]:>5.2f}"
          f" {t[0]:>19.2f} {t[1]:>7.2f} {t[2]:>8.2f} {t[2] / t[0]:>5.2f}")
print("x pt: PyTorch's time divided by convpress's (above 1: convpress is faster)")
PY
