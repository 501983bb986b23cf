"""Loading: directory registry, `khub serve`, locks, offline mode; info, self-tests, and
the host/explain documents against the CLI's --json."""

from __future__ import annotations

import json
import shutil

import pytest

import khub
from conftest import REPO_ID, VERSION, run_khub


def test_load_from_a_directory_registry(hub, registry):
    k = hub.load(REPO_ID, "^0.1")
    assert k.functions == ["gelu", "rms_norm", "silu_and_mul"]
    info = k.info
    assert info["kernel"] == "activation"
    assert info["version"] == VERSION
    assert info["backend"] == "cpu"
    assert info["variant"].startswith("cpu-x86_64-v")
    assert info["repo"] == REPO_ID
    assert info["source"] == "registry"
    assert info["signature"] == "unsigned" and info["signed-by"] is None
    assert len(info["manifest-sha256"]) == 64
    assert all(len(f["sha256"]) == 64 for f in info["files"])
    assert {e["name"]: e["signature"] for e in info["exports"]}["silu_and_mul"] == "(mut tensor<f32>[n, d], tensor<f32>[n, 2d])"
    assert k.signature("gelu") == "(mut tensor<f32>[n], tensor<f32>[n])"
    assert "silu_and_mul" in repr(k) and "silu_and_mul" in dir(k)


def test_load_shortcut_and_module_level_settings(registry, tmp_path):
    k = khub.load(REPO_ID, "=0.1.0", registry=registry, cache=tmp_path / "c")
    assert k.info["version"] == VERSION


def test_selftest_runs_every_export(kernel):
    reports = kernel.selftest()
    assert sorted(reports) == ["gelu", "rms_norm", "silu_and_mul"]
    for name, r in reports.items():
        assert r["passed"], (name, r)
        assert r["max-error"] < 1e-3
    one = kernel.selftest("gelu", seed=7, n=1000)
    assert list(one) == ["gelu"]


def test_load_through_khub_serve(serve, tmp_path):
    hub = khub.Hub(registry=serve, cache=tmp_path / "cache", state_dir=tmp_path / "state")
    assert hub.registry == serve
    k = hub.load(REPO_ID, "^0.1")
    assert k.info["registry"] == serve
    assert len(k.info["commit"]) == 40
    import numpy as np

    x = np.linspace(-2, 2, 16, dtype=np.float32)
    out = np.empty_like(x)
    k.gelu(out, x)
    assert np.all(np.isfinite(out))


def test_offline_load_uses_the_store_only(registry, tmp_path):
    reg = tmp_path / "registry"
    shutil.copytree(registry, reg)
    cache, state = tmp_path / "cache", tmp_path / "state"
    with pytest.raises(khub.OfflineMiss) as e:
        khub.Hub(registry=reg, cache=cache, state_dir=state, offline=True).load(REPO_ID, "^0.1")
    assert e.value.code == "offline-miss"
    assert "khub fetch" in str(e.value)
    khub.Hub(registry=reg, cache=cache, state_dir=state).load(REPO_ID, "^0.1")
    # Offline, even with the registry gone, the store serves the release seen before.
    shutil.rmtree(reg)
    off = khub.Hub(registry=reg, cache=cache, state_dir=state, offline=True)
    assert off.offline
    k = off.load(REPO_ID, "^0.1")
    assert k.info["version"] == VERSION


def test_locked_load(registry, tmp_path):
    cache = tmp_path / "cache"
    app = tmp_path / "kernels.toml"
    app.write_text(f'[kernels]\n"{REPO_ID}" = "^0.1"\n')
    lock = tmp_path / "khub.lock"
    run_khub("lock", "--app", str(app), "--out", str(lock), "--registry", str(registry), env={"KHUB_CACHE": str(cache)})
    hub = khub.Hub(registry=tmp_path / "gone", cache=cache, offline=True, state_dir=tmp_path / "state")
    k = hub.load_locked(lock, REPO_ID)
    info = k.info
    assert info["source"] == "lockfile" and info["lockfile"] == str(lock)
    assert info["signature"] == "pinned"
    assert info["version"] == VERSION
    with pytest.raises(khub.NotFound) as e:
        hub.load_locked(lock, "acme/other")
    assert "acme/other" in str(e.value)


def test_host_matches_the_cli(monkeypatch):
    monkeypatch.setenv("KHUB_CPU_LEVEL", "x86-64-v2")
    doc = khub.host()
    cli = json.loads(run_khub("host", "--json", env={"KHUB_CPU_LEVEL": "x86-64-v2"}).stdout)
    assert doc["facts"] == cli["facts"]
    assert sorted(doc["sources"]) == sorted(cli["sources"])
    assert doc["sources"]["cpu-level"] == {"kind": "env", "var": "KHUB_CPU_LEVEL"}
    assert doc["facts"]["cpu-level"] == "x86-64-v2"


def test_explain_a_manifest_matches_the_cli(registry, tmp_path):
    release = registry / "acme" / "activation" / VERSION
    profile = tmp_path / "v1.toml"
    profile.write_text('os = "linux"\narch = "x86_64"\nlibc = "glibc 2.36"\ncpu-level = "x86-64-v1"\n')
    doc = khub.explain(release, host=profile)
    cli = json.loads(run_khub("explain", str(release), "--host", str(profile), "--json").stdout)
    assert doc == cli
    assert doc["chosen"] == "cpu-x86_64-v1-linux"


def test_explain_a_repository(hub):
    doc = hub.explain(REPO_ID, "^0.1")
    assert doc["repo"] == REPO_ID
    assert doc["version"] == VERSION
    assert doc["chosen"].startswith("cpu-x86_64-v")
    assert khub.explain(REPO_ID, "^0.1", hub=hub) == doc
