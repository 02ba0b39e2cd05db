#!/usr/bin/env python3
"""Make PyPI's CUDA build of PyTorch importable on a CPU-only machine.

The Linux x86_64 `torch` wheel on PyPI is a CUDA build: libtorch_cuda.so,
libtorch_python.so, ... have DT_NEEDED entries on cuBLAS, cuDNN, cuFFT,
cuSPARSE(Lt), NCCL, NVRTC, NVSHMEM, which normally come from ~1.8 GB of
nvidia-* wheels (~3 GB unpacked). None of that code runs when every tensor
lives on the CPU, but the dynamic loader (RTLD_NOW) still has to resolve each
library and each imported symbol when `import torch` loads torch._C.

This script writes tiny stand-in shared libraries into torch/lib/ (which is on
the RPATH of every torch library as $ORIGIN) for each CUDA library that
cannot be found. Each stub:
  * carries the SONAME and the symbol-version nodes the torch libraries ask
    for (so the loader's version checks pass);
  * defines every function symbol torch imports from it as an alias of one
    function that prints a one-time warning to stderr and returns a non-zero
    value (a pointer to a static string, so it reads as an error status, a
    valid C string, or a bogus version number, never as success/NULL);
  * defines imported data symbols as zeroed storage.

If the real nvidia-* libraries are installed later they win: torch's RPATH
lists site-packages/nvidia/*/lib before $ORIGIN. The driver (libcuda.so.1) is
never stubbed. Needs readelf and gcc (binutils + gcc). Only the benchmark
(bench/torch_bench.py) relies on this; it is not part of convpress.

Usage: python3 bench/make_cuda_stubs.py [--torch-dir DIR] [--dry-run] [--remove]
"""
import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

MARKER = "CUDA_STUBS.txt"
NEVER_STUB = ("libcuda.so",)  # the driver: a stub would mask a real GPU setup
SYSTEM_DIRS = ["/lib", "/usr/lib", "/lib64", "/usr/lib64",
               "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
               "/usr/local/lib"]


def log(msg):
    print(f"make_cuda_stubs: {msg}", file=sys.stderr)


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def torch_dir_default():
    spec = importlib.util.find_spec("torch")  # locates without importing
    if spec is None or not spec.origin:
        sys.exit("make_cuda_stubs: torch is not installed for this python")
    return os.path.dirname(spec.origin)


class Elf:
    """The dynamic-linking facts of one shared object, read with readelf."""

    def __init__(self, path):
        self.path = path
        self.needed = []
        self.rpath = []
        for line in run(["readelf", "-d", "-W", path]).splitlines():
            m = re.search(r"\((NEEDED|RPATH|RUNPATH)\).*\[(.*)\]", line)
            if not m:
                continue
            if m.group(1) == "NEEDED":
                self.needed.append(m.group(2))
            else:
                self.rpath += [p for p in m.group(2).split(":") if p]
        # verneed: version index -> (file, version name)
        self.verneed = {}
        cur_file = None
        for line in run(["readelf", "-V", "-W", path]).splitlines():
            m = re.search(r"File: (\S+)", line)
            if m:
                cur_file = m.group(1)
                continue
            m = re.search(r"Name: (\S+)\s+Flags: \S+\s+Version: (\d+)", line)
            if m and cur_file:
                self.verneed[int(m.group(2))] = (cur_file, m.group(1))
        # dynamic symbols: undefined imports and defined exports
        self.undefined = []  # (name, type, bind, (file, version) or None)
        self.defined = set()
        for line in run(["readelf", "--dyn-syms", "-W", path]).splitlines():
            f = line.split()
            if len(f) < 8 or not f[0].endswith(":"):
                continue
            typ, bind, ndx, name = f[3], f[4], f[6], f[7]
            ver = None
            if "@" in name:
                name, vname = name.split("@", 1)
                vname = vname.lstrip("@")
                idx = None
                if len(f) > 8:
                    m = re.match(r"\((\d+)\)", f[8])
                    if m:
                        idx = int(m.group(1))
                if idx in self.verneed:
                    ver = self.verneed[idx]
                else:
                    ver = (None, vname)
            if ndx == "UND":
                if name:
                    self.undefined.append((name, typ, bind, ver))
            else:
                self.defined.add(name)


def ldconfig_names():
    try:
        out = run(["ldconfig", "-p"])
    except (OSError, subprocess.CalledProcessError):
        return set()
    return {line.split()[0] for line in out.splitlines()[1:] if line.strip()}


