"""torch: calls on torch tensors, the torch.library registration, torch.compile (CPU).

Skipped when torch is not installed, except under CI=true (.ci/run installs it)."""

from __future__ import annotations

import pytest

import khub
from conftest import require_torch

torch = require_torch()
import khub.torch as khub_torch  # noqa: E402


def test_calls_on_torch_tensors(kernel):
    x = torch.randn(4, 6, 32)
    out = torch.empty(4, 6, 16)
    kernel.silu_and_mul(out, x)
    ref = torch.nn.functional.silu(x[..., :16]) * x[..., 16:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    y = torch.randn(1000) * 3
    g = torch.empty_like(y)
    kernel.gelu(g, y)
    torch.testing.assert_close(g, torch.nn.functional.gelu(y, approximate="tanh"), rtol=1e-4, atol=1e-5)

    h = torch.randn(5, 128)
    w = torch.randn(128)
    n = torch.empty_like(h)
    kernel.rms_norm(n, h, w, 1e-5)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(n, ref, rtol=1e-4, atol=1e-5)


def test_torch_argument_checks(kernel):
    with pytest.raises(khub.SignatureMismatch, match="dtype f16"):
        kernel.gelu(torch.empty(4, dtype=torch.float16), torch.empty(4))
    with pytest.raises(khub.SignatureMismatch, match="dtype bf16"):
        kernel.gelu(torch.empty(4), torch.empty(4, dtype=torch.bfloat16))
    x = torch.randn(4, 16)[:, ::2]
    with pytest.raises(khub.KernelError, match="not contiguous"):
        kernel.silu_and_mul(torch.empty(4, 4), x)
    with pytest.raises(khub.SignatureMismatch, match=r"argument 0 .* `__dlpack__` raised BufferError"):
        # A meta tensor has no data: torch refuses to export it.
        kernel.gelu(torch.empty(4, device="meta"), torch.empty(4))


def test_a_tensor_that_requires_grad_is_refused_by_torch(kernel):
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(khub.SignatureMismatch, match="__dlpack__"):
        kernel.gelu(torch.empty(4), x)


def test_output_shapes_from_named_dimensions():
    sig = "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])"
    assert khub_torch.output_shapes(sig, [torch.empty(3, 5, 8)]) == [([3, 5, 4], "f32")]
    sig = "(mut tensor<f32>[n, h], tensor<f32>[n, h], tensor<f32>[h], f32)"
    assert khub_torch.output_shapes(sig, [torch.empty(2, 7), torch.empty(7), 1e-6]) == [([2, 7], "f32")]


def test_register_and_torch_compile(kernel):
    ops = khub_torch.register(kernel, "khub_test")
    assert sorted(vars(ops)) == ["gelu", "rms_norm", "silu_and_mul"]
    x = torch.randn(8, 64)
    y = torch.ops.khub_test.silu_and_mul(x)
    assert y.shape == (8, 32)
    torch.testing.assert_close(y, torch.nn.functional.silu(x[:, :32]) * x[:, 32:], rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.khub_test.silu_and_mul.default, (x,), test_utils=("test_schema", "test_faketensor"))

    def model(x, w):
        h = torch.ops.khub_test.rms_norm(x, w, 1e-6)
        return torch.ops.khub_test.silu_and_mul(h) * 2

    w = torch.randn(64)
    eager = model(x, w)
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(x, w), eager, rtol=1e-5, atol=1e-6)
        # A new leading shape traces again (or dynamically) and still matches.
        x2 = torch.randn(3, 5, 64)
        torch.testing.assert_close(compiled(x2, w), model(x2, w), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already registered"):
        khub_torch.register(kernel, "khub_test")
