"""Same seed, same machine, same thread count: bit-identical results, whatever else loads the CPU.

A busy-loop process competing for the cores deschedules OpenMP threads in the middle of parallel
regions, so the order in which threads take and finish work changes from run to run. Anything that
sums in completion order (a dynamic schedule feeding per-thread partial sums, atomics) or sizes its
partition from the moment's conditions then gives different bits; these tests compare such runs.

- training: a tiny scGPT (generative + MLM pretraining, then fine-tuning, dropout on) and a tiny
  scBERT, each trained twice with the same seed -- once on a quiet CPU, once beside a busy loop --
  must end with identical state dicts;
- kernels: every C++ op, forward and backward, at shapes that split into many OpenMP tasks, run on
  2 threads quiet and then repeatedly under load, must give identical bits; biogen's kernels also
  give identical bits for any thread count (their partitions depend on the shape only).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from biogen.ops import (gaussian_orthogonal_random_matrix, group_norm_silu, masked_gene_attention,
                        performer_attention, sampler_step)
from biogen.sc.datasets import synthetic

def _have_cpu_kernels() -> bool:
    try:
        from biogen import _C  # noqa: F401
    except ImportError:
        return False
    return True


needs_cpp = pytest.mark.skipif(not _have_cpu_kernels(), reason="biogen._C (C++ kernels) not built")


@contextlib.contextmanager
def cpu_competitor(n: int = 2):
    """``n`` busy-loop processes on the same cores for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_bits(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} of {len(a)} tensors differ between identical runs: {differ[:5]}"


# ------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def cells():
    # 200 genes: sequences of ~200 tokens, several 64-wide attention tiles and Performer chunks.
    return synthetic(n_cells=48, n_genes=200, n_types=3, n_batches=1, n_donors=1, seed=3, n_markers=8,
                     marker_fold=20.0, mean_library=800.0)


def _train_scgpt(adata) -> dict:
    from biogen.models.scgpt import ScGPT

    torch.manual_seed(0)
    m = ScGPT(adata, label_key="cell_type", config="tiny", max_seq_len=160, d_model=32, nhead=2, d_hid=64,
              dropout=0.1, device="cpu")
    m.pretrain(epochs=1, mode="both", batch_size=16, lr=1e-3, validation_fraction=0.0, progress=False, seed=5)
    m.fit(epochs=2, batch_size=16, lr=1e-3, validation_fraction=0.2, progress=False, seed=5)
    return {k: v.clone() for k, v in m.module.state_dict().items()}


def _train_scbert(adata) -> dict:
    from biogen.models.scbert import ScBERT

    torch.manual_seed(0)
    m = ScBERT(adata, label_key="cell_type", config="tiny", device="cpu")
    # batches of 4 cells x 2 heads: the Performer splits each (cell, head)'s 201 keys over 4 tasks,
    # so a merge in completion order would show (two partial sums add the same either way)
    m.pretrain(epochs=1, batch_size=4, lr=1e-3, validation_fraction=0.0, progress=False, seed=5)
    m.fit(epochs=1, batch_size=4, lr=1e-3, validation_fraction=0.0, progress=False, seed=5)
    return {k: v.clone() for k, v in m.module.state_dict().items()}


@pytest.mark.parametrize("train", [_train_scgpt, _train_scbert], ids=["scgpt", "scbert"])
def test_training_twice_gives_identical_weights_also_under_load(cells, train):
    with threads(2):
        quiet = train(cells)
        with cpu_competitor():
            loaded = train(cells)
    assert_same_bits(quiet, loaded, train.__name__)


