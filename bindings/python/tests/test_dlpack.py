"""The DLPack rules, with a producer written here in ctypes: versioned and legacy
capsules, capsule renaming, one deleter call per consumed tensor (also when the tensor is
refused), refused versions, devices and flags, and answers that are not capsules."""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_char_p, c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

import numpy as np
import pytest

import khub


class DLDevice(Structure):
    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class DLDataType(Structure):
    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class DLTensor(Structure):
    _fields_ = [
        ("data", c_void_p),
        ("device", DLDevice),
        ("ndim", c_int32),
        ("dtype", DLDataType),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, c_void_p)


class DLManagedTensor(Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", c_void_p), ("deleter", DELETER)]


class DLPackVersion(Structure):
    _fields_ = [("major", c_uint32), ("minor", c_uint32)]


class DLManagedTensorVersioned(Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", c_void_p),
        ("deleter", DELETER),
        ("flags", c_uint64),
        ("dl_tensor", DLTensor),
    ]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [c_void_p, c_char_p, c_void_p]
_capsule_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_is_valid.restype = ctypes.c_int
_capsule_is_valid.argtypes = [ctypes.py_object, c_char_p]

READ_ONLY, IS_COPIED = 1, 2


class Producer:
    """Exports a float32 numpy array through DLPack, the way a framework would."""

    def __init__(self, array, *, device=(1, 0), versioned=True, major=1, flags=0, legacy_only=False, answer=None, name=None):
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.device, self.versioned, self.major, self.flags = device, versioned, major, flags
        self.legacy_only, self.answer, self.name = legacy_only, answer, name
        self.deleted = 0
        self.calls = []
        self.capsules = []
        self._keep = []
        self._deleter = DELETER(self._delete)

    def _delete(self, _ptr):
        self.deleted += 1

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if self.legacy_only and max_version is not None:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        self.calls.append({"stream": stream, "max_version": max_version})
        if self.answer is not None:
            return self.answer
        shape = (c_int64 * self.array.ndim)(*self.array.shape)
        t = DLTensor(
            self.array.ctypes.data, DLDevice(*self.device), self.array.ndim, DLDataType(2, 32, 1), shape, None, 0
        )
        if self.versioned and max_version is not None:
            m = DLManagedTensorVersioned(DLPackVersion(self.major, 0), None, self._deleter, self.flags, t)
            name = self.name or b"dltensor_versioned"
        else:
            m = DLManagedTensor(t, None, self._deleter)
            name = self.name or b"dltensor"
        self._keep += [shape, m]
        cap = _capsule_new(ctypes.addressof(m), name, None)
        self.capsules.append(cap)
        return cap


def renamed(cap, name: bytes) -> bool:
    return _capsule_is_valid(cap, name) == 1


def test_versioned_capsules_are_consumed_and_deleted_once(kernel):
    x = Producer(np.linspace(-1, 1, 8))
    out = Producer(np.zeros(8))
    kernel.gelu(out, x)
    assert out.array[-1] == pytest.approx(0.8412, abs=1e-3)
    for p in (x, out):
        assert p.calls == [{"stream": None, "max_version": (1, 0)}]
        assert p.deleted == 1
        assert renamed(p.capsules[0], b"used_dltensor_versioned")


def test_legacy_producers_get_the_legacy_call(kernel):
    x = Producer(np.ones(4), legacy_only=True)
    out = Producer(np.zeros(4), legacy_only=True)
    kernel.gelu(out, x)
    assert np.all(out.array > 0.8)
    assert [c["max_version"] for c in x.calls] == [None]
    assert x.deleted == 1 and out.deleted == 1
    assert renamed(x.capsules[0], b"used_dltensor")


def test_an_unknown_major_version_is_refused_and_deleted(kernel):
    x = Producer(np.ones(4), major=2)
    with pytest.raises(khub.SignatureMismatch, match=r"argument 1 .* DLPack 2\.0 tensor, and khub understands DLPack 1\.x only"):
        kernel.gelu(np.zeros(4, np.float32), x)
    assert x.deleted == 1


def test_a_tensor_on_another_device_is_refused_and_deleted(kernel):
    out = Producer(np.zeros(4))
    x = Producer(np.ones(4), device=(2, 0))
    with pytest.raises(khub.SignatureMismatch, match=r"argument 1 .* the tensor is on cuda, but this kernel's variant runs on cpu"):
        kernel.gelu(out, x)
    assert out.deleted == 1 and x.deleted == 1
    assert np.all(out.array == 0)


def test_read_only_and_copied_outputs_are_refused(kernel):
    for flag, words in ((READ_ONLY, "read-only"), (IS_COPIED, "exported a copy")):
        out = Producer(np.zeros(4), flags=flag)
        with pytest.raises(khub.SignatureMismatch, match=rf"argument 0 .* {words}"):
            kernel.gelu(out, np.ones(4, np.float32))
        assert out.deleted == 1
        assert np.all(out.array == 0)
    # As inputs, both are fine.
    out = np.zeros(4, np.float32)
    kernel.gelu(out, Producer(np.ones(4), flags=READ_ONLY | IS_COPIED))
    assert np.all(out > 0.8)


def test_answers_that_are_not_fresh_capsules_are_refused(kernel):
    with pytest.raises(khub.SignatureMismatch, match=r"returned an object of type `int`, not an unused DLPack capsule"):
        kernel.gelu(np.zeros(4, np.float32), Producer(np.ones(4), answer=42))
    used = Producer(np.ones(4), name=b"used_dltensor")
    with pytest.raises(khub.SignatureMismatch, match="not an unused DLPack capsule"):
        kernel.gelu(np.zeros(4, np.float32), used)
    assert used.deleted == 0  # not ours to delete
    other = Producer(np.ones(4), name=b"something_else")
    with pytest.raises(khub.SignatureMismatch, match="not an unused DLPack capsule"):
        kernel.gelu(np.zeros(4, np.float32), other)
    assert other.deleted == 0


def test_an_exporter_that_raises(kernel):
    class Broken:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, **kwargs):
            raise RuntimeError("no export today")

    with pytest.raises(khub.SignatureMismatch, match=r"argument 1 .* raised RuntimeError: no export today"):
        kernel.gelu(np.zeros(4, np.float32), Broken())
