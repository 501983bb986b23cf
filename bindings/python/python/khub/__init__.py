"""khub: load verified compute kernels from a kernel registry into torch and numpy.

The same front door as khub's Rust and C hosts: a :class:`Hub` resolves a kernel's
release, picks the variant built for this machine, verifies every byte against the
release manifest and loads it. A loaded :class:`Kernel`'s functions take any object
with ``__dlpack__`` (torch tensors, numpy >= 1.23 arrays, jax and cupy arrays) without
copying, after checking each argument against the function's signature::

    import khub, numpy as np
    kernel = khub.load("acme/activation", "^0.1")
    x = np.random.rand(4, 8).astype(np.float32)
    out = np.empty((4, 4), np.float32)
    kernel.silu_and_mul(out, x)

See docs/python.md for the whole API.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from ._khub import (
    Error,
    Function,
    Hub,
    KernelError,
    Kernel,
    NoVariant,
    NotFound,
    OfflineMiss,
    SignatureMismatch,
    TrustError,
    VerifyError,
    explain_manifest as _explain_manifest,
    host,
    version as _version,
)

__version__ = _version()

__all__ = [
    "Error",
    "Function",
    "Hub",
    "Kernel",
    "KernelError",
    "NoVariant",
    "NotFound",
    "OfflineMiss",
    "SignatureMismatch",
    "TrustError",
    "VerifyError",
    "explain",
    "host",
    "load",
]

PathLike = Union[str, "os.PathLike[str]"]


def load(
    repo: str,
    version: str = "*",
    *,
    registry: Optional[PathLike] = None,
    cache: Optional[PathLike] = None,
    offline: Optional[bool] = None,
    trust: Optional[PathLike] = None,
    host: Optional[PathLike] = None,
) -> Kernel:
    """Opens a :class:`Hub` with these settings (the rest from the environment) and loads
    ``repo`` at the highest release matching ``version``."""
    hub = Hub(registry=registry, cache=cache, offline=offline, trust=trust, host=host)
    return hub.load(repo, version)


def _is_manifest_path(target: Any) -> bool:
    if isinstance(target, os.PathLike):
        return True
    text = str(target)
    return os.path.exists(text) or text.endswith(".toml") or text.startswith((".", "/", "~"))


def explain(
    repo_or_path: Union[str, "os.PathLike[str]"],
    version: str = "*",
    *,
    host: Optional[PathLike] = None,
    hub: Optional[Hub] = None,
) -> dict:
    """Every variant of a release, ranked or rejected for a host, as the dict that
    ``khub explain --json`` prints.

    ``repo_or_path`` is a manifest (``khub.toml``, or a release directory holding one) or
    a repository ``org/name``, resolved at ``version`` through ``hub`` (default: a hub
    from the environment, for the host profile ``host``). ``host`` is a host-profile TOML
    file; ``None`` probes this machine (with ``KHUB_HOST_PROFILE`` and ``KHUB_*``
    overrides applied).
    """
    if _is_manifest_path(repo_or_path):
        return _explain_manifest(os.path.expanduser(os.fspath(repo_or_path)), host)
    if hub is None:
        hub = Hub(host=host)
    return hub.explain(str(repo_or_path), version)
