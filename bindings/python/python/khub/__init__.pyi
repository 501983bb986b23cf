"""Type stubs for khub (the package re-exports the extension module khub._khub)."""

import os
import pathlib
from typing import Any, Dict, List, Optional, Union

PathLike = Union[str, os.PathLike[str]]

__version__: str

class Error(Exception):
    """Any khub failure."""

    code: str
    """The kind: not-found, no-variant, verify, trust, offline-miss, signature-mismatch,
    kernel, invalid-argument, registry, load, host, lock, io or internal."""
    causes: List[str]
    """The messages of the error's chain, outermost first (joined by ": " in str())."""
    status: Optional[int]
    """The kernel's status, for KernelError; None otherwise."""

class NotFound(Error): ...
class NoVariant(Error): ...
class VerifyError(Error): ...
class TrustError(Error): ...
class OfflineMiss(Error): ...
class SignatureMismatch(Error): ...
class KernelError(Error): ...

class Function:
    """One function of a loaded kernel; call it with the signature's arguments."""

    @property
    def name(self) -> str: ...
    @property
    def signature(self) -> str: ...
    def __call__(self, *args: Any) -> None: ...

class Kernel:
    """A loaded, verified kernel. Its functions are attributes: ``kernel.silu_and_mul(out, x)``."""

    @property
    def functions(self) -> List[str]: ...
    @property
    def info(self) -> Dict[str, Any]: ...
    def signature(self, name: str) -> str: ...
    def selftest(self, name: Optional[str] = None, seed: int = 42, n: int = 65536) -> Dict[str, Dict[str, Any]]: ...
    def call(self, name: str, *args: Any) -> None: ...
    def __getattr__(self, name: str) -> Function: ...

class Hub:
    """Host facts, a registry and the store; settings left None come from the environment."""

    def __init__(
        self,
        registry: Optional[PathLike] = None,
        cache: Optional[PathLike] = None,
        offline: Optional[bool] = None,
        trust: Optional[PathLike] = None,
        host: Optional[PathLike] = None,
        state_dir: Optional[PathLike] = None,
    ) -> None: ...
    @property
    def registry(self) -> str: ...
    @property
    def offline(self) -> bool: ...
    @property
    def cache(self) -> pathlib.Path: ...
    @property
    def host(self) -> Dict[str, Any]: ...
    def load(self, repo: str, version: str = "*") -> Kernel: ...
    def load_locked(self, lock_path: PathLike, repo: str) -> Kernel: ...
    def explain(self, repo: str, version: str = "*") -> Dict[str, Any]: ...

def load(
    repo: str,
    version: str = "*",
    *,
    registry: Optional[PathLike] = None,
    cache: Optional[PathLike] = None,
    offline: Optional[bool] = None,
    trust: Optional[PathLike] = None,
    host: Optional[PathLike] = None,
) -> Kernel: ...
def host(host: Optional[PathLike] = None) -> Dict[str, Any]: ...
def explain(
    repo_or_path: PathLike,
    version: str = "*",
    *,
    host: Optional[PathLike] = None,
    hub: Optional[Hub] = None,
) -> Dict[str, Any]: ...
