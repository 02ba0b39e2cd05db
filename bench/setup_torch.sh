#!/usr/bin/env bash
# Install a CPU-usable PyTorch for bench/torch_bench.py (benchmark only).
# Idempotent: does nothing when `python3 -c 'import torch'` already works.
# Set PYTHON to use another interpreter (e.g. a virtualenv's python).
# Downloads ~555 MB from PyPI; ~1.3 GB on disk. See bench/README.md.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"

if "$py" -c 'import torch' >/dev/null 2>&1; then
    echo "setup_torch: torch $("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null) already importable; nothing to do" >&2
    exit 0
fi

for tool in gcc readelf; do
    command -v "$tool" >/dev/null || { echo "setup_torch: $tool is required (apt-get install gcc binutils)" >&2; exit 1; }
done

# --no-deps: skip the nvidia-*/triton/cuda-bindings requirements of the CUDA wheel
"$py" -m pip install --no-deps -r "$here/requirements-bench.txt"
# stand-ins for the CUDA libraries that were not installed (torch/lib/CUDA_STUBS.txt)
"$py" "$here/make_cuda_stubs.py"

"$py" - <<'PY'
import sys, warnings
warnings.filterwarnings("ignore", message=".*Failed to initialize NumPy.*")
import torch
x = torch.randn(4, 1, 28, 28, requires_grad=True)
torch.nn.Conv2d(1, 2, 5)(x).sum().backward()
print(f"setup_torch: torch {torch.__version__} works on CPU "
      f"(cuda available: {torch.cuda.is_available()})", file=sys.stderr)
PY
