"""``python -m biogen.gpucheck --out DIR`` / ``biogen gpucheck``: the one-shot GPU acceptance run.

Sized for a 10-minute window on one H100 / H200; it builds nothing. In order:

1. preflight: what was built, and why a backend is unavailable on this GPU (an unavailable
   ``cuda`` or ``triton`` backend on a GPU is a failure: their tests would only skip);
2. the CUDA and Triton tests of ``tests/ops`` (pytest ``-k "cuda or triton"``, in a subprocess,
   run from the repository checkout: ``--repo``, default the checkout this module was imported
   from, else the current folder; the tests import the same biogen as this command), each case's
   outcome in the report;
3. benchmarks at the model shapes (SPEC.md), each checked against the baseline's numbers before it
   is timed: masked gene attention (scGPT: B 8, H 8, L 1200 / 3001, D 64, generative mask) vs
   ``F.scaled_dot_product_attention`` with the dense boolean mask and vs FlexAttention with the same
   mask_mod; FAVOR+ (scBERT: L 16,907, H 10, D 64, m 266) vs performer-pytorch ``FastAttention``;
   group_norm_silu at UNet shapes vs ``F.group_norm`` + ``F.silu``; one scGPT (generative objective)
   and one scBERT training step vs the same model on the torch reference backend. Timings: CUDA
   events, the median over interleaved rounds; achieved TFLOP/s (GB/s for group_norm), ratios to
   each baseline, peak memory (``torch.cuda.max_memory_allocated`` above the inputs).

Writes ``DIR/report.md`` and ``DIR/report.json``; exit code 1 on any failed test, correctness
failure or error of a biogen kernel, else 0. ``--device cpu --smoke`` runs the same machinery at tiny
shapes on the CPU (the ``cpu`` backend against the same baselines), which is how CI tests it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

DEFAULT_TESTS_K = "cuda or triton"
# The smoke run's pytest selection: a few seconds of CPU kernel tests, to exercise the machinery.
SMOKE_TESTS = ("tests/ops/test_runtime_dispatch.py", "-k", "device_guard")


class GpuCheckError(Exception):
    """A usage error: one line, exit code 2."""


@dataclass
class Report:
    device: str
    smoke: bool
    env: dict = field(default_factory=dict)
    tests: dict = field(default_factory=dict)
    benchmarks: list = field(default_factory=list)
    correctness: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {"schema": 1, "ok": self.ok, "device": self.device, "smoke": self.smoke, "env": self.env,
                "tests": self.tests, "benchmarks": self.benchmarks, "correctness": self.correctness,
                "failures": self.failures, "notes": self.notes, "elapsed_s": round(self.elapsed_s, 1)}


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(fns: dict, rounds: int, device: torch.device) -> dict:
    """Median seconds per call of each function, measured in interleaved rounds (every function once
    per round, the order rotated), so clock and thermal drift hit all of them alike."""
    names = list(fns)
    for n in names:  # warm-up: compilation, autotuning, allocator
        fns[n]()
    _sync(device)
    samples: dict = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            samples[n].append(_time_once(fns[n], device))
    return {n: sorted(s)[len(s) // 2] for n, s in samples.items()}


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory of one call above what was allocated before it (None on the CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _max_err(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max().cpu()) if a.numel() else 0.0


# ----------------------------------------------------------------------------- benchmark cases


@dataclass
class Case:
    """One benchmark: implementations (the first is biogen's) that each return outputs to compare."""

    name: str
    shape: dict
    impls: dict  # name -> callable returning a tuple of tensors (run = forward [+ backward])
    truth: Callable[[], tuple]  # float64 outputs, for the 2x rule
    work: float = 0.0  # useful FLOP (or bytes when unit is GB/s) per call
    unit: str = "TFLOP/s"
    atol: float = 1e-5  # relative to the largest value of each float64 output
    check_impls: Optional[dict] = None  # what the check runs, if not impls (e.g. also collecting gradients)


def _grads(out, inputs, gout):
    for t in inputs:
        t.grad = None
    out.backward(gout)
    return tuple(t.grad for t in inputs)


def _leafs(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def masked_attention_cases(device, smoke: bool, train: bool) -> list:
    from .ops import masked_gene_attention

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shapes = [(2, 2, 64, 16)] if smoke else [(8, 8, 1200, 64), (8, 8, 3001, 64)]
    cases = []
    for B, H, L, D in shapes:
        g = torch.Generator().manual_seed(L)
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        pad = torch.arange(L)[None] >= lengths[:, None]
        known = torch.rand(B, L, generator=g) < 0.5
        known[:, 0] = True  # <cls>
        q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
        gout = torch.randn(B, H, L, D, generator=g).masked_fill(pad[:, None, :, None], 0)
        pad, known, gout = pad.to(device), known.to(device), gout.to(device, dtype)
        allowed = ~pad[:, None, :] & (known[:, None, :] | torch.eye(L, dtype=torch.bool, device=device))
        dense = allowed[:, None]  # (B, 1, L, L), True = attend
        valid_q = ~pad[:, None, :, None]
        keys = allowed.sum(-1).masked_fill(pad, 0).sum() * H  # allowed (query, key) pairs of valid queries
        flop = 4.0 * D * float(keys) * (3.5 if train else 1.0)  # backward = 2.5x forward (FlashAttention count)
        lowp = _leafs(*(t.to(device, dtype) for t in (q, k, v)))

        def run(attn, inputs, valid_q=valid_q, gout=gout):
            with contextlib.nullcontext() if train else torch.no_grad():  # flex: no grad-requiring input
                out = attn(*(inputs if train else [t.detach() for t in inputs])) * valid_q  # padded rows: biogen 0
            return (out.detach(), *_grads(out, inputs, gout)) if train else (out,)

        def ours(*x, pad=pad, known=known):
            return masked_gene_attention(*x, key_padding_mask=pad, known=known)

        def sdpa(*x, dense=dense):
            return F.scaled_dot_product_attention(*x, attn_mask=dense)

        impls = {"biogen": lambda f=ours, i=lowp: run(f, i), "sdpa_dense_mask": lambda f=sdpa, i=lowp: run(f, i)}
        flex = _flex(device, pad, known, B, L)
        if flex is not None:
            impls["flex_attention"] = lambda f=flex, i=lowp: run(f, i)
        exact = _leafs(*(t.to(device, torch.float64) for t in (q, k, v)))
        truth = lambda f=sdpa, i=exact, gout=gout: run(f, i, gout=gout.double())  # noqa: E731
        name = f"masked_gene_attention {'fwd+bwd' if train else 'fwd'}"
        cases.append(Case(name, dict(B=B, H=H, L=L, D=D, dtype=str(dtype)[6:], mean_len=float(lengths.float().mean()),
                                     known=0.5), impls, truth, flop))
    return cases


def _flex(device, pad, known, B, L):
    """FlexAttention with scGPT's mask as a mask_mod (compiled on a GPU, eager on the CPU)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        return ~pad[b, kv_idx] & (known[b, kv_idx] | (q_idx == kv_idx))

    block_mask = create_block_mask(mask_mod, B, None, L, L, device=str(device))
    fn = torch.compile(flex_attention) if device.type == "cuda" else flex_attention

    def call(q, k, v):
        with warnings.catch_warnings():  # eager on the CPU warns that it is unfused: known, it is a smoke run
            warnings.simplefilter("ignore", UserWarning)
            return fn(q, k, v, block_mask=block_mask)

    return call


def performer_cases(device, smoke: bool, train: bool) -> list:
    from .ops import gaussian_orthogonal_random_matrix, performer_attention

    try:
        from performer_pytorch import FastAttention
    except ImportError:
        FastAttention = None
    B, H, L, D, m = (1, 2, 128, 16, 24) if smoke else (1, 10, 16907, 64, 266)
    cases = []
    for dtype in ([torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
        gout = torch.randn(B, H, L, D, generator=g).to(device, dtype)
        w = gaussian_orthogonal_random_matrix(m, D, generator=g, device=device)
        lowp = _leafs(*(t.to(device, dtype) for t in (q, k, v)))
        exact = _leafs(*(t.to(device, torch.float64) for t in (q, k, v)))

        def run(attn, inputs, gout=gout):
            with contextlib.nullcontext() if train else torch.no_grad():
                out = attn(*inputs)
            return (out.detach(), *_grads(out, inputs, gout.to(out.dtype))) if train else (out,)

        def ours(q, k, v, w=w):
            return performer_attention(q, k, v, w)

        def reference(q, k, v, w=w.double()):
            return performer_attention(q, k, v, w, backend="torch")

        impls = {"biogen": lambda i=lowp: run(ours, i)}
        if FastAttention is not None:
            fast = FastAttention(dim_heads=D, nb_features=m, causal=False).to(device)
            fast.projection_matrix.copy_(w)
            fast = fast if dtype == torch.float32 else copy.deepcopy(fast).to(dtype)
            impls["performer_pytorch"] = lambda f=fast, i=lowp: run(f, i)
        flop = 8.0 * B * H * L * m * D * (3.0 if train else 1.0)  # 4 products of L x m x D; backward 2x
        cases.append(Case(f"performer_attention {'fwd+bwd' if train else 'fwd'}",
                          dict(B=B, H=H, L=L, D=D, m=m, dtype=str(dtype)[6:]), impls,
                          lambda i=exact: run(reference, i), flop))
    return cases


def group_norm_cases(device, smoke: bool, train: bool) -> list:
    from .ops import group_norm_silu

    shapes = [(2, 32, 8, 8, 8)] if smoke else [(16, 128, 64, 64, 32), (16, 256, 32, 32, 32), (16, 512, 16, 16, 32)]
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    cases = []
    for (B, C, Hh, W, G), dtype in ((s, d) for s in shapes for d in dtypes):
        g = torch.Generator().manual_seed(C)
        x = torch.randn(B, C, Hh, W, generator=g)
        wt, bs = 1 + 0.1 * torch.randn(C, generator=g), 0.1 * torch.randn(C, generator=g)
        gout = torch.randn(B, C, Hh, W, generator=g).to(device, dtype)
        lowp = _leafs(x.to(device, dtype), wt.to(device, dtype), bs.to(device, dtype))
        exact = _leafs(x.to(device, torch.float64), wt.to(device, torch.float64), bs.to(device, torch.float64))

        def run(fn, inputs, gout=gout, G=G):
            with contextlib.nullcontext() if train else torch.no_grad():
                out = fn(inputs[0], G, inputs[1], inputs[2])
            return (out.detach(), *_grads(out, inputs, gout.to(out.dtype))) if train else (out,)

        def torch_gn(x, G, w, b):
            return F.silu(F.group_norm(x, G, w, b))

        impls = {"biogen": lambda i=lowp: run(group_norm_silu, i), "torch_group_norm_silu": lambda i=lowp: run(torch_gn, i)}
        traffic = x.numel() * torch.finfo(dtype).bits / 8 * (5 if train else 2)  # x + y; + x, dy, dx
        cases.append(Case(f"group_norm_silu {'fwd+bwd' if train else 'fwd'}",
                          dict(B=B, C=C, H=Hh, W=W, G=G, dtype=str(dtype)[6:]), impls,
                          lambda i=exact: run(torch_gn, i), traffic, unit="GB/s"))
    return cases


def _train_step(model, loss_fn, backend: str, autocast: bool, collect: bool):
    """One forward + loss + backward (no optimizer step); with ``collect``, (loss, all gradients)."""
    from .ops import use_backend

    with use_backend(backend):
        model.zero_grad(set_to_none=True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with amp:
            loss = loss_fn(model)
        loss.backward()
    if not collect:
        return ()
    grads = [p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None]
    return loss.detach().double().reshape(1), torch.cat(grads)


def _step_case(name, shape, model, loss_fn, to64, device) -> Case:
    """biogen's auto backends vs the torch reference backend on the same model (bf16 autocast on a
    GPU), checked against a float64 copy of the model on the reference backend."""
    amp = device.type == "cuda"
    shape = dict(shape, amp="bf16" if amp else "none")
    model64 = copy.deepcopy(model).double()
    impls = {"biogen": lambda: _train_step(model, loss_fn, "auto", amp, False),
             "biogen_torch_reference": lambda: _train_step(model, loss_fn, "torch", amp, False)}
    checks = {"biogen": lambda: _train_step(model, loss_fn, "auto", amp, True),
              "biogen_torch_reference": lambda: _train_step(model, loss_fn, "torch", amp, True)}
    truth = lambda: _train_step(model64, lambda m: loss_fn(m, to64), "torch", False, True)  # noqa: E731
    return Case(name, shape, impls, truth, check_impls=checks, atol=1e-4)


def training_step_cases(device, smoke: bool) -> list:
    """One training step of scGPT (generative objective: masked gene attention with unknown genes)
    and of scBERT (MLM logits of every position, cross-entropy)."""
    from .models.scbert_module import ScBERTConfig, ScBERTModel
    from .models.scgpt_module import ScGPTConfig, ScGPTModel

    preset = "tiny" if smoke else "paper"
    B, L = (2, 64) if smoke else (8, 1200)
    cfg = ScGPTConfig.preset(preset, dropout=0.0, max_seq_len=L)
    n_tokens = 100 if smoke else 30000
    torch.manual_seed(0)
    model = ScGPTModel(cfg, n_tokens, 0).to(device)
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    ids = torch.randint(3, n_tokens, (B, L), generator=g).masked_fill(pad, 0)
    ids[:, 0] = 1
    vals = torch.randint(0, cfg.n_bins, (B, L), generator=g).float().masked_fill(pad, cfg.pad_value)
    unknown = (torch.rand(B, L, generator=g) < cfg.mask_ratio) & ~pad
    unknown[:, 0] = False
    batch = {k: t.to(device) for k, t in dict(gene_ids=ids, values=vals, target_values=vals.clamp_min(0),
                                              padding_mask=pad, mlm_mask=unknown, known=~unknown).items()}
    batch64 = {k: t.double() if t.is_floating_point() else t for k, t in batch.items()}

    def scgpt_loss(m, b=batch):
        return m.loss(b, "generative")["loss"]

    cases = [_step_case("scgpt train step (generative)", dict(B=B, L=L, preset=preset), model, scgpt_loss,
                        batch64, device)]
    n_genes = 127 if smoke else 16906
    cfg = replace(ScBERTConfig.preset(preset), redraw_interval=None)
    torch.manual_seed(0)
    bert = ScBERTModel(cfg, n_genes).to(device)
    x = torch.randint(0, cfg.n_tokens, (1, n_genes + 1), generator=g).to(device)
    target = torch.randint(0, cfg.n_tokens - 1, (1, n_genes + 1), generator=g).to(device)

    def scbert_loss(m, _unused=None):
        logits = m.mlm_head(m.encode(x)).flatten(0, 1)
        return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), target.reshape(-1))

    cases.append(_step_case("scbert train step (MLM logits)", dict(B=1, L=n_genes + 1, preset=preset), bert,
                            scbert_loss, None, device))
    return cases


# ----------------------------------------------------------------------------- running a case


def _rel_err(a, t) -> float:
    return _max_err(a, t) / max(float(t.detach().abs().max().cpu()), 1e-30) if t.numel() else 0.0


def check_case(case: Case) -> dict:
    """FlashAttention's 2x rule on each output, as errors relative to the float64 truth's largest
    value: biogen's error at most twice the worst baseline's plus ``atol``. A baseline that raises
    is reported and left out; biogen raising is a failure."""
    outs, errors = {}, {}
    for name, fn in (case.check_impls or case.impls).items():
        try:
            outs[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            errors[name] = f"{type(exc).__name__}: {exc}"
    row = dict(name=case.name, shape=case.shape, errors=errors)
    if "biogen" not in outs:
        return dict(row, ok=False, detail=f"biogen raised {errors.get('biogen')}")
    truth = case.truth()
    err = max(_rel_err(a, t) for a, t in zip(outs["biogen"], truth))
    base = {n: max(_rel_err(a, t) for a, t in zip(o, truth)) for n, o in outs.items() if n != "biogen"}
    tol = 2 * max(base.values(), default=0.0) + case.atol
    ok = math.isfinite(err) and err <= tol
    return dict(row, ok=ok, max_rel_err=err, baseline_rel_err=base, tol=tol,
                detail=f"error vs float64 {err:.3e} (relative to the largest value), tolerance {tol:.3e} "
                       f"(2 x worst baseline + {case.atol})")


def bench_case(case: Case, rounds: int, device: torch.device, failed: set) -> list:
    fns = {n: f for n, f in case.impls.items() if n not in failed}
    med = time_interleaved(fns, rounds, device)
    rows = []
    for name, sec in med.items():
        row = dict(name=case.name, impl=name, shape=case.shape, median_ms=sec * 1e3,
                   peak_mem_mb=peak_extra_mb(fns[name], device))
        if case.work:
            row[case.unit] = case.work / sec / (1e12 if case.unit == "TFLOP/s" else 1e9)
        if name == "biogen":
            row["speedup_vs"] = {b: med[b] / sec for b in med if b != "biogen"}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- tests


def find_repo(start: Optional[str]) -> Path:
    """``--repo``, else the checkout this module was imported from, else the current folder."""
    if start:
        candidates = [Path(start)]
    else:  # python/biogen/gpucheck.py -> the checkout (an installed wheel lives elsewhere)
        candidates = [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in candidates:
        if (root / "tests" / "ops").is_dir():
            return root
    raise GpuCheckError(f"no tests/ops under {candidates[0]}: gpucheck runs the kernel tests from a repository "
                        "checkout; pass --repo PATH (or --no-tests)")


def run_tests(repo: Path, out: Path, args: list, timeout: float) -> dict:
    xml_path = out / "pytest-junit.xml"
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    # the tests import the biogen this process runs (a source tree or an installed wheel, with its _C)
    here = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    t0 = time.time()
    res = dict(command=cmd, cwd=str(repo), passed=0, failed=0, skipped=0, errors=0, cases=[], error=None)
    with open(out / "pytest-output.txt", "w") as log:  # streamed: a cut-short run keeps its output
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            res["returncode"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT, as Ctrl-C: pytest stops and still writes the junit report of the cases that ran
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            res["returncode"] = None
            res["error"] = f"pytest did not finish within {timeout:.0f} s: interrupted, the cases that ran are listed"
    res["duration_s"] = round(time.time() - t0, 1)
    if xml_path.exists():
        for tc in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    outcome, msg = {"failure": "failed", "error": "errors", "skipped": "skipped"}[tag], el.get(
                        "message", "")[:300]
                    break
            res[outcome] += 1
            res["cases"].append(dict(id=f"{tc.get('classname')}::{tc.get('name')}", outcome=outcome,
                                     duration_s=float(tc.get("time", 0)), message=msg))
    elif res["error"] is None:
        res["error"] = f"pytest wrote no report (exit code {res.get('returncode')}); see pytest-output.txt"
    if res["error"] is None and res.get("returncode") not in (0, 1):
        res["error"] = f"pytest exit code {res['returncode']} (5: no test selected); see pytest-output.txt"
    return res


# ----------------------------------------------------------------------------- the run


def preflight(device: torch.device, report: Report) -> None:
    from ._info import info
    from .ops import _runtime

    report.env = info()
    if device.type == "cuda":
        report.env["gpu"] = torch.cuda.get_device_name(device)
        for b in ("cuda", "triton"):
            why = _runtime.backend_reasons(b, device)
            if why:
                report.failures.append(f"backend {b} is unavailable on {device}: {'; '.join(why)}")


def run(args: argparse.Namespace) -> Report:
    t0 = time.time()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GpuCheckError("--device cuda but torch.cuda.is_available() is False; use --device cpu --smoke")
    if device.type == "cpu" and not args.smoke:
        raise GpuCheckError("the full-size benchmarks need a GPU; on the CPU use --smoke")
    groups = {"masked": (masked_attention_cases, True), "performer": (performer_cases, True),
              "group_norm": (group_norm_cases, True), "train": (training_step_cases, False)}
    builders = []
    for name in args.cases.split(","):
        if name not in groups:
            raise GpuCheckError(f"unknown --cases entry {name!r}; choose from {', '.join(groups)}")
        fn, modes = groups[name]
        builders += ([lambda fn=fn, t=t: fn(device, args.smoke, t) for t in (False, True)] if modes
                     else [lambda fn=fn: fn(device, args.smoke)])
    out = Path(args.out)
    old = [n for n in ("report.md", "report.json") if (out / n).exists()]
    if old:  # never overwrite a report the user has
        raise GpuCheckError(f"{out} already holds {' and '.join(old)}; choose a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(device=str(device), smoke=args.smoke)
    preflight(device, report)
    if not args.no_tests:
        repo = find_repo(args.repo)
        if args.tests_k is not None:
            targs = ["tests/ops", "-k", args.tests_k]
        else:
            targs = list(SMOKE_TESTS) if args.smoke else ["tests/ops", "-k", DEFAULT_TESTS_K]
        report.tests = run_tests(repo, out, targs, args.test_timeout)
        if report.tests["failed"] or report.tests["errors"] or report.tests["error"]:
            report.failures.append(f"tests: {report.tests['failed']} failed, {report.tests['errors']} errors"
                                   + (f"; {report.tests['error']}" if report.tests["error"] else ""))
    for build in builders:
        if time.time() - t0 > args.budget_s:
            report.notes.append(f"time budget of {args.budget_s:.0f} s spent: later benchmarks not run")
            break
        try:
            cases = build()
        except Exception as exc:  # noqa: BLE001
            report.failures.append(f"setting up a benchmark failed: {type(exc).__name__}: {exc}")
            report.notes.append(traceback.format_exc())
            continue
        for case in cases:
            if time.time() - t0 > args.budget_s:
                report.notes.append(f"time budget spent before {case.name} {case.shape}")
                break
            check = check_case(case)
            report.correctness.append(check)
            if not check["ok"]:
                report.failures.append(f"{case.name} {case.shape}: {check['detail']}")
            try:
                report.benchmarks += bench_case(case, args.rounds, device, set(check["errors"]))
            except Exception as exc:  # noqa: BLE001
                report.failures.append(f"{case.name} {case.shape}: timing failed: {type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.elapsed_s = time.time() - t0
    write_reports(report, out)
    return report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def write_reports(report: Report, out: Path) -> None:
    """report.json and report.md, each written to a temporary name and renamed (never half-written)."""
    data = report.to_json()
    lines = [f"# biogen GPU acceptance run: {'PASS' if report.ok else 'FAIL'}", "",
             f"device: {report.env.get('gpu', report.device)}; torch {report.env.get('torch')}; biogen "
             f"{report.env.get('version')}; smoke: {report.smoke}; {report.elapsed_s:.0f} s", ""]
    if report.failures:
        lines += ["## Failures", ""] + [f"- {f}" for f in report.failures] + [""]
    t = report.tests
    if t:
        lines += ["## Tests", "", f"`{' '.join(t['command'][1:])}` in {t['cwd']}: {t['passed']} passed, "
                  f"{t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped ({t['duration_s']} s)"
                  + (f"; {t['error']}" if t["error"] else ""), ""]
        lines += [f"- {c['outcome'].upper()} {c['id']}: {c['message']}" for c in t["cases"]
                  if c["outcome"] in ("failed", "errors")] + [""]
    lines += ["## Correctness at the benchmark shapes", "", "| case | shape | ok | detail |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {_fmt(c['shape'])} | {'yes' if c['ok'] else 'NO'} | {c['detail']}"
              + (f"; errors: {_fmt(c['errors'])}" if c["errors"] else "") + " |" for c in report.correctness]
    lines += ["", "## Benchmarks (median of interleaved rounds)", "",
              "| case | shape | impl | median ms | rate | peak MB | biogen speed-up |", "|---|---|---|---|---|---|---|"]
    for b in report.benchmarks:
        rate = next((f"{_fmt(b[u])} {u}" for u in ("TFLOP/s", "GB/s") if u in b), "-")
        lines.append(f"| {b['name']} | {_fmt(b['shape'])} | {b['impl']} | {_fmt(b['median_ms'])} | {rate} | "
                     f"{_fmt(b['peak_mem_mb'])} | {_fmt(b.get('speedup_vs'))} |")
    if report.notes:
        lines += ["", "## Notes", ""] + [f"    {n}" for n in report.notes]
    for name, text in (("report.json", json.dumps(data, indent=2, default=str)), ("report.md", "\n".join(lines) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the pytest output")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="default: cuda")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the only mode on --device cpu)")
    p.add_argument("--repo", help="the repository checkout whose tests/ops to run, against the biogen this "
                   "command imports (default: the checkout biogen was imported from, else the current folder)")
    p.add_argument("--no-tests", action="store_true", help="skip the pytest stage")
    p.add_argument("--tests-k", help=f"pytest -k expression over tests/ops (default {DEFAULT_TESTS_K!r})")
    p.add_argument("--test-timeout", type=float, default=240.0, help="seconds for the pytest stage (default 240)")
    p.add_argument("--cases", default="masked,performer,group_norm,train",
                   help="benchmark groups, comma-separated (default: all of masked,performer,group_norm,train)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    p.add_argument("--budget-s", type=float, default=500.0,
                   help="stop starting benchmarks after this many seconds (default 500)")


_DESCRIPTION = __doc__.split("\n\n", 1)[1]


def _cmd(args: argparse.Namespace) -> int:
    try:
        report = run(args)
    except GpuCheckError as exc:
        raise ValueError(str(exc)) from None
    print(f"gpucheck: {'PASS' if report.ok else 'FAIL'}; report in {Path(args.out) / 'report.md'}")
    for f in report.failures:
        print(f"  {f}")
    return 0 if report.ok else 1


def add_cli(sub) -> None:
    p = sub.add_parser("gpucheck", help="one-shot GPU acceptance run: kernel tests + benchmarks, with a report",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd)


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m biogen.gpucheck", description=_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return _cmd(args)
    except ValueError as exc:
        print(f"gpucheck: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
