#!/usr/bin/env python3
"""Compiles the CUDA kernels (kernels/src/cuda/kernels/*.cu, as the backend does: one unit, NVRTC,
--gpu-architecture=sm_90 --std=c++17) on a machine without a GPU, then assembles the PTX with
ptxas -v to print each kernel's registers, shared memory and spills.

    scripts/nvrtc-check.py [--nvrtc PATH/libnvrtc.so.13] [--ptxas PATH/ptxas] [--arch sm_90]

Finds libnvrtc and ptxas in a few usual places (a pip-installed nvidia-cuda-nvrtc wheel, Triton's
bundled ptxas) when not given. Exit status 1 on a compile or assembly error.
"""
import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The order of kernels/src/cuda/compile.rs::source().
SOURCES = ["ops.cu", "attention.cu", "flash.cu", "random.cu", "sparse.cu", "labels.cu", "offload.cu", "sample.cu"]


def find(patterns):
    for p in patterns:
        hits = sorted(glob.glob(p, recursive=True))
        if hits:
            return hits[-1]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc")
    ap.add_argument("--ptxas")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--ptx-out")
    a = ap.parse_args()
    nvrtc = a.nvrtc or find([
        "/usr/local/cuda/lib64/libnvrtc.so*",
        "/tmp/nvrtc/nvidia/cu13/lib/libnvrtc.so.13",
        "/opt/*/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13",
        "/usr/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13",
    ])
    ptxas = a.ptxas or find([
        "/usr/local/cuda/bin/ptxas",
        "/opt/*/lib/python3*/site-packages/triton/backends/nvidia/bin/ptxas",
    ])
    if not nvrtc:
        sys.exit("libnvrtc not found (pass --nvrtc)")
    kdir = os.path.join(ROOT, "kernels/src/cuda/kernels")
    src = "\n".join(open(os.path.join(kdir, f)).read() for f in SOURCES if os.path.exists(os.path.join(kdir, f)))
    lib = ctypes.CDLL(nvrtc)
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"farsight.cu", 0, None, None)
    assert rc == 0, rc
    opts = [f"--gpu-architecture={a.arch}".encode(), b"--std=c++17"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode())
    if rc != 0:
        sys.exit(f"NVRTC failed ({rc})")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    print(f"NVRTC ok ({nvrtc}), {n.value} bytes of PTX")
    with tempfile.TemporaryDirectory() as d:
        p = a.ptx_out or os.path.join(d, "k.ptx")
        text = ptx.value.decode()
        if os.environ.get("PTX_VERSION"):
            # An older ptxas (Triton's) refuses newer PTX ISA versions; the kernels use nothing new.
            text = re.sub(r"^\.version .*$", ".version " + os.environ["PTX_VERSION"], text, count=1, flags=re.M)
        open(p, "w").write(text)
        if not ptxas:
            print("ptxas not found: skipping the resource report")
            return
        r = subprocess.run([ptxas, "-v", f"-arch={a.arch}", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
        out = r.stdout + r.stderr
        lines = out.splitlines()
        cur = None
        for ln in lines:
            if "Compiling entry function" in ln:
                cur = ln.split("'")[1]
            elif "Used" in ln and cur:
                print(f"{cur}: {ln.split('info    : ')[-1]}")
            elif "spill" in ln and cur and ("0 bytes spill stores, 0 bytes spill loads" not in ln):
                print(f"{cur}: {ln.split('info    : ')[-1]}")
            elif "error" in ln.lower():
                print(ln)
        if r.returncode != 0:
            sys.exit(f"ptxas failed ({r.returncode})")


if __name__ == "__main__":
    main()
