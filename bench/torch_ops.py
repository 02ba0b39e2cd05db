#!/usr/bin/env python3
"""PyTorch CPU reference timings for the operations `convpress bench ops` measures.

Same names, shapes (batch 64) and protocol: forward alone (inference mode), and forward +
backward of `y.sum()` with gradients for the input and the parameters. One JSON line per
operation on stdout. See bench/README.md.
"""
import argparse
import json
import os
import sys
import time
import warnings

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seconds", type=float, default=1.0)
ARGS = p.parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(ARGS.threads)

# name, kind, input shape, conv (out, kernel, stride, padding, bias)
CASES = [
    ("lenet5.conv1 1->20 k5 28x28", "conv", (64, 1, 28, 28), (20, 5, 1, 0, True)),
    ("lenet5.conv2 20->50 k5 12x12", "conv", (64, 20, 12, 12), (50, 5, 1, 0, True)),
    ("lenet5.pool1 2x2 20x24x24", "maxpool", (64, 20, 24, 24), None),
    ("resnet20.conv 16->16 k3 32x32", "conv", (64, 16, 32, 32), (16, 3, 1, 1, False)),
    ("resnet20.conv 16->32 k3 s2 32x32", "conv", (64, 16, 32, 32), (32, 3, 2, 1, False)),
    ("resnet20.conv 32->32 k3 16x16", "conv", (64, 32, 16, 16), (32, 3, 1, 1, False)),
    ("resnet20.conv 64->64 k3 8x8", "conv", (64, 64, 8, 8), (64, 3, 1, 1, False)),
    ("resnet20.shortcut 16->32 k1 s2", "conv", (64, 16, 32, 32), (32, 1, 2, 0, False)),
    ("resnet20.bn 16x32x32", "bn", (64, 16, 32, 32), None),
    ("resnet20.bn 64x8x8", "bn", (64, 64, 8, 8), None),
]


def timed(step, seconds):
    step()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return 1000.0 * (time.perf_counter() - t0) / n


def main():
    torch.manual_seed(0)
    for name, kind, shape, conv in CASES:
        c = shape[1]
        x = torch.randn(shape)
        if kind == "conv":
            out, k, s, pad, bias = conv
            w = torch.randn(out, c, k, k)
            b = torch.randn(out) if bias else None
            params = [w] + ([b] if bias else [])
            op = lambda x: F.conv2d(x, w, b, stride=s, padding=pad)  # noqa: E731
        elif kind == "bn":
            gamma, beta = torch.ones(c), torch.zeros(c)
            mean, var = torch.zeros(c), torch.ones(c)
            params = [gamma, beta]
            op_eval = lambda x: F.batch_norm(x, mean, var, gamma, beta, False)  # noqa: E731
            op_train = lambda x: F.batch_norm(x, None, None, gamma, beta, True)  # noqa: E731
        else:
            params = []
            op = lambda x: F.max_pool2d(x, 2, 2)  # noqa: E731
        if kind == "bn":
            fwd_op, train_op = op_eval, op_train
        else:
            fwd_op = train_op = op

        def forward():
            with torch.inference_mode():
                fwd_op(x)

        xg = x.clone().requires_grad_(True)
        for q in params:
            q.requires_grad_(True)

        def train():
            train_op(xg).sum().backward()
            xg.grad = None
            for q in params:
                q.grad = None

        print(json.dumps({
            "framework": "pytorch",
            "version": torch.__version__,
            "op": name,
            "threads": ARGS.threads,
            "forward_ms": round(timed(forward, ARGS.seconds), 4),
            "forward_backward_ms": round(timed(train, ARGS.seconds), 4),
        }), flush=True)


if __name__ == "__main__":
    sys.exit(main())
