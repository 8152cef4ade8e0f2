"""Compile a recorded Triton launch for a GPU target without a GPU, and read what ptxas made of it.

Run it in a process where TRITON_INTERPRET is unset (``runner.py``): under the interpreter flag
``@triton.jit`` gives interpreter functions and Triton's code generation misbehaves.

The launch is bound and specialised exactly as ``kernel[grid](...)`` would on that GPU (Triton's own
binder: integer arguments equal to 1 become constants, pointers and multiples of 16 get their
divisibility), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the
whole pipeline down to a cubin. ptxas's ``-v`` report gives registers, spill stores and loads and
the stack frame; the PTX gives the tensor-core instructions.

Results are cached on disk (``BIOGEN_GPU_COMPILE_CACHE``, default ``~/.cache/biogen/gpu_compile``),
keyed by the kernel's source hash (with the functions it calls), the specialised signature, the
constants, the options, the target and the Triton version: a changed kernel recompiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from biogen.ops.triton._common import Arch, Config, Launch  # noqa: E402

CACHE = Path(os.environ.get("BIOGEN_GPU_COMPILE_CACHE", Path.home() / ".cache" / "biogen" / "gpu_compile"))


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: str
    shared: int  # bytes of shared memory per block (Triton's allocation)
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    stack: int  # bytes of stack frame per thread
    mma_sync: int  # tensor-core instructions in the PTX
    wgmma: int

    @property
    def tensor_core(self) -> bool:
        return self.mma_sync + self.wgmma > 0

    @property
    def spills(self) -> int:
        return max(self.spill_stores, self.spill_loads)


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _fake(arg):
    """Meta tensors carry dtype and strides but no address: present them as 16-byte aligned
    pointers, which is what the caching allocator hands out on a GPU."""
    import torch

    if isinstance(arg, torch.Tensor):
        return triton.runtime.jit.MockTensor(arg.dtype, list(arg.shape))
    return arg


def bind(launch: Launch, arch: Arch, config: Config):
    """(signature, constexprs, attrs, options) as the JIT would compile them for ``arch``."""
    target = GPUTarget("cuda", arch.capability, 32)
    backend = make_backend(target)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.consts, **config.meta())
    bound, specialization, options = binder(*(_fake(a) for a in launch.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def compile_launch(launch: Launch, arch: Arch, config: Config | None = None) -> Compiled:
    config = config or launch.config
    target, signature, constexprs, attrs, options = bind(launch, arch, config)
    fn = launch.kernel
    key = hashlib.sha256(repr((fn.cache_key, sorted(signature.items()), sorted(map(repr, constexprs.items())),
                               sorted(map(repr, attrs.items())), options.hash(), arch.capability,
                               triton.__version__)).encode()).hexdigest()
    path = CACHE / f"{key}.json"
    if path.exists():
        return Compiled(**json.loads(path.read_text()))
    log = io.StringIO()
    old_dump, old_always = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # ptxas must run to report
    old_interp = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # code generation differs under the interpreter flag
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old_dump, old_always
        if old_interp is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old_interp
    report = log.getvalue()
    stack, stores, loads = (int(x) for x in _PTXAS.search(report).groups())
    ptx = k.asm["ptx"]
    res = Compiled(fn.__name__, arch.capability, str(config), int(k.metadata.shared),
                   int(_REGS.search(report).group(1)), stores, loads, stack,
                   len(re.findall(r"\bmma\.sync\b", ptx)), len(re.findall(r"\bwgmma\.mma_async\b", ptx)))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(res)))
    tmp.replace(path)
    return res