def test_training_depends_on_the_seed(cells):
    """The comparison above can fail: another seed gives other weights."""
    from biogen.models.scbert import ScBERT

    out = []
    for seed in (5, 6):
        torch.manual_seed(0)
        m = ScBERT(cells, label_key="cell_type", config="tiny", device="cpu")
        m.fit(epochs=1, batch_size=8, validation_fraction=0.0, progress=False, seed=seed)
        out.append(m.module.state_dict())
    assert any(not torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_scgpt_annotator_seed_sets_the_initial_weights(cells):
    """The annotator's seed seeds the model's initialisation too, whatever torch's global RNG holds;
    a different seed gives a different model."""
    from biogen.models.scgpt.annotator import ScGPTAnnotator

    def trained(seed, global_seed):
        torch.manual_seed(global_seed)
        a = ScGPTAnnotator("tiny", epochs=1, seed=seed, progress=False, max_seq_len=64)
        a.fit(cells, "cell_type")
        return a.model.module.state_dict()

    first = trained(1, global_seed=10)
    assert_same_bits(first, trained(1, global_seed=20), "ScGPTAnnotator(seed=1)")
    other = trained(2, global_seed=10)
    assert any(not torch.equal(first[k], other[k]) for k in first)


# ------------------------------------------------------------------------------------- kernels

LOADED_REPEATS = 3


def _runs_agree(fn, *, nthreads: int = 2) -> None:
    """fn() -> dict of tensors, run once quietly and LOADED_REPEATS times beside busy loops."""
    with threads(nthreads):
        ref = fn()
        with cpu_competitor():
            for i in range(LOADED_REPEATS):
                assert_same_bits(ref, fn(), f"run {i + 2}")


def _with_grads(out: torch.Tensor, inputs: dict, g: torch.Tensor) -> dict:
    names = [k for k, v in inputs.items() if v.requires_grad]
    grads = torch.autograd.grad(out, [inputs[k] for k in names], g)
    return {"out": out.detach(), **{f"d{k}": d for k, d in zip(names, grads)}}


def _masked_attention_inputs(B, H, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_(True) for _ in range(3))
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    pad = torch.arange(L)[None] >= lengths[:, None]
    known = torch.rand(B, L, generator=g) < 0.6
    return dict(q=q, k=k, v=v), pad, known, torch.randn(B, H, L, D, generator=g)


@needs_cpp
def test_masked_attention_cpu_bit_identical_under_load():
    # 4 cells x 2 heads x 700 genes: 11 query tiles of 64 per (cell, head), 88 forward tasks.
    t, pad, known, gout = _masked_attention_inputs(4, 2, 700, 32)

    def run():
        out = masked_gene_attention(t["q"], t["k"], t["v"], key_padding_mask=pad, known=known, backend="cpu")
        return _with_grads(out, t, gout)

    _runs_agree(run)


def _performer_inputs(B, H, L, D, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_(True) for _ in range(3))
    pad = torch.arange(L)[None] >= torch.randint(L // 2, L + 1, (B,), generator=g)[:, None]
    w = gaussian_orthogonal_random_matrix(m, D, generator=g)
    return dict(q=q, k=k, v=v), pad, w, torch.randn(B, H, L, D, generator=g)


@needs_cpp
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_cpu_bit_identical_under_load(causal):
    # One (cell, head): the key states of 1,000 positions (16 chunks of 64) are split over tasks and
    # merged; causal runs chunked prefix sums.
    t, pad, w, gout = _performer_inputs(1, 1, 1000, 32, 48)

    def run():
        out = performer_attention(t["q"], t["k"], t["v"], w, key_padding_mask=pad, causal=causal, backend="cpu")
        return _with_grads(out, t, gout)

    _runs_agree(run)


def _group_norm_inputs(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 48, 48, generator=g) * 2 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = dict(x=x, w=torch.randn(64, generator=g), b=torch.randn(64, generator=g),
             sc=torch.randn(2, 64, generator=g) * 0.1, sh=torch.randn(2, 64, generator=g) * 0.1)
    return {k: v.requires_grad_(True) for k, v in t.items()}, torch.randn(2, 64, 48, 48, generator=g)


@needs_cpp
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_group_norm_cpu_bit_identical_under_load(layout):
    # channels-last sums per-channel partials over chunks of positions: 2,304 positions per image.
    t, gout = _group_norm_inputs(layout)

    def run():
        y = group_norm_silu(t["x"], 8, t["w"], t["b"], scale=t["sc"], shift=t["sh"], backend="cpu")
        return _with_grads(y, t, gout)

    _runs_agree(run)


@needs_cpp
def test_sampler_step_cpu_bit_identical_under_load():
    g = torch.Generator().manual_seed(0)
    x, eps_c, eps_u, noise = (torch.randn(4, 3, 64, 64, generator=g) for _ in range(4))

    def run():
        prev, x0 = sampler_step(x, eps_c, model_output_uncond=eps_u, guidance_scale=3.0, alpha_t=0.6, sigma_t=0.8,
                                c_sample=0.0, c_x0=0.7, c_eps=0.5, c_noise=0.3, noise=noise,
                                dynamic_threshold=0.995, sample_max_value=2.0, backend="cpu")
        return {"prev": prev, "x0": x0}

    _runs_agree(run)


@needs_cpp
def test_binning_cpu_bit_identical_under_load():
    from biogen.sc.binning import bin_values

    X = sp.random(3000, 400, density=0.1, format="csr", random_state=0, dtype=np.float32)
    X.data = np.ceil(X.data * 20)

    def run():
        return {"bins": torch.from_numpy(bin_values(X, 51, seed=3, backend="cpu", num_threads=2).data)}

    _runs_agree(run)


@needs_cpp
@pytest.mark.parametrize("op", ["masked_attention", "performer", "performer_causal", "group_norm_cl"])
def test_cpu_kernels_do_not_depend_on_thread_count(op):
    """Partitions follow the shape, never the thread count: 1, 2 and 3 threads agree bit for bit
    (so the thread count a kernel picks for a small call cannot change a result)."""
    if op == "masked_attention":
        t, pad, known, gout = _masked_attention_inputs(2, 2, 300, 32)
        fn = lambda: masked_gene_attention(t["q"], t["k"], t["v"], key_padding_mask=pad, known=known,  # noqa: E731
                                           backend="cpu")
    elif op.startswith("performer"):
        t, pad, w, gout = _performer_inputs(1, 1, 1000, 32, 48)
        fn = lambda: performer_attention(t["q"], t["k"], t["v"], w, key_padding_mask=pad,  # noqa: E731
                                         causal=op.endswith("causal"), backend="cpu")
    else:
        t, gout = _group_norm_inputs("channels_last")
        fn = lambda: group_norm_silu(t["x"], 8, t["w"], t["b"], scale=t["sc"], shift=t["sh"],  # noqa: E731
                                     backend="cpu")
    runs = []
    for n in (1, 2, 3):
        with threads(n):
            runs.append(_with_grads(fn(), t, gout))
    assert_same_bits(runs[0], runs[1], f"{op}: 1 vs 2 threads")
    assert_same_bits(runs[0], runs[2], f"{op}: 1 vs 3 threads")
