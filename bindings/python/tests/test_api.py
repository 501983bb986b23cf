"""The type stubs describe the package that is installed: every name and method they
declare exists, and every public name the package has is declared."""

from __future__ import annotations

import ast
from pathlib import Path

import khub


def stub_tree():
    path = Path(khub.__file__).with_name("__init__.pyi")
    assert path.exists(), "the wheel ships no __init__.pyi"
    assert path.with_name("py.typed").exists(), "the wheel ships no py.typed"
    return ast.parse(path.read_text())


def test_the_stubs_match_the_module():
    tree = stub_tree()
    declared = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            declared.add(node.name)
            assert hasattr(khub, node.name), f"the stubs declare khub.{node.name}, the package has none"
        if isinstance(node, ast.ClassDef):
            cls = getattr(khub, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                    assert hasattr(cls, item.name), f"the stubs declare khub.{node.name}.{item.name}"
    assert set(khub.__all__) <= declared, set(khub.__all__) - declared


def test_docstrings():
    for name in ("Hub", "Kernel", "Function", "load", "explain", "host", "Error"):
        assert (getattr(khub, name).__doc__ or "").strip(), f"khub.{name} has no docstring"
    assert (khub.Hub.load.__doc__ or "").strip()
    assert (khub.Kernel.selftest.__doc__ or "").strip()
