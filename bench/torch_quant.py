#!/usr/bin/env python3
"""PyTorch's int8 against its f32 on convpress's benchmark models, for `bench/quant_compare.sh`.

Post-training static quantization in FX graph mode (torch.ao.quantization) with the x86
engine (fbgemm): per-channel int8 weights, per-tensor u8 activations, calibrated on random
batches (speed only: the weights are random). For each batch size, f32 and int8 forward passes
under torch.inference_mode() alternate for 10 rounds and the medians are printed, one JSON line
per batch size on stdout; everything else goes to stderr.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--model", choices=("lenet5", "lenet300", "resnet20"), default="lenet5")
p.add_argument("--batch", default="1,64", help="batch sizes, comma separated")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seconds", type=float, default=2.0, help="per batch size, both paths together")
p.add_argument("--input", default=None,
               help="C,H,W of the input (default: the model's; ResNet-20 on MNIST is 1,32,32)")
ARGS = p.parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch.ao.quantization import get_default_qconfig_mapping  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import build_model  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.backends.quantized.engine = "x86"
INPUT = {"lenet5": (1, 28, 28), "lenet300": (1, 28, 28), "resnet20": (3, 32, 32)}[ARGS.model]
if ARGS.input:
    INPUT = tuple(int(v) for v in ARGS.input.split(","))


def per_call_ms(fn, x, seconds):
    """Milliseconds per call of fn(x), over about `seconds`."""
    with torch.inference_mode():
        fn(x)
        n, start = 0, time.perf_counter()
        while True:
            fn(x)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 1000 * elapsed / n


def main():
    torch.manual_seed(0)
    model, _ = build_model(ARGS.model)
    if ARGS.model == "resnet20" and INPUT[0] != 3:
        model.conv1 = torch.nn.Conv2d(INPUT[0], 16, 3, padding=1, bias=False)
    model.eval()
    example = (torch.randn(8, *INPUT),)
    prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example)
    with torch.inference_mode():
        for _ in range(8):
            prepared(torch.randn(32, *INPUT))
    int8 = convert_fx(prepared)
    for batch in [int(b) for b in ARGS.batch.split(",")]:
        x = torch.randn(batch, *INPUT)
        rounds, f32, q = 10, [], []
        for _ in range(rounds):
            f32.append(per_call_ms(model, x, ARGS.seconds / (2 * rounds)))
            q.append(per_call_ms(int8, x, ARGS.seconds / (2 * rounds)))
        f32_ms, int8_ms = statistics.median(f32), statistics.median(q)
        print(json.dumps({
            "framework": "pytorch", "version": torch.__version__, "engine": "x86",
            "model": ARGS.model, "batch": batch, "threads": ARGS.threads,
            "f32_ms": round(f32_ms, 4), "int8_ms": round(int8_ms, 4),
            "speedup": round(f32_ms / int8_ms, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
