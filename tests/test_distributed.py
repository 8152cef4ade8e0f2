"""biogen.distributed helpers, and the TumorSynth trainer under a real 2-process Gloo torchrun."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biogen import distributed as bdist
from biogen.cli import main as cli_main

from biogen.ops import _runtime

from .dist_helpers import run_python, torchrun


# ------------------------------------------------------------------------------ single process


def test_single_process_helpers_are_no_ops():
    assert not bdist.launched_by_torchrun() or "RANK" in os.environ
    assert bdist.init() is False
    assert (bdist.rank(), bdist.world_size(), bdist.is_main()) == (0, 1, True)
    m = torch.nn.Linear(2, 2)
    assert bdist.wrap_ddp(m) is m and bdist.unwrap(m) is m
    t = torch.tensor([1.0, 2.0])
    assert bdist.all_reduce_mean(t) is t and bdist.all_reduce_mean(3.5) == 3.5
    assert bdist.broadcast_object({"a": 1}) == {"a": 1}
    bdist.barrier()
    assert bdist.main_only(lambda: 7)() == 7


def test_split_batch_partitions_the_global_batch():
    slices = [bdist.split_batch(12, rank_=r, world=3) for r in range(3)]
    covered = np.concatenate([np.arange(12)[s] for s in slices])
    np.testing.assert_array_equal(covered, np.arange(12))
    with pytest.raises(ValueError, match=r"global batch size \(10\) must be divisible by the world size \(4\)"):
        bdist.split_batch(10, rank_=0, world=4)


@pytest.mark.parametrize("n,batch,world", [(10, 4, 2), (23, 8, 3), (9, 4, 2), (7, 7, 1)])
def test_rank_batches_split_each_global_batch(monkeypatch, n, batch, world):
    order = np.random.default_rng(0).permutation(n)
    per_rank = []
    for r in range(world):
        monkeypatch.setattr(bdist, "rank", lambda r=r: r)
        monkeypatch.setattr(bdist, "world_size", lambda: world)
        per_rank.append(list(bdist.rank_batches(order, batch)))
    assert len({len(p) for p in per_rank}) == 1  # lockstep: every rank takes the same number of steps
    for step, parts in enumerate(zip(*per_rank)):
        glob = order[step * batch:(step + 1) * batch]
        np.testing.assert_array_equal(np.concatenate([idx for idx, _ in parts]), glob)
        # scaled per-rank means, averaged as DDP does, give the global-batch mean
        vals = np.arange(n, dtype=np.float64) ** 2
        ddp = np.mean([vals[idx].mean() * scale for idx, scale in parts])
        assert ddp == pytest.approx(vals[glob].mean())
    seen = sum(len(glob) for glob in (np.concatenate([i for i, _ in parts]) for parts in zip(*per_rank)))
    assert seen == n - (n % batch if 0 < n % batch < world else 0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        next(bdist.rank_batches(order, 0))


def test_wrap_loss_calls_through_in_one_process():
    m = torch.nn.Linear(3, 1)
    f = bdist.wrap_loss(m, lambda mod, x: mod(x).sum())
    x = torch.ones(2, 3)
    assert torch.equal(f(x), m(x).sum())
    assert bdist.all_reduce_sum(np.array([1.0, 2.0])).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_indices_is_a_deterministic_partition(drop_last):
    n, w = 23, 4
    shards = [bdist.shard_indices(n, epoch=3, seed=5, drop_last=drop_last, rank_=r, world=w) for r in range(w)]
    assert len({len(s) for s in shards}) == 1  # equal work per rank: DDP steps stay in lockstep
    per = n // w
    head = np.concatenate([s[:per] for s in shards])
    assert len(np.unique(head)) == per * w  # no index twice among the first n // world of each rank
    allidx = np.concatenate(shards)
    if drop_last:
        assert len(np.unique(allidx)) == len(allidx) == per * w
    else:
        assert set(allidx.tolist()) == set(range(n))
    again = bdist.shard_indices(n, epoch=3, seed=5, drop_last=drop_last, rank_=1, world=w)
    np.testing.assert_array_equal(again, shards[1])
    other = bdist.shard_indices(n, epoch=4, seed=5, drop_last=drop_last, rank_=1, world=w)
    assert not np.array_equal(other, shards[1])
    with pytest.raises(ValueError, match="rank 4 is outside 0..3"):
        bdist.shard_indices(n, rank_=4, world=4)


# ------------------------------------------------------------------------------ 2 Gloo processes


# 10 phantoms: 2 held out for KID, 8 train = one global batch of 8 -> exactly one step per epoch.
# Dropout 0: dropout masks are drawn per rank and cannot match a single process's.
TRAIN_ARGS = ["tumorsynth", "train", "--phantoms", "10", "--image-size", "16", "--batch-size", "8",
              "--dropout", "0", "--no-progress", "--seed", "0"]


def _torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    return torchrun(nproc, args)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last"
    g = load_file(str(last / "generator.safetensors"))
    d = load_file(str(last / "discriminator.safetensors"))
    return {**{f"G.{k}": v for k, v in g.items()}, **{f"D.{k}": v for k, v in d.items()}}


def _run_single(args: list[str]) -> None:
    torch.set_num_threads(1)
    assert cli_main(args) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    two = _torchrun(2, TRAIN_ARGS + ["--epochs", "1", "--out", str(root / "two")])
    if two.returncode != 0:  # the free port may be taken between probing and binding: one retry
        shutil.rmtree(root / "two", ignore_errors=True)
        two = _torchrun(2, TRAIN_ARGS + ["--epochs", "1", "--out", str(root / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    _run_single(TRAIN_ARGS + ["--epochs", "1", "--out", str(root / "one")])
    return root, two


def test_two_gloo_processes_match_one_process_after_one_step(runs):
    root, two = runs
    a, b = _weights(root / "one"), _weights(root / "two")
    init = _weights_at_init()
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        # Adam's first step moves every weight by about lr = 2e-4: an unsynchronised half-batch gradient
        # flips the sign of many of those moves, far beyond this tolerance.
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-6, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.allclose(a[k], init[k], rtol=0, atol=1e-6))
    assert moved == len(a)  # the step did happen
    ha = json.loads((root / "one" / "history.json").read_text())["history"][0]
    hb = json.loads((root / "two" / "history.json").read_text())["history"][0]
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):  # rank means averaged == the global-batch means
        assert hb[key] == pytest.approx(ha[key], rel=1e-5, abs=1e-6), key
    state = json.loads((root / "two" / "checkpoints" / "last" / "state.json").read_text())
    assert state["world_size"] == 2
    # Only rank 0 prints the CLI's summary line.
    assert two.stdout.count("trained 1 epoch(s)") == 1, two.stdout


def _weights_at_init() -> dict[str, torch.Tensor]:
    from biogen.models.tumorsynth import TumorSynthConfig, build_models

    torch.manual_seed(0)
    G, D = build_models(TumorSynthConfig(image_size=16, batch_size=8, dropout=0.0))
    return {**{f"G.{k}": v for k, v in G.state_dict().items()}, **{f"D.{k}": v for k, v in D.state_dict().items()}}


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, capsys):
    root, _ = runs
    shutil.copytree(root / "two", tmp_path / "from_two")
    shutil.copytree(root / "one", tmp_path / "from_one")
    for run in ("from_two", "from_one"):
        _run_single(TRAIN_ARGS + ["--epochs", "2", "--resume", "--out", str(tmp_path / run)])
    a, b = _weights(tmp_path / "from_one"), _weights(tmp_path / "from_two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-6, msg=lambda m: f"{k}: {m}")
    hist = json.loads((tmp_path / "from_two" / "history.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [0, 1]
    # A checkpoint from another preset is refused with a clear error, not silently mixed.
    bad = TRAIN_ARGS + ["--epochs", "3", "--resume", "--lr", "1e-3", "--out", str(tmp_path / "from_two")]
    capsys.readouterr()
    assert cli_main(bad) == 2
    assert "trained with another configuration" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the children's biogen

_ATTENTION = """
import sys
if sys.argv[1] == "no-extension":
    sys.modules["biogen._C"] = None  # as in a child that imports a biogen without a built _C
import torch
from biogen.ops import masked_gene_attention
q = torch.randn(1, 2, 8, 16)
masked_gene_attention(q, q, q)
"""


@pytest.mark.skipif(_runtime._C is None, reason="biogen._C with the CPU kernels not built")
def test_children_run_the_compiled_kernels_or_the_test_fails(tmp_path):
    """The launch helpers check every child: the tests' biogen, its _C loaded, no fallback from the
    C++ cpu backend to torch. A child whose extension does not import must fail the check."""
    script = tmp_path / "attention.py"
    script.write_text(_ATTENTION)
    two = torchrun(2, ["ok"], script=script, guard_dir=tmp_path / "hooks")
    assert two.returncode == 0, two.stderr[-2000:]
    reports = [json.loads(p.read_text()) for p in (tmp_path / "hooks" / "reports").glob("*.json")]
    assert sorted(r["rank"] for r in reports) == ["0", "1"]
    assert all(r["c_loaded"] and not r["skipped_cpu"] for r in reports)
    with pytest.raises(AssertionError, match="has no biogen._C"):
        run_python(script, ["no-extension"])
