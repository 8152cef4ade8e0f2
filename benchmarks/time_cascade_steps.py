"""Seconds per RNA-CDM cascade training step (``cpu`` preset, batch 16, base and SR stage), with
biogen's kernels and under ``use_backend("torch")``, in 3 interleaved rounds of 12 steps (median of
steps 3-12 per round). A quick A/B between checkouts: run it in each with that checkout's ``_C``.

Run:  PYTHONPATH=python python benchmarks/time_cascade_steps.py
(For checkouts before the per-model packages, the import is ``biogen.models.rna_cdm``.)
"""

import contextlib
import statistics

import numpy as np
import torch

from biogen.models.rna_cdm.cascade import CascadeTrainConfig, RNACDM, cascade_preset, train_cascade
from biogen.ops import use_backend


def main() -> None:
    torch.manual_seed(0)
    model = RNACDM(cascade_preset("cpu", 16))
    tiles = np.random.default_rng(0).uniform(-1, 1, (64, 3, 64, 64)).astype(np.float32)
    z = np.random.default_rng(1).normal(size=(64, 16)).astype(np.float32)
    res: dict = {}
    for _ in range(3):
        for backend in ("biogen", "torch"):
            for stage in ("base", "sr"):
                with use_backend("torch") if backend == "torch" else contextlib.nullcontext():
                    h = train_cascade(model, tiles, z, CascadeTrainConfig(steps=12, batch_size=16, warmup_steps=1),
                                      stages=(stage,))
                res.setdefault((backend, stage), []).append(statistics.median(h["step_seconds"][2:]))
    for (backend, stage), v in res.items():
        print(f"{backend:6s} {stage:4s} median step {statistics.median(v):.4f} s (rounds {', '.join(f'{x:.4f}' for x in v)})")


if __name__ == "__main__":
    main()
