"""Fixtures: the example kernel (kernels-example, CPU variants) packaged by the real
`khub` binary into a directory registry, hubs over it, and a real `khub serve`.

The `khub` binary comes from KHUB_BIN, else the cargo target directory
($CARGO_TARGET_DIR or <repo>/target, debug profile): `cargo build` makes it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
REPO_ID = "acme/activation"
VERSION = "0.1.0"

# The tests decide every setting themselves: nothing from the caller's KHUB_* or HF_*
# environment may reach the hubs (a registry, an offline switch, a trust policy).
for _var in list(os.environ):
    if _var.startswith("KHUB_") and _var not in ("KHUB_BIN", "KHUB_NVCC") or _var in (
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
    ):
        del os.environ[_var]


def in_ci() -> bool:
    return os.environ.get("CI", "") not in ("", "0", "false")


def khub_bin() -> Path:
    env = os.environ.get("KHUB_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "khub"


def run_khub(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = khub_bin()
    if not exe.exists():
        message = f"the khub binary is not at {exe}: run `cargo build` first, or set KHUB_BIN"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"khub {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def cpu_only_kernel(dst: Path) -> Path:
    """A copy of kernels-example whose kernel.toml keeps the CPU variants only (the
    Python tests need no nvcc or clang)."""
    shutil.copytree(REPO / "kernels-example", dst)
    text = (dst / "kernel.toml").read_text()
    head, *blocks = re.split(r"(?m)^\[\[variants\]\]\n", text)
    kept = [b for b in blocks if re.search(r'(?m)^backend = "cpu"', b)]
    assert kept, "kernels-example has no CPU variant"
    (dst / "kernel.toml").write_text(head + "".join("[[variants]]\n" + b for b in kept))
    return dst


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Path:
    """A directory registry holding acme/activation 0.1.0 (kernels-example, CPU)."""
    base = tmp_path_factory.mktemp("khub-py")
    kernel = cpu_only_kernel(base / "kernel")
    reg = base / "registry"
    release = reg / "acme" / "activation" / VERSION
    release.parent.mkdir(parents=True)
    run_khub("package", str(kernel), "--out", str(release))
    assert (release / "khub.toml").exists()
    return reg


@pytest.fixture()
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture()
def hub(registry, cache, tmp_path):
    import khub

    return khub.Hub(registry=registry, cache=cache, state_dir=tmp_path / "state")


@pytest.fixture(scope="session")
def kernel(registry, tmp_path_factory):
    import khub

    base = tmp_path_factory.mktemp("kernel")
    return khub.Hub(registry=registry, cache=base / "cache", state_dir=base / "state").load(REPO_ID, "^0.1")


@pytest.fixture()
def serve(registry):
    """`khub serve` over the registry on 127.0.0.1, a free port; yields its URL."""
    exe = khub_bin()
    if not exe.exists():
        pytest.skip(f"the khub binary is not at {exe}")
    p = subprocess.Popen(
        [str(exe), "serve", str(registry), "--addr", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        m = re.search(r" on (http://127\.0\.0\.1:\d+)", line)
        assert m, f"khub serve said: {line!r}"
        yield m.group(1)
    finally:
        p.terminate()
        p.wait(timeout=30)


def require_torch():
    """Imports torch, or skips (fails under CI=true, where .ci/run installs it)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        if in_ci():
            pytest.fail("torch is not installed; .ci/run installs it (pip install torch)")
        pytest.skip("torch is not installed (pip install torch to run the torch tests)")
    return sys.modules["torch"]
