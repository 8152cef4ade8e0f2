"""``biogen selfcheck``: run every op on every backend available here against the reference.

Small random inputs, forward and backward; prints one row per (op, backend) with the largest
absolute error against the float64 reference and exits non-zero if any exceeds its tolerance.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

from .ops import _runtime


@dataclass
class CheckResult:
    op: str
    backend: str
    device: str
    fwd_err: float
    bwd_err: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.fwd_err <= self.tol and self.bwd_err <= self.tol


def _max_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_err(x, y) for x, y in zip(a, b))
    return float((a.detach().double() - b.detach().double()).abs().max())


def _check_masked_attention(backend: str, device: torch.device) -> tuple[float, float]:
    from .ops import masked_gene_attention
    from .ops.reference import masked_gene_attention_ref

    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 37, 24
    q, k, v = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.rand(B, L, generator=g) < 0.2
    known = torch.rand(B, L, generator=g) < 0.6
    ref_args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, _ = masked_gene_attention_ref(*ref_args, pad, known)
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_args, gout)
    args = [t.float().to(device).requires_grad_(True) for t in (q, k, v)]
    out = masked_gene_attention(*args, key_padding_mask=pad.to(device), known=known.to(device), backend=backend)
    grads = torch.autograd.grad(out, args, gout.float().to(device))
    return _max_err(out.cpu(), ref), _max_err([g_.cpu() for g_ in grads], ref_grads)


def _check_group_norm_silu(backend: str, device: torch.device) -> tuple[float, float]:
    from .ops import group_norm_silu

    g = torch.Generator().manual_seed(0)
    B, C, G, H, W = 2, 12, 4, 5, 7
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w, b = torch.randn(C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    sc, sh = (0.5 * torch.randn(B, C, generator=g, dtype=torch.float64) for _ in range(2))
    ref_args = [t.clone().requires_grad_(True) for t in (x, w, b, sc, sh)]
    xr, wr, br, scr, shr = ref_args
    ref = torch.nn.functional.silu(
        torch.nn.functional.group_norm(xr, G, wr, br) * (1 + scr[..., None, None]) + shr[..., None, None])
    gout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_args, gout)
    args = [t.float().to(device).requires_grad_(True) for t in (x, w, b, sc, sh)]
    out = group_norm_silu(args[0], G, args[1], args[2], scale=args[3], shift=args[4], backend=backend)
    grads = torch.autograd.grad(out, args, gout.float().to(device))
    return _max_err(out.cpu(), ref), _max_err([g_.cpu() for g_ in grads], ref_grads)


def _check_sampler_step(backend: str, device: torch.device) -> tuple[float, float]:
    """Forward only (the op has no backward): DDIM with guidance and dynamic thresholding."""
    from .ops import sampler_step
    from .ops.reference import sampler_step_ref

    g = torch.Generator().manual_seed(0)
    x, m, mu, nz = (torch.randn(3, 4, 9, 9, generator=g, dtype=torch.float64) for _ in range(4))
    abar = torch.rand(3, generator=g, dtype=torch.float64) * 0.9 + 0.05
    a, s = abar.sqrt(), (1 - abar).sqrt()
    c = {"alpha_t": a, "sigma_t": s, "c_sample": 0.1 * a, "c_x0": a, "c_eps": 0.5 * s, "c_noise": 0.2 * s}
    kw = dict(prediction_type="epsilon", guidance_scale=3.0, dynamic_threshold=0.9, sample_max_value=1.5)
    ref = sampler_step_ref(x, m, *(c[k] for k in ("alpha_t", "sigma_t", "c_sample", "c_x0", "c_eps", "c_noise")),
                           model_output_uncond=mu, noise=nz, **kw)
    f = lambda t: t.float().to(device)  # noqa: E731
    out = sampler_step(f(x), f(m), **{k: f(v) for k, v in c.items()}, model_output_uncond=f(mu), noise=f(nz),
                       backend=backend, **kw)
    return _max_err([o.cpu() for o in out], ref), 0.0


# op name -> check(backend, device) -> (forward error, backward error); tolerance for float32
CHECKS: dict[str, tuple[Callable[[str, torch.device], tuple[float, float]], float, object]] = {
    "masked_gene_attention": (_check_masked_attention, 1e-4, "biogen.ops.masked_attention:OP"),
    "group_norm_silu": (_check_group_norm_silu, 1e-4, "biogen.ops.group_norm:OP"),
    "sampler_step": (_check_sampler_step, 1e-4, "biogen.ops.sampler:OP"),
}


def _op(path: str):
    import importlib

    mod, attr = path.split(":")
    return getattr(importlib.import_module(mod), attr)


def run_selfcheck() -> list[CheckResult]:
    results = []
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name, (fn, tol, op_path) in CHECKS.items():
        op = _op(op_path)
        for device in devices:
            for backend in _runtime.BACKENDS:
                if op.not_supported_reasons(backend, device, dtype=torch.float32, head_dim=24):
                    continue
                fe, be = fn(backend, device)
                results.append(CheckResult(name, backend, device.type, fe, be, tol))
    return results


def _cmd(args: argparse.Namespace) -> int:
    from ._info import format_info, info

    print(format_info(info()))
    print()
    results = run_selfcheck()
    print(f"{'op':28s} {'backend':8s} {'device':6s} {'fwd max err':>12s} {'bwd max err':>12s}  result")
    for r in results:
        print(f"{r.op:28s} {r.backend:8s} {r.device:6s} {r.fwd_err:12.2e} {r.bwd_err:12.2e}  "
              f"{'ok' if r.ok else 'FAIL (tolerance %.0e)' % r.tol}")
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "selfcheck",
        help="check every kernel on every available backend against the reference",
        description="Print what was built, then run each op forward and backward on small random "
        "inputs with every backend available on this machine and compare with the float64 "
        "PyTorch reference. Exit code 1 if any result is outside its tolerance.",
    )
    p.set_defaults(func=_cmd)
