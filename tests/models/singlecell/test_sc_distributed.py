"""ScGPT and ScBERT training under a real 2-process Gloo torchrun: the same parameters and metrics as
one process on the same global batches, rank 0 alone writes, checkpoints resume in one process."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.dist_helpers import PYTHON_DIR, torchrun

# 20 cells: 4 for validation (2 per rank), 16 for training = 2 global batches of 8 per epoch.
SCRIPT = textwrap.dedent('''
    import os, sys
    import scipy.sparse as sp
    import torch
    from biogen import distributed as bdist
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights in every run (DDP also broadcasts rank 0's)
    from biogen.sc.datasets import synthetic
    from biogen.models.scgpt import ScGPT
    from biogen.models.scbert import ScBERT

    kind, out, epochs, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
    a = synthetic(n_cells=20, n_genes=30, n_types=2, n_batches=1, n_donors=1, seed=3, n_markers=5,
                  marker_fold=20.0, mean_library=400.0)
    kw = dict(batch_size=8, validation_fraction=0.2)
    if kind == "scgpt":
        m = ScGPT(a, label_key="cell_type", config="tiny", max_seq_len=32, dropout=0.0, device="cpu")
    elif kind == "scbert":
        m = ScBERT(a, label_key="cell_type", config="tiny", device="cpu")
    else:  # out of core: 16 cells in chunks of 2 from a file; one global batch of all of them per epoch
        path = os.path.join(out, "cells.h5ad")
        if not resume:
            if bdist.env_rank() == 0:
                os.makedirs(out)
                a = a[:16].copy()
                a.X = sp.csr_matrix(a.X)
                a.write_h5ad(path)
            bdist.init()
            bdist.barrier()
        m = ScGPT.from_h5ad(path, label_key="cell_type", config="tiny", max_seq_len=32, dropout=0.0, chunk_size=2,
                            device="cpu")
        kw = dict(batch_size=16, validation_fraction=0)
    m.fit(epochs=epochs, lr=1e-3, checkpoint_dir=out, resume=resume, progress=False, **kw)
    print("history", m.history)
''')


def _run(tmp: Path, nproc: int, kind: str, out: Path, epochs: int, resume: bool = False):
    script = tmp / "train_sc.py"
    script.write_text(SCRIPT)
    args = [kind, str(out), str(epochs), "resume" if resume else "new"]
    if nproc > 1:  # ranks other than 0 fail if they create anything in the output folder
        r = torchrun(nproc, args, script=script, rank0_only=out, guard_dir=tmp / f"guard_{out.name}", timeout=300)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(PYTHON_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        r = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _assert_same_weights(w1: dict, w2: dict, kind: str, atol: float) -> None:
    """Equal within ``atol``, except for a handful of elements: a key projection's bias has no gradient
    in exact arithmetic (softmax is shift-invariant), so Adam turns the rounding noise of a different
    summation order into steps of +-lr. Unsynchronised half-batch gradients would instead move most
    weights differently by about lr = 1e-3."""
    assert w1.keys() == w2.keys()
    bad = {k: int(((w2[k] - v).abs() > atol).sum()) for k, v in w1.items()}
    total = sum(v.numel() for v in w1.values())
    assert sum(bad.values()) <= 0.002 * total, (kind, {k: n for k, n in bad.items() if n})
    for k, v in w1.items():
        assert float((w2[k] - v).abs().max()) < 3e-3, k  # at most a few Adam steps of lr = 1e-3


def _state(out: Path) -> tuple[dict, dict]:
    return (load_file(str(out / "model.safetensors")),
            json.loads((out / "trainer_state.json").read_text()))


@pytest.fixture(scope="module", params=["scgpt", "scbert", "scgpt-stream"])
def runs(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"ddp_{kind}")
    two = _run(root, 2, kind, root / "two", epochs=1)
    _run(root, 1, kind, root / "one", epochs=1)
    return kind, root, two


def test_two_processes_match_one_process(runs):
    kind, root, two = runs
    (w1, s1), (w2, s2) = _state(root / "one"), _state(root / "two")
    # two global batches of 8 (the ranks took 4 cells each), or streaming: one of 16 (8 each)
    assert s1["step"] == s2["step"] == (1 if kind == "scgpt-stream" else 2)
    assert s2["world_size"] == 2
    _assert_same_weights(w1, w2, kind, atol=2e-5)
    h1, h2 = s1["history"][0], s2["history"][0]
    assert h1.keys() == h2.keys()
    for key in set(h1) - {"epoch", "step"}:  # sums reduced over ranks = global values
        assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
    assert two.stdout.count("history") == 2  # both ranks finished with the same (reduced) history
    assert len({line for line in two.stdout.splitlines() if line.startswith("history")}) == 1


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    kind, root, _ = runs
    for name in ("one", "two"):
        shutil.copytree(root / name, tmp_path / name)
        _run(tmp_path, 1, kind, tmp_path / name, epochs=2, resume=True)
    (w1, s1), (w2, s2) = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert s1["step"] == s2["step"] == (2 if kind == "scgpt-stream" else 4)
    assert [h["epoch"] for h in s2["history"]] == [1, 2]
    _assert_same_weights(w1, w2, kind, atol=5e-5)
