"""What every Triton launcher shares: the target's limits, the matmul precision, config plans, and
one launch entry point that the ahead-of-time compile tests can intercept.

A launcher computes a *plan* (pure Python: block sizes, warps, stages chosen from the dtype, the
shapes and the architecture's shared memory per block) and then launches. The same plan answers
``unsupported_reasons`` (nothing fits) and is what ``tests/gpu_compile`` compiles for sm_80 / sm_90
without a GPU: under :func:`recording` the launchers run on ``meta`` tensors, every launch is
recorded instead of executed (see :class:`Launch`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._runtime import KERNEL_FLOATS as FLOATS, MAX_HEAD_DIM, dtype_head_dim_reasons

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
SMEM_PER_BLOCK = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                  100: 232448, 103: 232448, 120: 101376}
# Shared memory of a kernel without tl.dot: the scratch of its row reductions (an upper bound).
REDUCTION_SMEM = 4096
# Hardware limit of grid dimensions y and z; x goes to 2^31 - 1, so launchers flatten onto x.
GRID_X_MAX = 2**31 - 1


@dataclass(frozen=True)
class Arch:
    """What a plan needs to know about the target: compute capability (0 = the CPU interpreter)
    and the shared memory one block may use, in bytes."""

    capability: int
    smem_per_block: int

    @property
    def interpreter(self) -> bool:
        return self.capability == 0

    def __str__(self) -> str:
        if self.interpreter:
            return "the Triton interpreter"
        return f"sm_{self.capability} ({self.smem_per_block} B shared memory per block)"


INTERPRETER = Arch(0, 1 << 30)
SM80 = Arch(80, SMEM_PER_BLOCK[80])
SM90 = Arch(90, SMEM_PER_BLOCK[90])


def arch_of(device: Any) -> Arch:
    """``device``: an :class:`Arch`, a compute capability (``90`` or ``(9, 0)``), a torch device or
    its name. A CUDA device is asked for its capability and opt-in shared memory."""
    if isinstance(device, Arch):
        return device
    if isinstance(device, int):
        return Arch(device, SMEM_PER_BLOCK.get(device, 101376))
    if isinstance(device, tuple):
        return arch_of(device[0] * 10 + device[1])
    rec = _RECORDER.get()
    if rec is not None:
        return rec.arch
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return INTERPRETER
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return Arch(cap, int(smem) or SMEM_PER_BLOCK.get(cap, 101376))


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


input_reasons = dtype_head_dim_reasons  # what the attention kernels cannot take at all, whatever the GPU


# ----------------------------------------------------------------------------- matmul precision


def dot_precision(dtype: torch.dtype, arch: Arch) -> str:
    """``input_precision`` of every ``tl.dot`` for inputs of ``dtype``.

    float16 / bfloat16 operands go to the tensor cores as they are (fp32 accumulation). float32 runs
    as TF32 only when the user allowed TF32 matmuls in torch (``torch.backends.cuda.matmul.allow_tf32``
    or ``torch.set_float32_matmul_precision('high'/'medium')``); otherwise 3xTF32 ("tf32x3"), which
    is tensor-core work with float32 accuracy. "f32" is the interpreter's bfloat16 path: its numpy
    ``tl.dot`` misreads bfloat16, so operands are widened after rounding (same maths as the GPU).
    """
    if dtype == torch.float32:
        allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return "tf32" if allowed else "tf32x3"
    if dtype == torch.bfloat16 and arch.interpreter:
        return "f32"
    return "tf32"  # ignored by tl.dot for 16-bit operands


def operand_dtype(dtype: torch.dtype):
    """The tensor-core operand type for inputs of ``dtype`` (features and states are rounded to it,
    as torch.autocast rounds a matmul's operands)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


@triton.jit
def round_bf16(x):
    """float32 -> bfloat16 -> float32 with round-to-nearest-even, as a GPU cast does: the
    interpreter's cast truncates (twice the rounding error)."""
    bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mma(a, b, PREC: tl.constexpr, OPDT: tl.constexpr):
    """a @ b on the tensor cores: operands rounded to OPDT, float32 accumulation."""
    if PREC == "f32":
        c = tl.dot(round_bf16(a), round_bf16(b), input_precision="ieee")
    else:
        c = tl.dot(a.to(OPDT), b.to(OPDT), input_precision=PREC)
    return c


# ----------------------------------------------------------------------------- configs and plans


@dataclass(frozen=True)
class Config:
    """One launch configuration: block-size constexprs, warps, pipeline stages."""

    blocks: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @staticmethod
    def of(num_warps: int, num_stages: int, **blocks: int) -> "Config":
        return Config(tuple(sorted(blocks.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.blocks)[name]

    def meta(self) -> dict:
        return dict(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.blocks) + f",w{self.num_warps},s{self.num_stages}"


@dataclass
class KernelPlan:
    """The candidate configs of one kernel for one call, best first, each with its estimated shared
    memory; ``chosen`` is the first that fits the architecture (None: nothing fits)."""

    kernel: str
    arch: Arch
    candidates: list[tuple[Config, int]]

    @property
    def fitting(self) -> list[Config]:
        return [c for c, smem in self.candidates if smem <= self.arch.smem_per_block]

    @property
    def chosen(self) -> Optional[Config]:
        f = self.fitting
        return f[0] if f else None

    def reason(self) -> Optional[str]:
        if self.chosen is not None:
            return None
        least = min(s for _, s in self.candidates)
        return (f"{self.kernel}: no launch configuration fits {self.arch} "
                f"(the smallest needs about {least} B)")

    def require(self) -> Config:
        if self.chosen is None:
            raise RuntimeError(self.reason())
        return self.chosen


def plan(kernel: str, arch: Arch, configs: Sequence[Config], smem: Callable[[Config], int]) -> KernelPlan:
    return KernelPlan(kernel, arch, [(c, int(smem(c))) for c in configs])


def dot_smem(m: int, n: int, k: int, a_bytes: int, b_bytes: int, stages: int = 1) -> int:
    """Shared memory a ``tl.dot`` of (m x k) @ (k x n) stages its operands in (upper bound used by
    the plans: both operands, once per pipeline stage)."""
    return (m * k * a_bytes + k * n * b_bytes) * max(1, stages)


def elem_bytes(opdt) -> int:
    return 4 if opdt == tl.float32 else 2


# ----------------------------------------------------------------------------- launches


@dataclass
class Launch:
    """A launch the launchers would have made: the kernel, its arguments, constexprs, the chosen
    config and the kernel's other candidate configs (the compile tests build every one)."""

    kernel: Any
    grid: tuple
    args: tuple
    consts: dict
    config: Config
    plan: KernelPlan

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__


@dataclass
class _Recorder:
    arch: Arch
    launches: list = field(default_factory=list)


_RECORDER: contextvars.ContextVar[Optional[_Recorder]] = contextvars.ContextVar("biogen_triton_recorder",
                                                                                default=None)


@contextlib.contextmanager
def recording(arch: Arch) -> Iterator[list]:
    """Inside the block, launchers plan for ``arch`` and record their launches instead of running
    them (call them with ``meta`` tensors). Yields the list of :class:`Launch`."""
    rec = _Recorder(arch)
    token = _RECORDER.set(rec)
    try:
        yield rec.launches
    finally:
        _RECORDER.reset(token)


def check_grid(grid: tuple) -> tuple:
    if grid[0] > GRID_X_MAX or any(g > 65535 for g in grid[1:]):
        raise RuntimeError(f"grid {grid} exceeds the CUDA grid limits")
    return grid


def launch(kernel, grid: tuple, args: tuple, consts: dict, kplan: KernelPlan, config: Optional[Config] = None):
    """Run ``kernel[grid](*args, **consts, **config)``, or record it under :func:`recording`."""
    config = config or kplan.require()
    grid = check_grid(tuple(int(g) for g in grid))
    rec = _RECORDER.get()
    if rec is not None:
        rec.launches.append(Launch(kernel, grid, tuple(args), dict(consts), config, kplan))
        return
    if 0 in grid:
        return
    kernel[grid](*args, **consts, **config.meta())


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