def resolvable(soname, elf, libdir, cache):
    origin = os.path.dirname(elf.path)
    dirs = [p.replace("$ORIGIN", origin) for p in elf.rpath]
    dirs += [libdir]
    dirs += [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    dirs += SYSTEM_DIRS
    if any(os.path.exists(os.path.join(d, soname)) for d in dirs):
        return True
    return soname in cache


def stem(soname):
    """libcusparseLt.so.0 -> cusparselt, libnvshmem_host.so.3 -> nvshmem"""
    base = soname.split(".so")[0]
    if base.startswith("lib"):
        base = base[3:]
    return base.split("_")[0].lower()


def plan(torch_dir):
    libdir = os.path.join(torch_dir, "lib")
    paths = sorted(glob.glob(os.path.join(libdir, "*.so*")))
    paths += sorted(glob.glob(os.path.join(torch_dir, "_C*.so")))
    elfs = [Elf(p) for p in paths]
    torch_defined = set().union(*(e.defined for e in elfs))
    cache = ldconfig_names()
    missing = {}  # soname -> {"versions": set, "funcs": set, "data": set}
    for e in elfs:
        for so in e.needed:
            if so.startswith(NEVER_STUB) or resolvable(so, e, libdir, cache):
                continue
            missing.setdefault(so, {"versions": set(), "funcs": set(),
                                    "data": set(), "users": set()})
            missing[so]["users"].add(os.path.basename(e.path))
    for e in elfs:
        for so, need in missing.items():
            if so not in e.needed:
                continue
            need["versions"].update(
                v for (f, v) in e.verneed.values() if f == so)
            for name, typ, bind, ver in e.undefined:
                if bind == "WEAK":  # weak imports may stay unresolved (NULL)
                    continue
                if ver is not None:
                    vfile, vname = ver
                    if vfile != so and not (vfile is None and vname in need["versions"]):
                        continue
                else:
                    # unversioned: attribute by the library's name prefix
                    if name in torch_defined or name.startswith(("Py", "_Py")):
                        continue
                    if not name.lower().startswith(stem(so)):
                        continue
                (need["data"] if typ in ("OBJECT", "TLS") else need["funcs"]).add(name)
    return libdir, missing


C_HEADER = r"""/* generated by bench/make_cuda_stubs.py: CPU-only stand-in for %(so)s */
#include <stdio.h>
static const char convpress_stub_msg[] =
    "convpress bench: %(so)s is a CPU-only stub (bench/make_cuda_stubs.py); "
    "CUDA features of this torch install are unavailable";
static int convpress_stub_warned;
static const void *convpress_cuda_stub(void) {
    if (!convpress_stub_warned) {
        convpress_stub_warned = 1;
        fprintf(stderr, "%%s\n", convpress_stub_msg);
    }
    return convpress_stub_msg;
}
"""


def build(libdir, so, need, workdir):
    c = [C_HEADER % {"so": so}]
    for name in sorted(need["funcs"]):
        c.append(f'const void *{name}(void) __attribute__((alias("convpress_cuda_stub")));\n')
    for name in sorted(need["data"]):
        c.append(f"__attribute__((aligned(64))) char {name}[4096];\n")
    syms = sorted(need["funcs"] | need["data"])
    versions = sorted(need["versions"])
    vmap = []
    if versions:
        # the first node holds the symbols; every version name the torch
        # libraries require from this file must exist as a node
        vmap.append(versions[0] + " {\n  global:\n" +
                    "".join(f"    {s};\n" for s in syms) + "  local: *;\n};\n")
        for v in versions[1:]:
            vmap.append(v + " { };\n")
    else:
        vmap.append("{\n  global:\n" + "".join(f"    {s};\n" for s in syms) +
                    "  local: *;\n};\n")
    cfile = os.path.join(workdir, so + ".c")
    mfile = os.path.join(workdir, so + ".map")
    with open(cfile, "w") as f:
        f.write("".join(c))
    with open(mfile, "w") as f:
        f.write("".join(vmap))
    out = os.path.join(libdir, so)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", out, cfile,
                    f"-Wl,-soname,{so}", f"-Wl,--version-script={mfile}"],
                   check=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-dir", help="the torch package directory")
    ap.add_argument("--dry-run", action="store_true", help="only list what would be stubbed")
    ap.add_argument("--remove", action="store_true", help="delete stubs made earlier")
    args = ap.parse_args()
    torch_dir = args.torch_dir or torch_dir_default()
    libdir = os.path.join(torch_dir, "lib")
    marker = os.path.join(libdir, MARKER)
    if args.remove:
        if os.path.exists(marker):
            for line in open(marker):
                so = line.split()[0] if line.strip() and not line.startswith("#") else None
                if so and os.path.exists(os.path.join(libdir, so)):
                    os.remove(os.path.join(libdir, so))
                    log(f"removed {so}")
            os.remove(marker)
        return
    libdir, missing = plan(torch_dir)
    if not missing:
        log("every library torch links against is present; nothing to stub")
        return
    for so, need in sorted(missing.items()):
        log(f"{so}: {len(need['funcs'])} functions, {len(need['data'])} data, "
            f"versions {sorted(need['versions']) or '-'}, needed by {sorted(need['users'])}")
    if args.dry_run:
        return
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        for so, need in sorted(missing.items()):
            build(libdir, so, need, tmp)
            made.append(so)
    with open(marker, "a") as f:
        f.write("# CPU-only stubs written by bench/make_cuda_stubs.py; "
                "remove with --remove or by installing the real nvidia-* wheels\n")
        for so in made:
            f.write(so + "\n")
    log(f"wrote {len(made)} stubs into {libdir}")


if __name__ == "__main__":
    main()
