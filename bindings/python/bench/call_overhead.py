"""Per-call overhead from Python on a tiny tensor: khub vs ctypes vs a torch custom op.

One run measures, interleaved, the same work (silu_and_mul of x [1, 2] into out [1, 1]):

- khub (torch):    kernel.silu_and_mul(out, x) on torch tensors: DLPack export of both,
                   signature checks, GIL released, the generic call path;
- khub (numpy):    the same on numpy arrays;
- khub op:         torch.ops.khub_bench.silu_and_mul(x) (khub.torch.register): the torch
                   dispatcher, output allocation, then the khub call;
- ctypes:          the same library (the variant khub loaded, from the release directory)
                   called through ctypes, DLTensor structs filled from the tensors per call;
- ctypes (reused): the same with structs built once (the floor of a Python FFI call);
- torch custom op: torch.ops.bench.silu_and_mul(out, x), a torch.library custom op whose
                   implementation does the work with torch ops.

Prints the per-call time of each (best of --repeat runs of --calls calls) and the ratio
of khub (torch) to the torch custom op; the goal is <= 1.5.

    python bindings/python/bench/call_overhead.py [--registry DIR] [--calls N] [--repeat R]

Without --registry, kernels-example (CPU variants) is packaged with the khub binary
(KHUB_BIN, else $CARGO_TARGET_DIR or target, debug) into a temporary registry.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import khub
import khub.torch

REPO = Path(__file__).resolve().parents[3]


def package_example(base: Path) -> Path:
    exe = os.environ.get("KHUB_BIN") or str(Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "debug" / "khub")
    kernel = base / "kernel"
    shutil.copytree(REPO / "kernels-example", kernel)
    text = (kernel / "kernel.toml").read_text()
    head, *blocks = re.split(r"(?m)^\[\[variants\]\]\n", text)
    keep = [b for b in blocks if re.search(r'(?m)^backend = "cpu"', b)]
    (kernel / "kernel.toml").write_text(head + "".join("[[variants]]\n" + b for b in keep))
    release = base / "registry" / "acme" / "activation" / "0.1.0"
    release.parent.mkdir(parents=True)
    subprocess.run([exe, "package", str(kernel), "--out", str(release)], check=True, capture_output=True)
    return base / "registry"


class Call(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("stream", ctypes.c_void_p),
        ("error", ctypes.c_char_p),
        ("error_capacity", ctypes.c_size_t),
    ]


class Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", Device),
        ("ndim", ctypes.c_int32),
        ("dtype", DType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class Desc(ctypes.Structure):
    _fields_ = [
        ("abi_major", ctypes.c_uint32),
        ("abi_minor", ctypes.c_uint32),
        ("struct_size", ctypes.c_uint64),
        ("name", ctypes.c_char_p),
        ("version", ctypes.c_char_p),
        ("backend", ctypes.c_char_p),
        ("function_size", ctypes.c_uint64),
        ("function_count", ctypes.c_uint64),
        ("functions", ctypes.c_void_p),
    ]


class Fn(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("signature", ctypes.c_char_p), ("func", ctypes.c_void_p), ("selftest", ctypes.c_void_p)]


KERNEL_FN = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.POINTER(Call), ctypes.POINTER(Tensor), ctypes.POINTER(Tensor))


def ctypes_function(library: Path, name: str):
    lib = ctypes.CDLL(str(library))
    entry = lib.khub_kernel_entry
    entry.restype = ctypes.POINTER(Desc)
    entry.argtypes = [ctypes.c_uint32, ctypes.c_uint32]
    desc = entry(1, 0).contents
    for i in range(desc.function_count):
        f = Fn.from_address(desc.functions + i * desc.function_size)
        if f.name.decode() == name:
            return KERNEL_FN(f.func)
    raise SystemExit(f"{library} has no {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", type=Path)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="khub-bench-"))
    try:
        registry = args.registry or package_example(tmp)
        hub = khub.Hub(registry=registry, cache=tmp / "cache", state_dir=tmp / "state")
        kernel = hub.load("acme/activation", "^0.1")
        info = kernel.info
        library = Path(registry) / "acme" / "activation" / info["version"] / info["library"]

        x = torch.randn(1, 2)
        out = torch.empty(1, 1)
        xn, outn = x.numpy(), out.numpy()
        f = kernel.silu_and_mul

        ops = khub.torch.register(kernel, "khub_bench")

        @torch.library.custom_op("bench::silu_and_mul", mutates_args=("out",))
        def torch_op(out: torch.Tensor, x: torch.Tensor) -> None:
            d = x.shape[-1] // 2
            torch.mul(torch.nn.functional.silu(x[..., :d]), x[..., d:], out=out)

        cfn = ctypes_function(library, "silu_and_mul")
        err = ctypes.create_string_buffer(1024)
        call = Call(ctypes.sizeof(Call), 0, None, ctypes.cast(err, ctypes.c_char_p), 1024)
        F32 = DType(2, 32, 1)
        CPU = Device(1, 0)

        def via_ctypes():
            xs = (ctypes.c_int64 * 2)(*x.shape)
            os_ = (ctypes.c_int64 * 2)(*out.shape)
            tx = Tensor(x.data_ptr(), CPU, 2, F32, xs, None, 0)
            to = Tensor(out.data_ptr(), CPU, 2, F32, os_, None, 0)
            if cfn(ctypes.byref(call), ctypes.byref(to), ctypes.byref(tx)) != 0:
                raise RuntimeError(err.value)

        xs = (ctypes.c_int64 * 2)(*x.shape)
        os_ = (ctypes.c_int64 * 2)(*out.shape)
        tx = Tensor(x.data_ptr(), CPU, 2, F32, xs, None, 0)
        to = Tensor(out.data_ptr(), CPU, 2, F32, os_, None, 0)
        px, po, pc = ctypes.byref(tx), ctypes.byref(to), ctypes.byref(call)

        def via_ctypes_reused():
            cfn(pc, po, px)

        contenders = {
            "khub (torch)": lambda: f(out, x),
            "khub (numpy)": lambda: f(outn, xn),
            "khub op": lambda: ops.silu_and_mul(x),
            "ctypes": via_ctypes,
            "ctypes (reused)": via_ctypes_reused,
            "torch custom op": lambda: torch.ops.bench.silu_and_mul(out, x),
        }
        # Same answers first.
        ref = (torch.nn.functional.silu(x[..., :1]) * x[..., 1:]).clone()
        for name, fn in contenders.items():
            out.zero_()
            r = fn()
            got = r if isinstance(r, torch.Tensor) else out
            torch.testing.assert_close(got, ref, msg=lambda m, name=name: f"{name}: {m}")
        best = {name: float("inf") for name in contenders}
        for _ in range(args.repeat):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                dt = (time.perf_counter() - t0) / args.calls
                best[name] = min(best[name], dt)
        print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}")
        print(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, khub {khub.__version__}")
        print(f"variant {info['variant']}; {args.calls} calls x {args.repeat} runs, best run, per call:")
        for name, t in best.items():
            print(f"  {name:<16} {t * 1e6:8.2f} us")
        ratio = best["khub (torch)"] / best["torch custom op"]
        print(f"ratio khub (torch) / torch custom op: {ratio:.2f} (goal <= 1.5)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
