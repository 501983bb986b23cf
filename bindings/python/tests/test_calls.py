"""Calls from numpy: results against numpy references for the three example functions,
signature and tensor checks before the call, kernel errors, and concurrent calls."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import khub


def silu_and_mul_ref(x: np.ndarray) -> np.ndarray:
    d = x.shape[-1] // 2
    a, b = x[..., :d].astype(np.float64), x[..., d:].astype(np.float64)
    return (a / (1.0 + np.exp(-a)) * b).astype(np.float32)


def gelu_ref(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))).astype(np.float32)


def rms_norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    rms = np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 / rms * w.astype(np.float64)).astype(np.float32)


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


def test_silu_and_mul_matches_numpy(kernel, rng):
    x = rng.standard_normal((3, 5, 16), dtype=np.float32)
    out = np.full((3, 5, 8), np.nan, np.float32)
    kernel.silu_and_mul(out, x)
    np.testing.assert_allclose(out, silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)
    out2 = np.zeros_like(out)
    kernel.call("silu_and_mul", out2, x)
    np.testing.assert_array_equal(out, out2)


def test_gelu_matches_numpy(kernel, rng):
    x = rng.standard_normal(1000, dtype=np.float32) * 4
    out = np.empty_like(x)
    kernel.gelu(out, x)
    np.testing.assert_allclose(out, gelu_ref(x), rtol=1e-4, atol=1e-5)


def test_rms_norm_matches_numpy(kernel, rng):
    x = rng.standard_normal((7, 64), dtype=np.float32)
    w = rng.standard_normal(64, dtype=np.float32)
    out = np.empty_like(x)
    kernel.rms_norm(out, x, w, 1e-6)
    np.testing.assert_allclose(out, rms_norm_ref(x, w, 1e-6), rtol=1e-4, atol=1e-5)


def test_functions_are_objects(kernel):
    f = kernel.silu_and_mul
    assert f.name == "silu_and_mul"
    assert f.signature == "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])"
    with pytest.raises(AttributeError, match="it exports: gelu, rms_norm, silu_and_mul"):
        kernel.no_such_function
    with pytest.raises(khub.NotFound, match="no function `nope`"):
        kernel.call("nope")


def _mismatch(fn, *args, match):
    with pytest.raises(khub.SignatureMismatch, match=match) as e:
        fn(*args)
    assert e.value.code == "signature-mismatch"
    return e.value


def test_argument_count_is_checked(kernel):
    x = np.zeros((2, 4), np.float32)
    _mismatch(kernel.silu_and_mul, x, match=r"takes 2 arguments .* passed 1")
    _mismatch(kernel.gelu, x, x, x, match=r"takes 2 arguments .* passed 3")


def test_dtype_is_checked_naming_the_argument(kernel):
    out = np.zeros((2, 4), np.float32)
    x = np.zeros((2, 8), np.float64)
    _mismatch(kernel.silu_and_mul, out, x, match=r"argument 1 \(`tensor<f32>\[n, 2d\]`\) of `silu_and_mul`: the tensor has dtype f64, but the signature wants f32")
    _mismatch(kernel.gelu, np.zeros(4, np.int32), np.zeros(4, np.float32), match=r"argument 0 .* dtype i32")


def test_named_dimensions_are_checked(kernel):
    # x [n, 2d] with out [n, d]: d = 4 from out, so x's last dimension must be 8.
    e = _mismatch(
        kernel.silu_and_mul,
        np.zeros((2, 4), np.float32),
        np.zeros((2, 6), np.float32),
        match=r"argument 1 .* dimension 1 \(6\) must be 8, since `d` is 4 from argument 0",
    )
    assert "silu_and_mul" in str(e)
    _mismatch(
        kernel.silu_and_mul,
        np.zeros((3, 4), np.float32),
        np.zeros((2, 8), np.float32),
        match=r"dimension 0 \(2\) must be 3, since `n` is 3",
    )
    _mismatch(
        kernel.rms_norm,
        np.zeros((2, 8), np.float32),
        np.zeros((2, 8), np.float32),
        np.zeros(7, np.float32),
        1e-6,
        match=r"argument 2 .* must be 8, since `h` is 8",
    )
    # Leading dimensions flatten into n: out [3, 5, 4] fits x [3, 5, 8].
    kernel.silu_and_mul(np.zeros((3, 5, 4), np.float32), np.zeros((3, 5, 8), np.float32))
    # The signature alone admits out [15, 4] (n = 15 either way); this kernel also wants
    # the same leading dimensions, and says so itself.
    with pytest.raises(khub.KernelError, match="same leading dimensions"):
        kernel.silu_and_mul(np.zeros((15, 4), np.float32), np.zeros((3, 5, 8), np.float32))


def test_rank_is_checked(kernel):
    _mismatch(
        kernel.silu_and_mul,
        np.zeros(4, np.float32),
        np.zeros((1, 8), np.float32),
        match=r"argument 0 .* has rank 1 .*\(rank 2 or more",
    )
    _mismatch(kernel.gelu, np.zeros((), np.float32), np.zeros((), np.float32), match="has rank 0")


def test_scalars_are_checked(kernel):
    x = np.zeros((2, 8), np.float32)
    w = np.zeros(8, np.float32)
    _mismatch(kernel.rms_norm, x, x.copy(), w, "eps", match=r"argument 3 \(`f32`\) .* expected a number, got str")


def test_a_non_tensor_is_refused(kernel):
    _mismatch(kernel.gelu, [1.0, 2.0], np.zeros(2, np.float32), match=r"argument 0 .* a list is not a tensor: it has no `__dlpack__`")
    _mismatch(kernel.gelu, np.zeros(2, np.float32), "x", match=r"argument 1 .* str is not a tensor")


def test_a_read_only_output_is_refused(kernel):
    out = np.zeros(4, np.float32)
    out.flags.writeable = False
    x = np.ones(4, np.float32)
    e = _mismatch(kernel.gelu, out, x, match=r"argument 0 \(`mut tensor<f32>\[n\]`\)")
    # numpy >= 2.1 exports it flagged read-only (DLPack 1.0); older numpy refuses to export it.
    assert "read-only" in str(e) or "readonly" in str(e)
    assert np.all(out == 0)
    # A read-only *input* is fine.
    x.flags.writeable = False
    out2 = np.zeros(4, np.float32)
    kernel.gelu(out2, x)
    assert np.all(out2 > 0)


def test_a_non_contiguous_tensor_is_the_kernels_to_refuse(kernel):
    # The ABI lets kernels take strided tensors (the strides are passed); this one says no.
    x = np.zeros((4, 16), np.float32)[:, ::2]
    out = np.zeros((4, 4), np.float32)
    with pytest.raises(khub.KernelError, match="x is not contiguous") as e:
        kernel.silu_and_mul(out, x)
    assert e.value.status == 2  # KHUB_ERR_UNSUPPORTED
    assert e.value.code == "kernel"


def test_a_kernel_error_carries_status_and_message(kernel):
    x = np.ones((2, 8), np.float32)
    with pytest.raises(khub.KernelError, match=r"eps must be finite and >= 0 \(got -1\)") as e:
        kernel.rms_norm(np.empty_like(x), x, np.ones(8, np.float32), -1.0)
    assert e.value.status == 1  # KHUB_ERR_INVALID_ARGUMENT
    assert isinstance(e.value, khub.Error)


def test_empty_tensors(kernel):
    kernel.gelu(np.zeros(0, np.float32), np.zeros(0, np.float32))


def test_the_capsules_are_released(kernel):
    import gc
    import sys

    x = np.ones((2, 8), np.float32)
    out = np.zeros((2, 4), np.float32)
    before = sys.getrefcount(x), sys.getrefcount(out)
    for _ in range(100):
        kernel.silu_and_mul(out, x)
    gc.collect()
    assert (sys.getrefcount(x), sys.getrefcount(out)) == before


def test_threads_call_concurrently(kernel):
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((64, 256), dtype=np.float32) for _ in range(8)]
    results = [None] * len(inputs)
    errors = []
    barrier = threading.Barrier(len(inputs))

    def work(i: int) -> None:
        try:
            barrier.wait()
            out = np.empty((64, 128), np.float32)
            for _ in range(50):
                kernel.silu_and_mul(out, inputs[i])
            results[i] = out
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for x, out in zip(inputs, results):
        np.testing.assert_allclose(out, silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)


def test_the_gil_is_released_during_the_call(kernel):
    import time

    x = np.random.default_rng(2).standard_normal(1 << 24, dtype=np.float32)
    out = np.empty_like(x)
    window = []
    seen = []
    done = threading.Event()

    def call():
        t0 = time.perf_counter()
        kernel.gelu(out, x)
        window.extend([t0, time.perf_counter()])
        done.set()

    worker = threading.Thread(target=call)
    worker.start()
    while not done.is_set():
        seen.append(time.perf_counter())
    worker.join()
    t0, t1 = window
    # While the kernel runs in the worker, this thread keeps running Python: it could not
    # if the call held the GIL (it would stall from just after t0 until t1).
    lo, hi = t0 + (t1 - t0) / 3, t1 - (t1 - t0) / 3
    assert any(lo < t < hi for t in seen), f"no Python ran during the middle of a {1e3 * (t1 - t0):.1f} ms call"
