"""khub kernels as torch custom ops, so ``torch.compile`` can trace through them.

``register(kernel, "acme")`` defines, for each export of a loaded kernel, a functional op
``torch.ops.acme.<name>`` whose inputs are the signature's read-only tensors and scalars
and whose results are its ``mut tensor`` outputs, allocated by the op::

    ops = khub.torch.register(kernel, "acme")
    y = torch.ops.acme.silu_and_mul(x)          # out [n, d] from x [n, 2d]

The op's fake (meta) implementation derives each output's shape from the signature's
named dimensions (``[n, d]`` from ``x [n, 2d]``: ``n`` and ``d`` bound by the inputs), its
dtype from the signature (``tensor<f32>``) and its device from the first input. A ``mut
tensor`` is taken as an output only: an export that reads its output tensor before
writing it cannot be registered faithfully (call it directly instead).
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import Kernel, SignatureMismatch

__all__ = ["register", "output_shapes"]

# Keeps each namespace's torch.library.Library alive: dropping it would unregister the ops.
_LIBRARIES: Dict[str, Any] = {}

_DTYPES = {
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f32": torch.float32,
    "f64": torch.float64,
    "i8": torch.int8,
    "i32": torch.int32,
    "i64": torch.int64,
    "u8": torch.uint8,
    "bool": torch.bool,
}

_PARAM = re.compile(r"^(mut\s+)?tensor\s*(?:<\s*(\w+)\s*>)?\s*(?:\[([^\]]*)\])?$")


class _Param:
    def __init__(self, text: str) -> None:
        self.text = text.strip()
        m = _PARAM.match(self.text)
        if m is None:
            self.kind = self.text  # f32, f64, i64, u64
            self.mutable = False
            self.dtype = None
            self.dims: Optional[List[Tuple[int, Optional[str]]]] = None
            return
        self.kind = "tensor"
        self.mutable = m.group(1) is not None
        self.dtype = m.group(2)
        self.dims = None
        if m.group(3) is not None:
            self.dims = []
            for d in m.group(3).split(","):
                d = d.strip()
                digits = re.match(r"^(\d*)(\w*)$", d)
                if digits is None:
                    raise SignatureMismatch(f"cannot read dimension `{d}` of `{self.text}`")
                factor = int(digits.group(1)) if digits.group(1) else 1
                self.dims.append((factor, digits.group(2) or None))


def _params(signature: str) -> List[_Param]:
    inner = signature.strip()[1:-1]
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c in "[<":
            depth += 1
        elif c in "]>":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    if inner.strip():
        parts.append(inner[start:])
    return [_Param(p) for p in parts]


def output_shapes(signature: str, inputs: Sequence[Any]) -> List[Tuple[List[int], Optional[str]]]:
    """The shape and signature dtype of each ``mut tensor`` of ``signature``, given the
    other arguments (tensors or anything with ``.shape``, and scalars) in order.

    Named dimensions are bound by the inputs (a documented ``[n, d]`` covers a tensor of
    rank >= 2 whose leading dimensions flatten into ``n``); an output whose first named
    dimension matches an input's keeps that input's leading dimensions.
    """
    return _output_shapes(signature, _params(signature), inputs)


def _output_shapes(signature: str, params: List[_Param], inputs: Sequence[Any]) -> List[Tuple[List[Any], Optional[str]]]:
    ins = [p for p in params if not p.mutable]
    if len(ins) != len(inputs):
        raise SignatureMismatch(f"{signature} takes {len(ins)} inputs, got {len(inputs)}")
    bound: Dict[str, int] = {}
    leading: Dict[Tuple[int, Optional[str]], List[int]] = {}
    for p, x in zip(ins, inputs):
        if p.kind != "tensor" or p.dims is None:
            continue
        shape = list(x.shape)
        k = len(p.dims)
        if len(shape) < k:
            raise SignatureMismatch(f"an input of rank {len(shape)} for `{p.text}` (rank {k} or more)")
        lead = shape[: len(shape) - k + 1]
        flat = 1
        for s in lead:
            flat *= s
        extents = [flat] + shape[len(shape) - k + 1 :]
        leading.setdefault(p.dims[0], lead)
        for (factor, name), e in zip(p.dims, extents):
            if name is not None:
                bound.setdefault(name, e // factor)
    out = []
    for p in params:
        if not p.mutable:
            continue
        if p.dims is None:
            raise SignatureMismatch(f"output `{p.text}` has no documented shape, so its size is unknown")
        shape: List[int] = []
        for i, (factor, name) in enumerate(p.dims):
            if name is None:
                value = factor
            elif name in bound:
                value = factor * bound[name]
            else:
                raise SignatureMismatch(f"output `{p.text}`: no input binds `{name}`")
            if i == 0 and (factor, name) in leading:
                shape.extend(leading[(factor, name)])
            else:
                shape.append(value)
        out.append((shape, p.dtype))
    return out


def _schema_type(p: _Param) -> str:
    if p.kind == "tensor":
        return "Tensor"
    return "float" if p.kind in ("f32", "f64") else "int"


def register(kernel: Kernel, namespace: str) -> SimpleNamespace:
    """Registers every export of ``kernel`` as the torch custom op
    ``torch.ops.<namespace>.<name>`` (see the module's doc); returns a namespace of the
    ops by name. Registering the same namespace twice raises (torch's rule)."""
    if namespace in _LIBRARIES:
        raise ValueError(f"the namespace `{namespace}` is already registered by khub.torch")
    lib = torch.library.Library(namespace, "FRAGMENT")
    ops: Dict[str, Any] = {}
    for name in kernel.functions:
        signature = kernel.signature(name)
        params = _params(signature)
        ins = [(i, p) for i, p in enumerate(params) if not p.mutable]
        outs = [(i, p) for i, p in enumerate(params) if p.mutable]
        if not outs:
            continue
        args = ", ".join(f"{_schema_type(p)} a{i}" for i, p in ins)
        ret = "Tensor" if len(outs) == 1 else "(" + ", ".join("Tensor" for _ in outs) + ")"
        lib.define(f"{name}({args}) -> {ret}")
        fn = getattr(kernel, name)

        def allocate(inputs: Tuple[Any, ...], signature: str = signature, params: List[_Param] = params) -> List[Any]:
            first = next((x for x in inputs if isinstance(x, torch.Tensor)), None)
            device = first.device if first is not None else torch.device("cpu")
            result = []
            for shape, dtype in _output_shapes(signature, params, inputs):
                dt = _DTYPES.get(dtype or "", first.dtype if first is not None else torch.float32)
                result.append(torch.empty(shape, dtype=dt, device=device))
            return result

        def real(*inputs: Any, fn: Any = fn, params: List[_Param] = params, allocate: Any = allocate) -> Any:
            outputs = allocate(inputs)
            it_in, it_out = iter(inputs), iter(outputs)
            fn(*[next(it_out) if p.mutable else next(it_in) for p in params])
            return outputs[0] if len(outputs) == 1 else tuple(outputs)

        def fake(*inputs: Any, allocate: Any = allocate) -> Any:
            outputs = allocate(inputs)
            return outputs[0] if len(outputs) == 1 else tuple(outputs)

        lib.impl(name, real, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{namespace}::{name}", fake, lib=lib)
        ops[name] = getattr(getattr(torch.ops, namespace), name)
    _LIBRARIES[namespace] = lib
    return SimpleNamespace(**ops)
