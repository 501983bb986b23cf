"""silu_and_mul from khub (the CUDA variant, through libkhub.so's C API) against torch's op.

Called by scripts/gpu-check.sh as: gpu_check_torch.py LIBKHUB REGISTRY CACHE. Loads
acme/activation from the directory registry with backend=cuda preferred (host facts are
probed as usual), runs both implementations on the same CUDA tensors, and prints the
largest difference and the throughput of each, then `row|...` lines for the script's
table. Exits non-zero when khub fails or the outputs differ by more than 1e-5 relative.
"""

import ctypes
import json
import sys
import time

import torch

lib_path, registry, cache = sys.argv[1:4]
lib = ctypes.CDLL(lib_path)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class ArgValue(ctypes.Union):
    _fields_ = [
        ("tensor", ctypes.POINTER(DLTensor)),
        ("f32", ctypes.c_float),
        ("f64", ctypes.c_double),
        ("i64", ctypes.c_int64),
        ("u64", ctypes.c_uint64),
    ]


class Arg(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("value", ArgValue)]


KHUB_ARG_TENSOR, KHUB_ARG_TENSOR_MUT = 1, 2
KDL_CUDA, KDL_FLOAT = 2, 2

vp = ctypes.c_void_p
lib.khub_options_new.restype = vp
lib.khub_error_message.restype = ctypes.c_char_p
lib.khub_error_message.argtypes = [vp]
for name in ["khub_options_set_registry", "khub_options_set_cache"]:
    getattr(lib, name).argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(vp)]
lib.khub_options_set_offline.argtypes = [vp, ctypes.c_int, ctypes.POINTER(vp)]
lib.khub_hub_open.argtypes = [vp, ctypes.POINTER(vp), ctypes.POINTER(vp)]
lib.khub_hub_load.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(vp), ctypes.POINTER(vp)]
lib.khub_kernel_call.argtypes = [vp, ctypes.c_char_p, ctypes.POINTER(Arg), ctypes.c_size_t, vp, ctypes.POINTER(vp)]
lib.khub_kernel_provenance_json.argtypes = [vp, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(vp)]


def check(rc, err, what):
    if rc != 0:
        msg = lib.khub_error_message(err).decode() if err.value else "(no message)"
        sys.exit(f"gpu_check_torch: {what} failed ({rc}): {msg}")


err = vp()
opts = vp(lib.khub_options_new())
check(lib.khub_options_set_registry(opts, registry.encode(), ctypes.byref(err)), err, "set_registry")
check(lib.khub_options_set_cache(opts, cache.encode(), ctypes.byref(err)), err, "set_cache")
hub = vp()
check(lib.khub_hub_open(opts, ctypes.byref(hub), ctypes.byref(err)), err, "hub_open")
kernel = vp()
check(lib.khub_hub_load(hub, b"acme/activation", b"*", ctypes.byref(kernel), ctypes.byref(err)), err, "hub_load")
prov = ctypes.c_char_p()
check(lib.khub_kernel_provenance_json(kernel, ctypes.byref(prov), ctypes.byref(err)), err, "provenance")
variant = json.loads(prov.value.decode()).get("loaded", {}).get("variant", "?")
print(f"khub loaded variant {variant}")
if not variant.startswith("cuda"):
    sys.exit(f"gpu_check_torch: the hub chose {variant}, not a CUDA variant")


def dl(t):
    shape = (ctypes.c_int64 * t.dim())(*t.shape)
    shape_ptr = ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64))
    d = DLTensor(t.data_ptr(), DLDevice(KDL_CUDA, t.device.index or 0), t.dim(), DLDataType(KDL_FLOAT, 32, 1), shape_ptr, None, 0)
    return d, shape  # keep the shape array alive with the tensor struct


rows, d = 4096, 4096
x = torch.randn(rows, 2 * d, device="cuda", dtype=torch.float32)
out = torch.empty(rows, d, device="cuda", dtype=torch.float32)
dx, sx = dl(x)
dout, sout = dl(out)
args = (Arg * 2)()
args[0].kind, args[0].value.tensor = KHUB_ARG_TENSOR_MUT, ctypes.pointer(dout)
args[1].kind, args[1].value.tensor = KHUB_ARG_TENSOR, ctypes.pointer(dx)


def khub_op():
    check(lib.khub_kernel_call(kernel, b"silu_and_mul", args, 2, None, ctypes.byref(err)), err, "kernel_call")


def torch_op():
    return torch.nn.functional.silu(x[:, :d]) * x[:, d:]


def timed(fn, iters=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


# Both run on the legacy default stream (khub is passed NULL; torch's current stream is
# the default one here), so they are ordered; synchronize before reading.
khub_op()
torch.cuda.synchronize()
ref = torch_op()
torch.cuda.synchronize()
max_err = ((out - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
bytes_moved = (x.numel() + out.numel()) * 4
t_khub, t_torch = timed(khub_op), timed(torch_op)
gbs = lambda t: bytes_moved / t / 1e9
print(f"silu_and_mul [{rows} x {2 * d}] f32: max relative error {max_err:.3g}")
print(f"khub {t_khub * 1e6:.1f} us ({gbs(t_khub):.0f} GB/s), torch {t_torch * 1e6:.1f} us ({gbs(t_torch):.0f} GB/s), ratio {t_khub / t_torch:.2f}")
ok = max_err <= 1e-5
print(f"row|silu_and_mul max error vs torch|{'ok' if ok else 'FAILED'}|{max_err:.3g}|")
print(f"row|silu_and_mul khub|ok|{t_khub * 1e6:.1f} us, {gbs(t_khub):.0f} GB/s|")
print(f"row|silu_and_mul torch|ok|{t_torch * 1e6:.1f} us, {gbs(t_torch):.0f} GB/s (khub/torch time {t_khub / t_torch:.2f})|")
sys.exit(0 if ok else 1)
