"""The kernel runtime: the compiled extension, backend selection and argument checks.

Backends, in auto order: on a GPU ``cuda`` > ``triton`` > ``torch``; on the CPU ``cpu`` > ``torch``.
``torch`` is the pure-PyTorch reference (:mod:`biogen.ops.reference`), which is both the oracle of
the tests and the fallback. An explicit choice (``backend=`` argument, :func:`use_backend`, or the
``BIOGEN_BACKEND`` environment variable) that cannot run raises :class:`BackendUnavailableError`
listing why each backend was rejected; auto selection falls back silently (logged at debug level).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger("biogen.ops")

BACKENDS = ("cuda", "triton", "cpu", "torch")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

# dtype codes shared with csrc/include/biogen/common.h (enum DType)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

try:  # the extension is optional at import time so a broken build still leaves the torch backend
    from biogen import _C  # type: ignore[attr-defined]

    _C_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _C_ERROR = f"compiled extension biogen._C failed to import: {exc}"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def build_info() -> dict:
    """What the extension was compiled with (empty dict with an ``error`` if it did not import)."""
    if _C is None:
        return {"error": _C_ERROR}
    return dict(_C.build_info())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def has_triton_kernel(name: str) -> bool:
    """Whether triton is installed and biogen ships the Triton kernel module ``biogen.ops.triton.<name>``."""
    try:
        return _triton_installed() and importlib.util.find_spec(f"biogen.ops.triton.{name}") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def triton_kernel(name: str):
    """``biogen.ops.triton.<name>``, imported on first use (importing triton costs about a second)."""
    return importlib.import_module(f"biogen.ops.triton.{name}")


def backend_reasons(backend: str, device: torch.device) -> list[str]:
    """Why ``backend`` cannot run on ``device`` at all, independent of the op (empty: it can)."""
    reasons: list[str] = []
    if backend == "torch":
        return reasons
    if backend == "cpu":
        if _C is None:
            reasons.append(_C_ERROR or "biogen._C is missing")
        if device.type != "cpu":
            reasons.append(f"tensors are on {device}, the cpu backend needs cpu tensors")
    elif backend == "cuda":
        info = build_info()
        if _C is None:
            reasons.append(_C_ERROR or "biogen._C is missing")
        elif not info.get("cuda"):
            reasons.append("biogen._C was built without a CUDA compiler")
        if device.type != "cuda":
            reasons.append(f"tensors are on {device}, the cuda backend needs cuda tensors")
    elif backend == "triton":
        if not _triton_installed():
            reasons.append("triton is not installed")
        if device.type == "cpu" and not triton_interpret():
            reasons.append("tensors are on cpu; Triton runs on the CPU only with TRITON_INTERPRET=1")
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"triton does not support device {device}")
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return reasons


_local = threading.local()


def _context_backend() -> Optional[str]:
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Run every biogen op inside the block with ``backend`` ('cuda', 'triton', 'cpu', 'torch' or 'auto')."""
    _validate_name(backend)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(backend)
    try:
        yield
    finally:
        stack.pop()


def _validate_name(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def requested_backend(backend: Optional[str]) -> tuple[Optional[str], str]:
    """The explicit choice in force (argument > context manager > BIOGEN_BACKEND) and where it came from."""
    for value, source in (
        (backend, "backend= argument"),
        (_context_backend(), "biogen.ops.use_backend()"),
        (os.environ.get("BIOGEN_BACKEND") or None, "BIOGEN_BACKEND environment variable"),
    ):
        if value is not None:
            _validate_name(value)
            return (None if value == "auto" else value), source
    return None, "auto"


Reasons = Callable[..., list[str]]


@dataclass
class KernelOp:
    """One op's per-backend implementations, each with the reasons it cannot take given inputs.

    ``reasons[backend](**inputs)`` lists op-specific limits (dtype, head_dim, ...); device-level
    availability comes from :func:`backend_reasons`.
    """

    name: str
    reasons: dict[str, Reasons] = field(default_factory=dict)

    def not_supported_reasons(self, backend: str, device: torch.device, **inputs) -> list[str]:
        out = backend_reasons(backend, device)
        if backend not in self.reasons:
            out.append(f"{self.name} has no {backend} implementation")
        elif not out:
            out.extend(self.reasons[backend](**inputs))
        return out

    def select(self, backend: Optional[str], device: torch.device, **inputs) -> str:
        """The backend that will run: the explicit choice if it can, else the first in auto order."""
        want, source = requested_backend(backend)
        if want is not None:
            why = self.not_supported_reasons(want, device, **inputs)
            if not why:
                return want
            lines = [f"{self.name}: backend {want!r} (from the {source}) cannot run these inputs:"]
            for b in BACKENDS:
                r = self.not_supported_reasons(b, device, **inputs)
                lines.append(f"  {b}: " + ("; ".join(r) if r else "available"))
            raise BackendUnavailableError("\n".join(lines))
        order = AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]
        for b in order:
            why = self.not_supported_reasons(b, device, **inputs)
            if not why:
                return b
            if not torch.compiler.is_compiling():  # dynamo cannot trace logging calls
                log.debug("%s: skipping backend %s: %s", self.name, b, "; ".join(why))
        raise BackendUnavailableError(f"{self.name}: no backend can run on {device}")  # torch always can


def available_backends(device: torch.device | str = "cpu") -> dict[str, list[str]]:
    """For each backend, why it cannot run on ``device`` (an empty list: available)."""
    device = torch.device(device)
    return {b: backend_reasons(b, device) for b in BACKENDS}


# ---------------------------------------------------------------- argument checks (before any launch)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[tuple[torch.dtype, ...]] = None,
    shape: Optional[tuple[Optional[int], ...]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise a ValueError/TypeError naming ``name`` if ``t`` is not what an op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if len(shape) != t.dim() or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def num_threads() -> int:
    """Threads the C++ kernels use: the same as torch's intra-op pool, so users tune one knob."""
    return max(1, torch.get_num_threads())


def cuda_stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
