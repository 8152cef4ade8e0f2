"""``biogen.info()`` / ``biogen info``: what was built and what can run here."""

from __future__ import annotations

import platform

import torch

from ._version import __version__


def info() -> dict:
    """Version, what the extension was compiled with, and each backend's availability.

    ``backends[device][name]`` is a list of reasons the backend cannot run on that device (empty:
    available); ``cuda`` is always listed, so a machine without a usable GPU says why.
    """
    import dataclasses

    from .ops import _runtime, group_norm, masked_attention, performer, sampler

    cuda = torch.device("cuda")
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "build": _runtime.build_info(),
        "cuda_status": dataclasses.asdict(_runtime._cuda_device_status(cuda)),
        "backends": {d: _runtime.available_backends(d) for d in ("cpu", "cuda")},
        "gpu_order": {m.OP.name: list(m.OP.gpu_order) for m in (masked_attention, performer, group_norm, sampler)},
        "cuda_reason": None if torch.cuda.is_available() else "torch.cuda.is_available() is False",
    }


def _cuda_status_line(st: dict) -> str:
    if not st["compiled"]:
        return ""
    drv = ("no driver" if st["driver_version"] <= 0 else
           f"driver supports CUDA {st['driver_version'] // 1000}.{st['driver_version'] % 1000 // 10}")
    dev = f"{st['device_count']} device(s)"
    if st["capability"]:
        dev += f"; cuda:0 is sm_{st['capability'][0]}{st['capability'][1]}"
    return f"  CUDA at run time: {drv}; {dev}" + (f" ({st['error']})" if st["error"] else "")


def format_info(d: dict) -> str:
    from .ops._runtime import describe_archs

    b = d["build"]
    lines = [f"biogen {d['version']}  (python {d['python']}, torch {d['torch']})"]
    if "error" in b:
        lines.append(f"extension: NOT AVAILABLE: {b['error']}")
    else:
        lines += [
            f"extension: compiled with {b['compiler']}",
            f"  CPU SIMD levels compiled: {b['cpu_capabilities_compiled']}; "
            f"this CPU supports {b['cpu_capability_hardware']}; in use: {b['cpu_capability']}",
            f"  OpenMP: {'yes' if b['openmp'] else 'no'} (max threads {b['openmp_max_threads']}; "
            f"kernels use torch.get_num_threads() = {d['torch_threads']})",
            "  CUDA: "
            + (
                f"compiled for {describe_archs(b['cuda_archs'])} with CUDA {b['cuda_version']}; "
                f"{b['cuda_device_count']} device(s) visible"
                + (f" ({b['cuda_runtime_error']})" if b["cuda_runtime_error"] else "")
                if b["cuda"]
                else "not compiled (" + b["cuda_runtime_error"] + ")"
            ),
        ]
        if _cuda_status_line(d["cuda_status"]):
            lines.append(_cuda_status_line(d["cuda_status"]))
    if d["cuda_reason"]:
        lines.append(f"GPU: none usable ({d['cuda_reason']})")
    lines.append("auto order on a GPU: " + "; ".join(f"{op} {' > '.join(o)}" for op, o in d["gpu_order"].items()))
    for dev, backends in d["backends"].items():
        lines.append(f"backends for {dev} tensors:")
        for name, reasons in backends.items():
            lines.append(f"  {name:7s} " + ("available" if not reasons else "unavailable: " + "; ".join(reasons)))
    return "\n".join(lines)
