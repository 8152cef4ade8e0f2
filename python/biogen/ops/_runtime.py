"""The kernel runtime: the compiled extension, backend selection and argument checks.

Backends: ``cuda`` (the extension's CUDA kernels), ``triton``, ``cpu`` (the extension's C++
kernels) and ``torch``, the pure-PyTorch reference (:mod:`biogen.ops.reference`), which is both the
oracle of the tests and the fallback. The auto order on a GPU is declared per op (``KernelOp(...,
gpu_order=...)``, next to the op) by what is fast: the tensor-core path first for attention-type
ops (Triton ``tl.dot``), the SIMT CUDA kernels first for memory-bound ones; on the CPU it is
``cpu`` > ``torch``. Each backend says per call why it cannot run (xformers-style
``not_supported_reasons``): device-level reasons from :func:`backend_reasons` (extension built with
CUDA, driver present and new enough, device count, compute capability against the compiled
architectures) plus the op's own (dtype, head_dim, features, shared memory). An explicit choice
(``backend=`` argument, :func:`use_backend`, or the ``BIOGEN_BACKEND`` environment variable) that
cannot run raises :class:`BackendUnavailableError` listing why each backend was rejected; auto
selection falls back silently (logged at debug level) and never crashes on a missing driver.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

log = logging.getLogger("biogen.ops")

BACKENDS = ("cuda", "triton", "cpu", "torch")
CPU_ORDER = ("cpu", "torch")
# The GPU order of an op that declares none; ops declare theirs (see KernelOp.gpu_order).
DEFAULT_GPU_ORDER = ("cuda", "triton", "torch")
# biogen's Triton kernels target Ampere or newer (bf16 tl.dot in the attention kernels, bf16 loads).
# Older GPUs fall back to the next backend.
TRITON_MIN_CAPABILITY = (8, 0)

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


# ------------------------------------------------------------------ what the CUDA runtime finds


@dataclass(frozen=True)
class CudaStatus:
    """What a CUDA device looks like to biogen: the build, the driver, the device.

    Produced by :func:`_cuda_device_status`; :func:`cuda_reasons` turns it into reasons. Tests fake
    conditions (an sm_75 device, no driver, an old driver) by monkeypatching that one function.
    """

    compiled: bool = False  # biogen._C has CUDA objects
    archs: str = ""  # CMAKE_CUDA_ARCHITECTURES of the build, e.g. "80,90"
    runtime_version: int = 0  # CUDA runtime the extension was built with, e.g. 13000 (13.0)
    driver_version: int = 0  # newest CUDA the driver supports; 0: no driver
    device_count: int = 0
    error: str = ""  # the runtime's error listing devices ("" = none)
    capability: Optional[tuple[int, int]] = None  # of the queried device
    image_error: str = ""  # loading a kernel of this extension on the device failed
    torch_cuda: str = ""  # why torch cannot use CUDA ("" = it can)


def _version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _torch_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return ""


def _device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _query_cuda_status(index: int) -> CudaStatus:
    torch_cuda = _torch_cuda_reason()
    torch_cap = None
    if not torch_cuda and index < torch.cuda.device_count():
        torch_cap = tuple(torch.cuda.get_device_capability(index))
    info = build_info()
    if not info.get("cuda") or not hasattr(_C, "cuda_status"):
        return CudaStatus(capability=torch_cap, torch_cuda=torch_cuda)
    st = _C.cuda_status(index)
    cap = (st["major"], st["minor"]) if st["major"] >= 0 else torch_cap
    return CudaStatus(compiled=True, archs=info.get("cuda_archs", ""), runtime_version=st["runtime_version"],
                      driver_version=st["driver_version"], device_count=st["device_count"], error=st["error"],
                      capability=cap, image_error=st["image_error"], torch_cuda=torch_cuda)


# Per device index, filled on first use: a plain dict, so torch.compile traces a cache hit as a constant.
_CUDA_STATUS: dict[int, CudaStatus] = {}


def _cuda_device_status(device: torch.device) -> CudaStatus:
    """The (cached) :class:`CudaStatus` of ``device``, a ``cuda`` device. Never raises."""
    index = _device_index(device)
    if index not in _CUDA_STATUS:
        _CUDA_STATUS[index] = _query_cuda_status(index)
    return _CUDA_STATUS[index]


def parse_cuda_archs(archs: str) -> list[tuple[int, str]]:
    """CMAKE_CUDA_ARCHITECTURES entries as (compute capability x 10, kind): kind is 'sass+ptx' for
    a plain entry ("80"), 'sass' ("80-real"), 'ptx' ("80-virtual"), 'exact' (an arch-specific
    "90a": runs only on that architecture) or 'family' ("100f": that major version). Entries that
    name no number ("all", "native") are skipped."""
    out = []
    for entry in filter(None, (e.strip() for e in re.split(r"[,;]", archs))):
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)([af]?)(?:-(real|virtual))?", entry)
        if not m:
            continue
        cc, suffix, which = int(m.group(1)), m.group(2), m.group(3)
        kind = {"a": "exact", "f": "family"}.get(suffix) or {"real": "sass", "virtual": "ptx"}.get(which, "sass+ptx")
        out.append((cc, kind))
    return out


def arch_supported(capability: tuple[int, int], archs: str) -> Optional[bool]:
    """Whether a build for ``archs`` holds code a device of ``capability`` can run: SASS of the same
    major version and an equal or lower minor one, or PTX of an equal or older architecture, which
    the driver compiles at load time. None when ``archs`` names no architecture (cannot tell)."""
    entries = parse_cuda_archs(archs)
    if not entries:
        return None
    dev = capability[0] * 10 + capability[1]
    for cc, kind in entries:
        if kind == "exact" and cc == dev:
            return True
        if kind in ("sass", "sass+ptx", "family") and cc // 10 == capability[0] and cc % 10 <= capability[1]:
            return True
        if kind in ("ptx", "sass+ptx") and cc <= dev:
            return True
    return False


def describe_archs(archs: str) -> str:
    parts = []
    for cc, kind in parse_cuda_archs(archs):
        name = {"exact": f"sm_{cc}a", "family": f"sm_{cc}f", "sass": f"sm_{cc}", "ptx": f"compute_{cc} (PTX)"}.get(
            kind, f"sm_{cc} + compute_{cc} (PTX)")
        parts.append(name)
    return ", ".join(parts) or archs or "nothing"


def cuda_reasons(st: CudaStatus, index: int) -> list[str]:
    """Why biogen's CUDA kernels cannot run on device ``index`` with status ``st`` (empty: they can)."""
    r: list[str] = []
    if not st.compiled:
        r.append("biogen._C was built without CUDA objects (no CUDA compiler at build time)")
    if st.torch_cuda:
        r.append(st.torch_cuda)
    if not st.compiled:
        return r
    need = _version_str(st.runtime_version)
    if st.driver_version <= 0:
        r.append(f"no NVIDIA driver found (biogen's CUDA kernels need a driver for CUDA {need} or newer)")
        return r
    # CUDA minor version compatibility: a driver of the same major version runs the runtime.
    if st.driver_version // 1000 < st.runtime_version // 1000:
        r.append(f"the NVIDIA driver supports CUDA {_version_str(st.driver_version)}, older than the CUDA {need} "
                 f"biogen was built with: update the driver")
        return r
    if st.error:
        r.append(f"the CUDA runtime cannot list devices: {st.error}")
        return r
    if st.device_count <= 0:
        r.append("no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
        return r
    if index >= st.device_count:
        r.append(f"cuda:{index} does not exist ({st.device_count} device(s) visible)")
        return r
    if st.capability is not None:
        cap = st.capability
        if arch_supported(cap, st.archs) is False:
            r.append(f"cuda:{index} has compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]}), for which this "
                     f"build has no code (compiled for {describe_archs(st.archs)}); rebuild with "
                     f"BIOGEN_CUDA_ARCHS={cap[0]}{cap[1]}")
            return r
    if st.image_error:
        r.append(f"no kernel of biogen._C loads on cuda:{index}: {st.image_error}")
    return r


def triton_gpu_reasons(st: CudaStatus, index: int) -> list[str]:
    """Why Triton kernels cannot run on CUDA device ``index`` (Triton uses torch's CUDA, not ours)."""
    if st.torch_cuda:
        return [st.torch_cuda]
    if st.capability is not None and tuple(st.capability) < TRITON_MIN_CAPABILITY:
        cap, need = st.capability, TRITON_MIN_CAPABILITY
        return [f"cuda:{index} has compute capability {cap[0]}.{cap[1]}; biogen's Triton kernels need "
                f"{need[0]}.{need[1]} or newer (Ampere)"]
    return []


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
        if _C is None:
            reasons.append(_C_ERROR or "biogen._C is missing")
        elif device.type != "cuda":
            if not build_info().get("cuda"):
                reasons.append("biogen._C was built without CUDA objects (no CUDA compiler at build time)")
        else:
            reasons.extend(cuda_reasons(_cuda_device_status(device), _device_index(device)))
        if device.type != "cuda":
            reasons.append(f"tensors are on {device}, the cuda backend needs cuda tensors")
    elif backend == "triton":
        if not _triton_installed():
            reasons.append("triton is not installed")
        if device.type == "cpu" and not triton_interpret():
            reasons.append("tensors are on cpu; Triton runs on the CPU only with TRITON_INTERPRET=1")
        elif device.type == "cuda":
            reasons.extend(triton_gpu_reasons(_cuda_device_status(device), _device_index(device)))
        elif device.type != "cpu":
            reasons.append(f"triton does not support device {device}")
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return reasons


_ACCEPTED: dict = {}


def _accepted_names(fn) -> Optional[frozenset]:
    """The keyword names ``fn`` takes (None: it takes any, through ``**kwargs``); cached per function."""
    if fn not in _ACCEPTED:
        params = inspect.signature(fn).parameters.values()
        any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        _ACCEPTED[fn] = None if any_kw else frozenset(p.name for p in params)
    return _ACCEPTED[fn]


def triton_call_reasons(module: str, device: torch.device, **inputs) -> list[str]:
    """Per-call limits a Triton kernel module declares, ``biogen.ops.triton.<module>.unsupported_reasons
    (**inputs, device=...)`` (a config that cannot fit the device's shared memory, ...), for CUDA
    tensors. A module without that function adds none; one that fails is a reason, not a crash."""
    if device.type != "cuda":
        return []
    try:
        fn = getattr(triton_kernel(module), "unsupported_reasons", None)
        if fn is None:
            return []
        names = _accepted_names(fn)
        kwargs = inputs if names is None else {k: v for k, v in inputs.items() if k in names}
        return list(fn(**kwargs, device=device))
    except Exception as exc:  # noqa: BLE001 - selection must fall back, never crash
        return [f"biogen.ops.triton.{module}.unsupported_reasons failed: {type(exc).__name__}: {exc}"]


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a block: the extension's launchers and Triton launch on
    the current device, which need not be the tensors' (``cuda:1``). A no-op for CPU tensors."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


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
    availability comes from :func:`backend_reasons`, and a Triton kernel module's own per-call limits
    from :func:`triton_call_reasons` (``triton_module``). ``gpu_order`` is the auto order on a GPU.
    """

    name: str
    gpu_order: tuple[str, ...] = DEFAULT_GPU_ORDER
    triton_module: Optional[str] = None
    reasons: dict[str, Reasons] = field(default_factory=dict)

    def __post_init__(self):
        bad = [b for b in self.gpu_order if b not in BACKENDS]
        if bad or not self.gpu_order or self.gpu_order[-1] != "torch":
            raise ValueError(f"{self.name}: gpu_order {self.gpu_order!r} must name backends of {BACKENDS} and "
                             "end with 'torch' (the fallback that always runs)")

    def auto_order(self, device: torch.device) -> tuple[str, ...]:
        return self.gpu_order if device.type == "cuda" else CPU_ORDER

    def not_supported_reasons(self, backend: str, device: torch.device, **inputs) -> list[str]:
        out = backend_reasons(backend, device)
        if backend not in self.reasons:
            out.append(f"{self.name} has no {backend} implementation")
        elif not out:
            out.extend(self.reasons[backend](**inputs))
            if backend == "triton" and not out and self.triton_module:
                out.extend(triton_call_reasons(self.triton_module, device, **inputs))
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
        for b in self.auto_order(device):
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
