#!/usr/bin/env python3
"""PyTorch CPU reference timings for convpress's benchmark models.

Measures training steps (forward, cross-entropy, backward, SGD step,
zero_grad) and/or inference (forward under torch.inference_mode(), eval mode)
for LeNet-5, LeNet-300-100 and CIFAR ResNet-20 on synthetic data, and prints
exactly one JSON line per measured mode on stdout; everything else goes to
stderr. See bench/README.md.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings

MODELS = ("lenet5", "lenet300", "resnet20")
INPUT_SHAPE = {"lenet5": (1, 28, 28), "lenet300": (1, 28, 28), "resnet20": (3, 32, 32)}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="lenet5")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2,
                   help="intra-op and inter-op threads (default 2)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default: calibrated so one measurement "
                        "takes about --target-seconds)")
    p.add_argument("--target-seconds", type=float, default=2.5,
                   help="wall time one measurement aims for when --iters is not given")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed iterations before calibration/timing")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in ("batch", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.iters is not None and a.iters < 1:
        p.error("--iters must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    return a


ARGS = parse_args()

# Thread pools are sized when torch (OpenMP/MKL) initialises; set the
# environment too so no library starts with the machine's full core count.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
# torch warns on stderr when numpy is absent; the benchmark does not use it
warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_num_interop_threads(ARGS.threads)

from torch_models import NUM_CLASSES, build_model  # noqa: E402


# ---------------------------------------------------------------- timing
def measure(step, iters, warmup, target_s):
    """Run `warmup` untimed steps, calibrate if needed, then time `iters` steps."""
    for _ in range(warmup):
        step()
    if iters is None:
        # Calibrate: run until ~10% of the target (at least 2 steps) has passed.
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            elapsed = time.perf_counter() - t0
            if n >= 2 and elapsed >= 0.1 * target_s:
                break
        iters = max(3, math.ceil(target_s / (elapsed / n)))
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return iters, time.perf_counter() - t0


def main(a):
    torch.manual_seed(a.seed)
    model, nparams = build_model(a.model)
    log(f"torch {torch.__version__}: model {a.model} ({nparams:,} parameters), batch {a.batch}, "
        f"threads {torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    load1, ncpu = os.getloadavg()[0], os.cpu_count() or 1
    if load1 > 0.5 * ncpu:
        log(f"warning: load average {load1:.2f} on {ncpu} CPUs: other work is running, timings "
            f"will be noisy (with busy-waiting OpenMP threads, badly so when --threads is "
            f"close to the core count; OMP_WAIT_POLICY=PASSIVE softens this)")

    g = torch.Generator().manual_seed(a.seed)
    x = torch.randn((a.batch,) + INPUT_SHAPE[a.model], generator=g)
    y = torch.randint(0, NUM_CLASSES, (a.batch,), generator=g)

    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    for mode in modes:
        if mode == "train":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            last = {}

            def step():
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                last["loss"] = loss

            iters, secs = measure(step, a.iters, a.warmup, a.target_seconds)
            log(f"train: final loss {last['loss'].item():.4f}")
        else:
            model.eval()

            def step():
                with torch.inference_mode():
                    model(x)

            iters, secs = measure(step, a.iters, a.warmup, a.target_seconds)
        log(f"{mode}: {iters} iterations in {secs:.3f} s")
        print(json.dumps({
            "framework": "pytorch",
            "version": torch.__version__,
            "model": a.model,
            "batch": a.batch,
            "threads": a.threads,
            "mode": mode,
            "images_per_sec": round(a.batch * iters / secs, 2),
            "ms_per_iter": round(1000.0 * secs / iters, 4),
            "iters": iters,
        }, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main(ARGS)
