"""Every exception class, raised by the real failure, with the CLI's message."""

from __future__ import annotations

import shutil

import pytest

import khub
from conftest import REPO_ID, VERSION, run_khub


def test_the_hierarchy():
    for cls in (khub.NotFound, khub.NoVariant, khub.VerifyError, khub.TrustError, khub.OfflineMiss, khub.SignatureMismatch, khub.KernelError):
        assert issubclass(cls, khub.Error)
        assert cls.__module__ == "khub"
    assert issubclass(khub.Error, Exception)


def test_not_found_repository(hub):
    with pytest.raises(khub.NotFound) as e:
        hub.load("acme/missing", "*")
    assert e.value.code == "not-found"
    assert "acme/missing" in str(e.value)


def test_not_found_release_lists_what_there_is(hub):
    with pytest.raises(khub.NotFound, match=r"matches `\^9`; it has: 0\.1\.0"):
        hub.load(REPO_ID, "^9")


def test_message_is_the_clis(hub, registry, cache):
    with pytest.raises(khub.NotFound) as e:
        hub.load(REPO_ID, "^9")
    cli = run_khub("load", REPO_ID, "--version", "^9", "--registry", str(registry), env={"KHUB_CACHE": str(cache)}, check=False)
    assert cli.returncode != 0
    assert cli.stderr.strip() == f"error: {e.value}"
    assert e.value.causes and ": ".join(e.value.causes) == str(e.value)


def test_bad_arguments_are_errors(hub):
    with pytest.raises(khub.Error) as e:
        hub.load("not-a-repo-id", "*")
    assert e.value.code == "invalid-argument"
    with pytest.raises(khub.Error) as e:
        hub.load(REPO_ID, "not a requirement")
    assert e.value.code == "invalid-argument"


def test_no_variant_for_this_host(registry, tmp_path):
    profile = tmp_path / "arm.toml"
    profile.write_text('os = "linux"\narch = "aarch64"\nlibc = "glibc 2.36"\n')
    hub = khub.Hub(registry=registry, cache=tmp_path / "cache", host=profile, state_dir=tmp_path / "state")
    with pytest.raises(khub.NoVariant) as e:
        hub.load(REPO_ID, "^0.1")
    assert e.value.code == "no-variant"
    assert "aarch64" in str(e.value)


def test_verify_error_on_tampered_bytes(registry, tmp_path):
    bad = tmp_path / "registry"
    shutil.copytree(registry, bad)
    release = bad / "acme" / "activation" / VERSION
    for lib in release.rglob("*.so"):
        data = bytearray(lib.read_bytes())
        data[len(data) // 2] ^= 0xFF
        lib.write_bytes(bytes(data))
    hub = khub.Hub(registry=bad, cache=tmp_path / "cache", state_dir=tmp_path / "state")
    with pytest.raises(khub.VerifyError) as e:
        hub.load(REPO_ID, "^0.1")
    assert e.value.code == "verify"
    assert "sha256" in str(e.value).lower()


def test_trust_error_when_signatures_are_required(registry, tmp_path):
    policy = tmp_path / "trust.toml"
    policy.write_text("require-signature = true\n")
    hub = khub.Hub(registry=registry, cache=tmp_path / "cache", trust=policy, state_dir=tmp_path / "state")
    with pytest.raises(khub.TrustError) as e:
        hub.load(REPO_ID, "^0.1")
    assert e.value.code == "trust"
    assert "not signed" in str(e.value) or "signature" in str(e.value)


def test_trust_policy_that_does_not_exist(registry, tmp_path):
    with pytest.raises(khub.Error, match="does not exist"):
        khub.Hub(registry=registry, cache=tmp_path / "cache", trust=tmp_path / "nope.toml")


def test_offline_miss(registry, tmp_path):
    hub = khub.Hub(registry=registry, cache=tmp_path / "cache", offline=True, state_dir=tmp_path / "state")
    with pytest.raises(khub.OfflineMiss, match="while online"):
        hub.load(REPO_ID, "^0.1")


def test_signature_mismatch_and_kernel_error(kernel):
    import numpy as np

    with pytest.raises(khub.SignatureMismatch):
        kernel.gelu(np.zeros(2, np.float64), np.zeros(2, np.float64))
    with pytest.raises(khub.KernelError):
        kernel.rms_norm(np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), np.zeros(2, np.float32), float("nan"))


def test_bad_host_profile_is_an_error(registry, tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text("os = 42\n")
    with pytest.raises(khub.Error) as e:
        khub.Hub(registry=registry, cache=tmp_path / "cache", host=profile)
    assert e.value.code == "host"


def test_explain_of_a_missing_manifest(tmp_path):
    with pytest.raises(khub.NotFound, match="cannot read"):
        khub.explain(tmp_path / "nothing.toml")
