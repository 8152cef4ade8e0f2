"""Out-of-core streaming: cells/s and peak RSS tokenising a backed .h5ad, at two file sizes.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_streaming.py --benchmark-only -s
      BIOGEN_BENCH_CELLS=1000000 ... for the issue's 1M and 2M cells (x 20,000 genes; ~6 and ~12 GB
      of disk, generation takes a few minutes per million cells).
      BIOGEN_BENCH_GENES (default 20000), BIOGEN_BENCH_DIR (keep the generated files between runs).

For N = BIOGEN_BENCH_CELLS (default 100,000) and 2N cells, a synthetic CSR file (about 1,000 counts,
~600 non-zero genes per cell) is written with ``synthetic_h5ad``; then a fresh process streams every
cell through ``StreamingScGPTDataset`` (chunked reads, shuffled buffer, scGPT tokenisation, masking)
and ``collate`` into batches of 64, and reports cells/s, its peak RSS (``ru_maxrss``, imports
included) and the peak RSS while streaming (VmHWM after resetting it once the imports are done). The baseline a user would otherwise run, ``read_h5ad`` into memory + ``ScGPTDataset`` with a
shuffling DataLoader, is measured the same way in the same run (skipped when its matrix alone would
exceed BIOGEN_BENCH_BASELINE_MAX_GB, default 3). ``extra_info`` holds both, and the ratios.
The streaming process must stay under 2 GB and roughly flat from N to 2N cells.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

N_CELLS = int(os.environ.get("BIOGEN_BENCH_CELLS", "100000"))
N_GENES = int(os.environ.get("BIOGEN_BENCH_GENES", "20000"))
BASELINE_MAX_GB = float(os.environ.get("BIOGEN_BENCH_BASELINE_MAX_GB", "3"))
SIZES = [N_CELLS, 2 * N_CELLS]
BATCH = 64
RESULTS: dict = {}


def _worker(mode: str, path: str) -> None:
    """Runs in a fresh process: stream (or load) every cell once and print one JSON line."""
    import resource

    import anndata as ad
    from anndata.io import read_elem
    import h5py
    from torch.utils.data import DataLoader

    from biogen.sc import GeneVocab, ScGPTDataset, StreamingScGPTDataset, collate

    with h5py.File(path, "r") as f:
        vocab = GeneVocab(read_elem(f["var"]).index.astype(str))
    kw = dict(max_seq_len=1200, mask_ratio=0.4, seed=0)
    import_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch, anndata, biogen
    # Import-time spikes would hide the data's footprint in ru_maxrss: reset the kernel's high-water
    # mark (Linux >= 4.0) so VmHWM covers the streaming alone (on top of what stays resident).
    reset = _reset_hwm()
    t0 = time.perf_counter()
    if mode == "stream":
        ds = StreamingScGPTDataset(path, vocab, chunk_size=1024, buffer_size=16384, **kw)
        loader = DataLoader(ds, batch_size=BATCH, collate_fn=collate)
    else:
        ds = ScGPTDataset(ad.read_h5ad(path), vocab, **kw)
        loader = DataLoader(ds, batch_size=BATCH, collate_fn=collate, shuffle=True)
    n = 0
    for batch in loader:
        n += batch["gene_ids"].shape[0]
    sec = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cells": n, "seconds": sec, "cells_per_s": n / sec, "peak_rss_mb": rss_mb,
                      "peak_rss_imports_mb": import_mb,
                      "peak_rss_during_run_mb": _hwm_mb() if reset else rss_mb}))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(mode: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python")}
    r = subprocess.run([sys.executable, __file__, mode, str(path)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from biogen.sc.datasets import synthetic_h5ad

    root = Path(os.environ.get("BIOGEN_BENCH_DIR") or tmp_path_factory.mktemp("bench_streaming"))
    out = {}
    for n in SIZES:
        p = root / f"synthetic_{n}x{N_GENES}.h5ad"
        if not p.exists():
            t0 = time.perf_counter()
            synthetic_h5ad(p, n, N_GENES, chunk_size=8192, seed=0)
            print(f"\nwrote {p} ({p.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
        out[n] = p
    return out


@pytest.mark.parametrize("n_cells", SIZES)
def test_stream_tokenise(benchmark, files, n_cells):
    import h5py

    path = files[n_cells]
    with h5py.File(path, "r") as f:
        nnz = int(f["X/indptr"][-1])
    res = benchmark.pedantic(_measure, args=("stream", path), rounds=1, iterations=1)
    assert res["cells"] == n_cells
    info = {"n_cells": n_cells, "n_genes": N_GENES, "nnz": nnz, "file_gb": path.stat().st_size / 1e9,
            "cells_per_s": res["cells_per_s"], "peak_rss_mb": res["peak_rss_mb"],
            "peak_rss_imports_mb": res["peak_rss_imports_mb"], "peak_rss_during_run_mb": res["peak_rss_during_run_mb"]}
    matrix_gb = nnz * 8 / 1e9
    if matrix_gb <= BASELINE_MAX_GB:
        base = _measure("memory", path)
        info.update(baseline_cells_per_s=base["cells_per_s"], baseline_peak_rss_mb=base["peak_rss_mb"],
                    baseline_peak_rss_during_run_mb=base["peak_rss_during_run_mb"],
                    speedup=res["cells_per_s"] / base["cells_per_s"],
                    rss_ratio_baseline_over_stream=base["peak_rss_during_run_mb"] / res["peak_rss_during_run_mb"])
    else:
        info["baseline"] = f"skipped: in-memory X would take {matrix_gb:.1f} GB (> {BASELINE_MAX_GB} GB)"
    benchmark.extra_info.update(info)
    RESULTS[n_cells] = info
    print("\n" + json.dumps(info, indent=1))
    assert res["peak_rss_mb"] < 2048, f"streaming peak RSS {res['peak_rss_mb']:.0f} MB is over 2 GB"
    if n_cells == SIZES[1] and SIZES[0] in RESULTS:
        small = RESULTS[SIZES[0]]["peak_rss_during_run_mb"]
        large = res["peak_rss_during_run_mb"]
        print(f"peak RSS while streaming: {SIZES[0]} cells {small:.0f} MB; {n_cells} cells {large:.0f} MB")
        assert large < 1.25 * small, "streaming memory grew with the file size"




if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
