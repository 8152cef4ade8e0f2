"""RNA VAE, RNA-CDM and PumaMedNet trainers under a real 2-process Gloo torchrun.

Each 2-process run goes through the CLI with a start-up hook that makes any file rank 1 creates in
the output folder an error (only rank 0 writes). The RNA-CDM and PumaMedNet steps are compared with
the same command in one process (N ranks use exactly one process's batches, noise and corruption).
The VAE's BatchNorm keeps per-rank batch statistics (SyncBatchNorm has no CPU implementation), so
its 2-process step is compared with an independent single-process computation of that rule: the
mean of the two half-batch losses, each half normalised by its own statistics.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biogen import distributed as bdist
from biogen.cli import main as cli_main

from .dist_helpers import torchrun

LATENT = 8


def _cli(args: list[str]) -> None:
    torch.set_num_threads(1)
    assert cli_main(args) == 0


def _run2(args: list[str], out: Path, tmp: Path):
    r = torchrun(2, args, rank0_only=out, guard_dir=tmp / "guard")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _assert_same(a: dict, b: dict, atol: float, what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m: f"{what} {k}: {m}")


# --------------------------------------------------------------------------- RNA VAE + RNA-CDM


@pytest.fixture(scope="module")
def rna(tmp_path_factory):
    from biogen.data.toy_tissue import ToyTissueConfig, simulate_toy_tissue

    root = tmp_path_factory.mktemp("rna")
    toy = simulate_toy_tissue(24, 2, ToyTissueConfig(n_genes=60, markers_per_type=6, tile_size=32), seed=5)
    toy.write(root / "rna.h5ad", root / "tiles")
    return root, toy


VAE_ARGS = ["rnacdm", "train-vae", "--hidden", "16", "12", "--latent", str(LATENT), "--epochs", "1",
            "--batch-size", "64", "--lr", "1e-2", "--warmup-epochs", "0", "--plot", "pca", "--seed", "0"]


@pytest.fixture(scope="module")
def vae_two(rna):
    root, _ = rna
    out = root / "vae_two"
    r = _run2(VAE_ARGS + ["--rna", str(root / "rna.h5ad"), "--out", str(out)], out, root)
    return out, r


def test_vae_two_processes_take_the_ghost_batch_step(rna, vae_two):
    from biogen.models.rna_cdm.vae import RNAEncoder, RNAVAE, RNAVAEConfig

    root, toy = rna
    out, r = vae_two
    assert r.stdout.count("VAE trained") == 1
    assert {p.name for p in out.iterdir()} == {"vae.safetensors", "latents.h5ad", "latents_pca.png", "history.json",
                                               "checkpoint"}
    hist = json.loads((out / "history.json").read_text())
    enc = RNAEncoder.load(out / "vae.safetensors")
    tr = np.asarray(hist["split"]["train"])
    assert len(tr) <= 64  # one global batch: the run is exactly one optimiser step

    # Independent single-process computation of that step (the trainer's draws: permutation, then the
    # noise of the whole global batch, from one generator seeded with the seed).
    X = toy.adata.X.toarray() if hasattr(toy.adata.X, "toarray") else np.asarray(toy.adata.X)
    xtr = torch.from_numpy(((X[tr] - enc.mean) / enc.std).astype(np.float32))
    torch.manual_seed(0)
    ref = RNAVAE(RNAVAEConfig(n_genes=X.shape[1], hidden=(16, 12), latent_dim=LATENT))
    rank0_only = RNAVAE(ref.config)
    rank0_only.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(tr), generator=g)
    eps = torch.randn((len(tr), LATENT), generator=g)
    halves = np.array_split(np.arange(len(tr)), 2)
    ref.train()
    loss = sum(ref.loss(xtr[perm[h]], eps=eps[h])["loss"] * (len(h) * 2 / len(tr)) for h in halves) / 2
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    got = enc.module.state_dict()
    # A Linear bias right before a training-mode BatchNorm has a zero gradient, so its float gradient is
    # rounding noise, and Adam's first step (lr * g / (|g| + eps)) turns that noise into a step of up
    # to lr whose sign and size depend on the reduction order (thread count): those are only bounded.
    noise = {f"{name}.{i}.bias" for name, m in ref.named_modules() if isinstance(m, torch.nn.Sequential)
             for i in range(len(m) - 1)
             if isinstance(m[i], torch.nn.Linear) and isinstance(m[i + 1], torch.nn.BatchNorm1d)}
    noise = {k.lstrip(".") for k in noise}
    params = {k for k, _ in ref.named_parameters()}
    assert noise and noise < params
    init = dict(rank0_only.named_parameters())
    for k in noise:
        assert float((got[k] - init[k]).abs().max()) <= 1e-2 * (1 + 1e-5), k
    exact = params - noise
    _assert_same({k: v for k, v in ref.state_dict().items() if k in exact},
                 {k: v for k, v in got.items() if k in exact}, 2e-6, "VAE")
    assert all(not torch.allclose(got[k], init[k], atol=1e-4) for k in exact)  # every weight moved (lr 1e-2)
    # the running statistics are rank 0's: its half of the batch only
    with torch.no_grad():
        rank0_only.train()(xtr[perm[halves[0]]], eps=eps[halves[0]])
    buf = {k: v for k, v in rank0_only.state_dict().items() if k not in params}
    _assert_same(buf, {k: v for k, v in got.items() if k not in params}, 1e-6, "VAE buffer")
    # the reduced train loss is the mean over both ranks' samples; the validation loss is exact
    assert hist["train_loss"][0] == pytest.approx(float(loss.detach()), rel=1e-5)
    val = torch.from_numpy(((X[hist["split"]["val"]] - enc.mean) / enc.std).astype(np.float32))
    assert hist["val_loss"][0] == pytest.approx(enc._eval_loss(val), rel=1e-5)


CDM_ARGS = ["rnacdm", "train", "--preset", "tiny", "--stages", "base", "--batch-size", "5", "--lr", "1e-2",
            "--ema", "0.5", "--seed", "0"]


def test_cascade_two_processes_match_one_and_resume_in_one(rna, vae_two, tmp_path):
    root, _ = rna
    vae = str(vae_two[0] / "vae.safetensors")
    data = ["--rna", str(root / "rna.h5ad"), "--tiles", str(root / "tiles"), "--vae", vae]
    two, one = tmp_path / "two", tmp_path / "one"
    r = _run2(CDM_ARGS + data + ["--steps", "2", "--out", str(two)], two, tmp_path)
    assert r.stdout.count("wrote ") == 1
    assert {p.name for p in two.iterdir()} == {"cascade.safetensors", "checkpoint", "history.json"}
    _cli(CDM_ARGS + data + ["--steps", "2", "--out", str(one)])
    a, b = load_file(str(one / "cascade.safetensors")), load_file(str(two / "cascade.safetensors"))
    # batch 5 splits 3 + 2: the loss scale makes DDP's average the global-batch mean
    _assert_same(a, b, 2e-6, "cascade")
    torch.manual_seed(0)
    from biogen.models.rna_cdm.cascade import RNACDM, cascade_preset

    init = RNACDM(cascade_preset("tiny", LATENT)).state_dict()
    moved = [k for k in a if k.startswith(("unets.base.", "tokens.base.")) and not torch.equal(a[k], init[k])]
    assert len(moved) > 10  # the steps happened
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (one, two))
    assert hb["world_size"] == 2 and ha["world_size"] == 1
    np.testing.assert_allclose(hb["base"], ha["base"], rtol=1e-5)  # global-batch losses
    # a 2-process checkpoint resumes in one process as the 1-process one does (a third step), and a
    # saved cascade starts a new run (--init) the same from either
    for src in (one, two):
        _cli(CDM_ARGS + data + ["--steps", "3", "--resume", "--out", str(src)])
        _cli(CDM_ARGS + data + ["--steps", "1", "--init", str(src / "cascade.safetensors"),
                                "--out", str(tmp_path / f"init_{src.name}")])
    a, b = load_file(str(one / "cascade.safetensors")), load_file(str(two / "cascade.safetensors"))
    _assert_same(a, b, 4e-6, "resumed")
    assert json.loads((one / "history.json").read_text())["base"][:2] == ha["base"]  # continued, not restarted
    assert len(json.loads((one / "history.json").read_text())["base"]) == 3
    _assert_same(load_file(str(tmp_path / "init_one" / "cascade.safetensors")),
                 load_file(str(tmp_path / "init_two" / "cascade.safetensors")), 4e-6, "init")


# ------------------------------------------------------------------------------------ PumaMedNet


PUMA_ARGS = ["pumamednet", "train", "--preset", "tiny", "--epochs", "1", "--clf-epochs", "3", "--batch-size", "8",
             "--val-fraction", "0.25", "--seed", "0"]


def _dead_parameters() -> set[str]:
    from biogen.models.pumamednet import PRESETS, PumaMedNet, corrupt

    torch.manual_seed(1)
    m = PumaMedNet(PRESETS["tiny"]).double().train()
    g = torch.Generator().manual_seed(0)
    pair = corrupt(torch.rand(4, 1, 32, 32, dtype=torch.float64) * 2 - 1, m.cfg, g)
    out = m.loss(pair.inputs, pair.targets, eps=torch.randn(4, m.cfg.latent_dim, dtype=torch.float64))
    names = [n for n, _ in m.named_parameters() if not n.startswith("classifier.")]
    grads = torch.autograd.grad(out.total, [dict(m.named_parameters())[n] for n in names])
    scale = max(float(gr.abs().max()) for gr in grads)
    return {n for n, gr in zip(names, grads) if float(gr.abs().max()) < 1e-12 * scale}


@pytest.mark.parametrize("finetune", [False, True], ids=["frozen-encoder", "finetuned-encoder"])
def test_pumamednet_two_processes_match_one(tmp_path, finetune):
    from biogen.models.pumamednet import make_synthetic_cxr, write_synthetic_folder

    write_synthetic_folder(make_synthetic_cxr(20, size=32, shortcut=0.5, seed=2), tmp_path / "data")
    # frozen: each rank encodes its shard, full-batch steps of the head; fine-tuned: encoder + head
    # on the same split global batches as the VAE
    data = ["--data", str(tmp_path / "data")] + (["--finetune"] if finetune else [])
    two, one = tmp_path / "two", tmp_path / "one"
    r = _run2(PUMA_ARGS + data + ["--out", str(two)], two, tmp_path)
    assert r.stdout.count("trained on") == 1
    assert {p.name for p in two.iterdir()} == {"model", "history.json", "reconstructions.png", "checkpoint"}
    _cli(PUMA_ARGS + data + ["--out", str(one)])
    # 15 training images, batch 8: global batches of 8 (4 + 4) and 7 (4 + 3) with random erasing,
    # blur, noise, warps and latent noise all drawn as one process draws them
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    # Some parameters cannot change the loss: conv biases before a GroupNorm of one channel per group
    # and the attention head's last bias (softmax is shift-invariant). Their gradients are rounding
    # noise, which Adam's normalisation turns into lr-sized steps, different in every reduction order.
    # Found independently: a float64 gradient of the loss that is zero to machine precision.
    dead = _dead_parameters()
    assert "encoder.body.0.bias" in dead and "attention_head.net.6.bias" in dead and len(dead) < 10
    # Adam divides each gradient by its own scale, so an element whose gradient is nearly zero turns
    # reduction-order rounding into up to ~1e-5 of movement over these steps; an unsynchronised or
    # mis-scaled gradient moves weights by about lr = 2e-3.
    _assert_same({k: v for k, v in a.items() if k not in dead}, {k: v for k, v in b.items() if k not in dead},
                 2e-5, "pumamednet")
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (one, two))
    for k in ("loss", "recon", "kl", "attention"):
        assert hb["vae"][0][k] == pytest.approx(ha["vae"][0][k], rel=1e-5), k
    for k in ("train_accuracy", "train_loss", "val_accuracy"):
        assert hb["classifier"][k] == pytest.approx(ha["classifier"][k], rel=1e-5, abs=1e-6), k
    assert hb["world_size"] == 2
    if finetune:
        return
    # the 2-process checkpoint resumes in one process as the 1-process one does (a second VAE epoch)
    for d in (one, two):
        _cli([a if a != "1" or i != PUMA_ARGS.index("--epochs") + 1 else "2" for i, a in enumerate(PUMA_ARGS)]
             + data + ["--out", str(d), "--resume"])
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    _assert_same({k: v for k, v in a.items() if k not in dead}, {k: v for k, v in b.items() if k not in dead},
                 4e-5, "pumamednet resumed")
    assert [h["epoch"] for h in json.loads((two / "history.json").read_text())["vae"]] == [1, 2]


# ------------------------------------------------------------------------------------ bad input


def test_global_batch_smaller_than_world_size_is_refused(monkeypatch, rna):
    """The checks run before any collective, so they are tested with a faked world of 2 processes."""
    from biogen.models.pumamednet import PRESETS, PumaMedNet, fit_vae, make_synthetic_cxr
    from biogen.models.rna_cdm.cascade import CascadeTrainConfig, RNACDM, cascade_preset, train_cascade
    from biogen.models.rna_cdm.vae import RNAEncoder, RNAVAEConfig, VAETrainConfig

    _, toy = rna
    monkeypatch.setattr(bdist, "world_size", lambda: 2)
    monkeypatch.setattr(bdist, "rank", lambda: 0)
    with pytest.raises(ValueError, match=r"batch_size \(3\) is the global batch: with 2 processes it must be >= 4"):
        RNAEncoder.fit(toy.adata, RNAVAEConfig(n_genes=60, hidden=(8, 8), latent_dim=4), VAETrainConfig(batch_size=3))
    model = RNACDM(cascade_preset("tiny", 4))
    tiles = np.zeros((3, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"global batch \(1 tiles.*smaller than the number of processes \(2\)"):
        train_cascade(model, tiles, np.zeros((3, 4), np.float32), CascadeTrainConfig(batch_size=1), stages=("base",))
    net = PumaMedNet(replace(PRESETS["tiny"], batch_size=1))
    with pytest.raises(ValueError, match=r"batch_size \(1\) is the global batch and must be >= the number of processes"):
        fit_vae(net, torch.from_numpy(make_synthetic_cxr(4, size=32, seed=0).images))
    with pytest.raises(ValueError, match=r"smaller than 2 per process times the world size \(2\)"):
        bdist.rank_share(3, min_per_rank=2)


@pytest.mark.parametrize("n,world", [(7, 2), (9, 4), (5, 5), (6, 1)])
def test_rank_share_matches_rank_batches(monkeypatch, n, world):
    parts = []
    for r in range(world):
        monkeypatch.setattr(bdist, "rank", lambda r=r: r)
        monkeypatch.setattr(bdist, "world_size", lambda: world)
        sl, scale = bdist.rank_share(n)
        (idx, scale_b), = list(bdist.rank_batches(np.arange(n), n))
        np.testing.assert_array_equal(np.arange(n)[sl], idx)
        assert scale == pytest.approx(scale_b)
        parts.append(np.arange(n)[sl])
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
