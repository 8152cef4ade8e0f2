"""``biogen rnacdm train-vae | train | sample | evaluate | demo`` and the evaluation pipeline they share."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..._io import read_h5ad
from ...cliargs import add_device, add_no_progress, add_out, add_resume, add_seed, command_group, resolve_device

__all__ = ["add_cli", "evaluate_generated", "run_demo"]


# ------------------------------------------------------------------------------------ shared pieces


def _latents_per_tile(encoder, paired) -> np.ndarray:
    z = encoder.encode(paired.adata)
    return z[paired.sample_index]


def _intended_fractions(adata, rna: Optional[np.ndarray] = None, fractions_key: Optional[str] = None) -> Optional[np.ndarray]:
    """Fractions implied by the RNA: deconvolution on ``uns['signatures']`` or ``obsm[fractions_key]``."""
    from ...data.toy_tissue import deconvolve

    if fractions_key is not None:
        if fractions_key not in adata.obsm:
            raise KeyError(f"fractions key {fractions_key!r} not in obsm (have: {list(adata.obsm.keys())})")
        return np.asarray(adata.obsm[fractions_key], np.float64)
    if "signatures" in adata.uns:
        X = rna if rna is not None else (adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X))
        return deconvolve(X, np.asarray(adata.uns["signatures"], np.float64))
    return None


def evaluate_generated(model, z: np.ndarray, intended: Optional[np.ndarray], *, tiles_per_sample: int = 2,
                       scheduler: str = "dpmsolver++", steps: int = 25, sr_steps: Optional[int] = None,
                       guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 32,
                       stages: tuple = ("base", "sr")) -> dict:
    """Generate ``tiles_per_sample`` tiles per latent (seeded per batch) and count their nuclei.

    z: (n_samples, latent_dim); intended: (n_samples, n_types) or None. Returns dict with
    ``tiles`` (n_samples * k, 3, S, S), ``counted`` fractions, ``intended`` (repeated per tile) and
    ``fidelity`` (:class:`CompositionFidelity` or None).
    """
    import torch

    from ...data.toy_tissue import CELL_TYPES, NucleusCounter
    from ...metrics import composition_fidelity

    zr = np.repeat(np.asarray(z, np.float32), tiles_per_sample, axis=0)
    out = []
    for i in range(0, len(zr), batch_size):
        g = torch.Generator().manual_seed(seed * 100003 + i)
        out.append(model.sample(torch.from_numpy(zr[i:i + batch_size]), scheduler=scheduler, steps=steps,
                                sr_steps=sr_steps, guidance_scale=guidance_scale, generator=g,
                                stages=stages).cpu().numpy())
    tiles = np.concatenate(out)
    counter = NucleusCounter()
    counted = counter.fractions(counter.count_many(tiles))
    res = {"tiles": tiles, "counted": counted, "intended": None, "fidelity": None}
    if intended is not None:
        it = np.repeat(np.asarray(intended), tiles_per_sample, axis=0)
        res["intended"] = it
        res["fidelity"] = composition_fidelity(counted, it, CELL_TYPES)
    return res


def _fid_kid(real: np.ndarray, fake: np.ndarray, train_images: np.ndarray, train_labels: np.ndarray, seed: int = 0) -> dict:
    from ...metrics import DomainFeatures, evaluate_images

    ext = DomainFeatures.train(train_images, train_labels, epochs=3, seed=seed)
    n = min(len(real), len(fake))
    s = evaluate_images(real, fake, ext, kid_subsets=20, kid_subset_size=max(2, n // 2), seed=seed)
    return asdict(s)


def _js(obj):
    """Dataclasses / numpy scalars to JSON-able values; NaN (undefined correlation) becomes null."""
    import math

    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _js(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_js(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _grid_rows(rows: list[np.ndarray], path: Path, ncol: int) -> None:
    from ...data.images import save_grid

    imgs = np.concatenate(rows)
    save_grid(imgs, path, nrow=ncol)


# ------------------------------------------------------------------------------------ demo


def run_demo(out: str | Path, *, minutes: float = 4.0, preset: str = "cpu", n_samples: int = 120,
             tiles_per_sample: int = 4, eval_tiles_per_sample: int = 2, steps: int = 25, sr_steps: int = 15,
             guidance_scale: float = 3.0, perturb_amount: float = 0.3, seed: int = 0, overwrite: bool = False,
             log: Optional[Callable[[str], None]] = None, downstream: bool = True, downstream_samples: int = 60,
             downstream_label: str = "cancer_type", downstream_config=None, device=None) -> dict:
    """Toy tissue -> RNA beta-VAE -> cascade (``preset``) -> grids, composition fidelity, perturbation,
    FID/KID; writes everything under ``out`` and returns the metrics dict (also ``metrics.json``).

    With ``downstream`` it also tests whether pretraining a tile classifier on generated tiles helps
    (:mod:`biogen.models.rna_cdm.downstream`): tiles generated from the cascade's training samples' RNA, k-fold
    cross-validation on the real tiles of ``downstream_samples`` freshly simulated samples that
    neither the VAE nor the cascade saw, labelled by ``downstream_label``.

    ``device``: where the VAE and the cascade train and sample (default: the CPU, or this process's
    device under torchrun); the downstream tile classifier trains on the CPU.

    Under torchrun every process trains the VAE and the cascade (DDP, global batches split across
    the processes); rank 0 alone writes, logs and evaluates, and every rank returns its metrics.
    """
    import torch

    from ... import distributed as bdist
    from ...data.paired import load_paired
    from ...data.toy_tissue import CELL_TYPES, ToyTissueConfig, perturb_rna, simulate_toy_tissue
    from ...metrics import perturbation_effect, plot_composition
    from ...utils import prepare_output_dir, write_json
    from .cascade import CascadeTrainConfig, RNACDM, cascade_preset, train_cascade
    from .vae import RNAEncoder, RNAVAEConfig, VAETrainConfig, plot_latents

    log = log or (lambda msg: print(msg, flush=True))  # flushed: progress shows when stdout is a file
    bdist.init()
    main = bdist.is_main()
    if not main:
        log = lambda msg: None  # noqa: E731
    t_start = time.perf_counter()
    out = prepare_output_dir(out, overwrite=overwrite)
    bdist.barrier()  # every process has checked the folder before rank 0 writes into it
    torch.manual_seed(seed)
    probe = cascade_preset(preset, 16)
    tcfg = ToyTissueConfig(tile_size=probe.sr_size)
    log(f"simulating toy tissue: {n_samples} samples x {tiles_per_sample} tiles of {tcfg.tile_size} px")
    toy = simulate_toy_tissue(n_samples, tiles_per_sample, tcfg, seed=seed)
    if main:
        toy.write(out / "data" / "rna.h5ad", out / "data" / "tiles")
    bdist.barrier()  # the others read what rank 0 wrote
    paired = load_paired(out / "data" / "rna.h5ad", out / "data" / "tiles")
    adata = paired.adata

    log("training the RNA beta-VAE")
    enc, vh = RNAEncoder.fit(adata, RNAVAEConfig(n_genes=adata.n_vars, hidden=(256, 128), latent_dim=16),
                             VAETrainConfig(epochs=150, batch_size=32, lr=3e-3, warmup_epochs=5, patience=20, seed=seed),
                             device=device)
    z_all = enc.export_latents(adata)
    if main:
        enc.save(out / "vae.safetensors")
        plot_latents(z_all, adata.obs["cancer_type"], out / "latents_umap.png", method="umap", seed=seed)
    test = np.asarray(vh.split["test"], np.int64)
    train_rows = np.setdiff1d(np.arange(adata.n_obs), test)
    log(f"VAE: best epoch {vh.best_epoch + 1}, val loss {min(vh.val_loss):.4f}, test loss {vh.test_loss:.4f}; "
        f"{len(train_rows)} samples train the cascade, {len(test)} are held out for evaluation")

    tile_train = np.isin(paired.sample_index, train_rows)
    x_train = paired.tiles[tile_train]
    z_train = z_all[paired.sample_index[tile_train]]
    model = RNACDM(cascade_preset(preset, enc.latent_dim))
    if device is not None:
        model.to(device)
    budget = minutes * 60.0
    hist = {}
    # the budget is split evenly between the stages (an SR step costs ~2x a base step); the
    # LR schedule follows the clock, so a slower machine trains fewer steps but still anneals
    for stage, share in (("base", 0.5), ("sr", 0.5)):
        log(f"training the {stage} stage for {share * budget:.0f}s")
        hist[stage] = train_cascade(model, x_train, z_train,
                                    CascadeTrainConfig(steps=100000, batch_size=16, lr=2e-3, warmup_steps=20,
                                                       ema_decay=0.99, max_seconds=share * budget, seed=seed),
                                    stages=(stage,), log=log)
    train_seconds = time.perf_counter() - t_start
    if not main:  # evaluation is single-process work: wait for rank 0's metrics
        return bdist.broadcast_object(None)
    model.save(out / "cascade.safetensors", extra={"vae": "vae.safetensors"})

    log(f"generating {eval_tiles_per_sample} tiles for each of {len(test)} held-out samples "
        f"(DPM-Solver++ {steps}+{sr_steps} steps, guidance {guidance_scale})")
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    intended = _intended_fractions(adata, X)[test]
    ev = evaluate_generated(model, z_all[test], intended, tiles_per_sample=eval_tiles_per_sample, steps=steps,
                            sr_steps=sr_steps, guidance_scale=guidance_scale, seed=seed)
    lym = CELL_TYPES.index("lymphocyte")
    rna_p = perturb_rna(X[test], toy.signatures, "lymphocyte", perturb_amount)
    intended_p = _intended_fractions(adata, rna_p)
    ev_p = evaluate_generated(model, enc.encode(rna_p, genes=list(adata.var_names)), intended_p,
                              tiles_per_sample=eval_tiles_per_sample, steps=steps, sr_steps=sr_steps,
                              guidance_scale=guidance_scale, seed=seed)  # same seeds: a paired comparison
    pert = perturbation_effect(ev["counted"], ev_p["counted"], lym, "lymphocyte")
    # the base stage alone (base_size tiles): where the RNA conditioning enters; the SR stage is
    # judged on top of it (a short budget leaves the SR stage the weaker one)
    kw = dict(tiles_per_sample=eval_tiles_per_sample, steps=steps, guidance_scale=guidance_scale, seed=seed,
              stages=("base",))
    evb = evaluate_generated(model, z_all[test], intended, **kw)
    evb_p = evaluate_generated(model, enc.encode(rna_p, genes=list(adata.var_names)), intended_p, **kw)
    pert_b = perturbation_effect(evb["counted"], evb_p["counted"], lym, "lymphocyte")

    real_test = paired.tiles[np.isin(paired.sample_index, test)]
    fk = _fid_kid(real_test, ev["tiles"], x_train, adata.obs["cancer_type"].cat.codes.to_numpy()[paired.sample_index[tile_train]], seed)
    # reference: the same extractor between two halves of real tiles (what "no gap" looks like)
    fk_rr = _fid_kid(real_test[::2], real_test[1::2], x_train,
                     adata.obs["cancer_type"].cat.codes.to_numpy()[paired.sample_index[tile_train]], seed)

    # the counter on real held-out tiles: the ceiling the generated tiles are judged against
    from ...data.toy_tissue import NucleusCounter
    from ...metrics import composition_fidelity

    c = NucleusCounter()
    real_counted = c.fractions(c.count_many(real_test))
    real_intended = _intended_fractions(adata, X)[paired.sample_index[np.isin(paired.sample_index, test)]]
    real_fid = composition_fidelity(real_counted, real_intended, CELL_TYPES)

    # figures
    k = eval_tiles_per_sample
    show = min(8, len(test))
    rows = []
    for i in range(show):
        real_i = paired.tiles[paired.sample_index == test[i]][:k]
        rows += [real_i, ev["tiles"][i * k:(i + 1) * k]]
    _grid_rows(rows, out / "real_vs_generated.png", ncol=k)
    ctype = adata.obs["cancer_type"].astype(str).to_numpy()[test]
    by = []
    for name in np.unique(ctype):
        idx = np.nonzero(ctype == name)[0][:4]
        by.append(np.concatenate([ev["tiles"][j * k:(j * k) + 1] for j in idx]))
    ncol = max(len(b) for b in by)
    by = [np.concatenate([b, np.ones((ncol - len(b),) + b.shape[1:], np.float32)]) for b in by]
    _grid_rows(by, out / "generated_by_cancer_type.png", ncol=ncol)
    _grid_rows([ev["tiles"][: 2 * k * 4: k], ev_p["tiles"][: 2 * k * 4: k]], out / "perturbation_lymphocyte.png",
               ncol=min(8, len(test)))
    plot_composition(ev["counted"], ev["intended"], CELL_TYPES, out / "composition_fidelity.png",
                     title=f"generated tiles: within-type r = {ev['fidelity'].within_type_r:.2f}")

    down = None
    if downstream:
        from .downstream import DownstreamConfig, run_downstream, simulator_labels

        fresh = simulate_toy_tissue(downstream_samples, tiles_per_sample, tcfg, seed=seed + 1)
        size = tcfg.tile_size
        real = fresh.tiles.reshape(-1, size, size, 3).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        log(f"downstream test: a tile classifier on {len(real)} real tiles of {downstream_samples} new samples "
            f"({downstream_label})")
        down = run_downstream(model, z_all[train_rows], simulator_labels(adata, downstream_label)[train_rows],
                              np.asarray(adata.obs_names)[train_rows], real,
                              np.repeat(simulator_labels(fresh.adata, downstream_label), tiles_per_sample),
                              np.repeat([f"new_{i}" for i in fresh.sample_ids], tiles_per_sample), out,
                              downstream_config or DownstreamConfig(seed=seed), per_sample=eval_tiles_per_sample,
                              steps=steps, sr_steps=sr_steps, guidance_scale=guidance_scale, seed=seed, log=log)

    metrics = {
        "preset": preset,
        "n_samples": n_samples,
        "tiles_per_sample": tiles_per_sample,
        "held_out_samples": int(len(test)),
        "generated_tiles": int(len(ev["tiles"])),
        "sampler": {"scheduler": "dpmsolver++", "steps": steps, "sr_steps": sr_steps, "guidance_scale": guidance_scale},
        "vae": {"best_epoch": vh.best_epoch + 1, "val_loss": min(vh.val_loss), "test_loss": vh.test_loss,
                "stopped_early": vh.stopped_early},
        "cascade_training": {s: {"steps": len(h[s]), "final_loss": float(np.mean(h[s][-50:])), "seconds": h["seconds"]}
                             for s, h in hist.items()},
        "composition_fidelity": _js(ev["fidelity"]),
        "composition_fidelity_base_stage": _js(evb["fidelity"]),
        "perturbation_base_stage": _js(pert_b),
        "composition_fidelity_real_tiles": _js(real_fid),
        "perturbation": {**_js(pert), "amount": perturb_amount,
                         "intended_lymphocyte_before": float(intended[:, lym].mean()),
                         "intended_lymphocyte_after": float(intended_p[:, lym].mean())},
        "fid_kid": fk,
        "fid_kid_real_vs_real": fk_rr,
        "downstream": down,
        "seconds": {"train": train_seconds, "total": time.perf_counter() - t_start},
    }
    write_json(out / "metrics.json", _js(metrics))
    f = ev["fidelity"]
    log(f"composition fidelity: within-type r = {f.within_type_r:.3f}, pooled r = {f.pooled_r:.3f} "
        f"(real tiles: {real_fid.within_type_r:.3f}); lymphocyte fraction {pert.mean_before:.3f} -> "
        f"{pert.mean_after:.3f} after perturbation (p = {pert.p_value:.2g}); FID {fk['fid']:.2f} "
        f"(real vs real {fk_rr['fid']:.2f}); base stage: within-type r = {evb['fidelity'].within_type_r:.3f}, "
        f"lymphocyte {pert_b.mean_before:.3f} -> {pert_b.mean_after:.3f} (p = {pert_b.p_value:.2g})")
    if down is not None:
        log(_downstream_line(down))
    log(f"wrote {out}/metrics.json and figures in {time.perf_counter() - t_start:.0f}s")
    return bdist.broadcast_object(metrics)


# ------------------------------------------------------------------------------------ commands


def _output_dir(args) -> Path:
    """Check (every rank) and create the output folder; no rank writes into it before all have checked.

    Under torchrun every process trains and only rank 0 writes (see :mod:`biogen.distributed`).
    """
    from ... import distributed as bdist
    from ...utils import prepare_output_dir

    bdist.init()
    if getattr(args, "resume", False):  # train-vae / train --resume: the folder of the interrupted run
        out = Path(args.out)
        if not (out / "checkpoint" / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume: {out / 'checkpoint'} holds no checkpoint of an earlier "
                                    f"'rnacdm {args.rnacdm_command}'")
    else:
        out = prepare_output_dir(args.out, overwrite=args.overwrite)
    bdist.barrier()
    return out


def _cmd_train_vae(args) -> int:
    from ... import distributed as bdist
    from ...checkpoint import checkpoint_note
    from ...errors import on_interrupt, resume_command
    from ...utils import write_json
    from .vae import RNAEncoder, RNAVAEConfig, VAETrainConfig, plot_latents

    dev = resolve_device(args.device)
    out = _output_dir(args)
    adata = read_h5ad(args.rna, what="--rna file")
    label = None if args.label_key == "none" else args.label_key
    with on_interrupt(lambda: checkpoint_note(out / "checkpoint", resume_command(args.argv))):
        enc, hist = RNAEncoder.fit(
            adata,
            RNAVAEConfig(n_genes=adata.n_vars, hidden=tuple(args.hidden), latent_dim=args.latent, beta=args.beta),
            VAETrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           warmup_epochs=args.warmup_epochs, patience=args.patience, label_key=label, seed=args.seed),
            log=print if args.verbose else None, checkpoint_dir=out / "checkpoint", resume=args.resume, device=dev,
        )
    if not bdist.is_main():
        return 0
    enc.save(out / "vae.safetensors")
    enc.export_latents(adata, args.obsm_key)
    from ...utils import atomic_path

    with atomic_path(out / "latents.h5ad") as tmp:
        adata.write_h5ad(tmp)
    if args.plot != "none" and label is not None:
        plot_latents(adata.obsm[args.obsm_key], adata.obs[label], out / f"latents_{args.plot}.png", method=args.plot)
    write_json(out / "history.json", _js(hist))
    print(f"VAE trained ({len(hist.val_loss)} epochs, best {hist.best_epoch + 1}, val loss {min(hist.val_loss):.4f}); "
          f"wrote {out}/vae.safetensors and latents.h5ad (obsm[{args.obsm_key!r}])")
    return 0


def _cmd_train(args) -> int:
    import torch

    from ... import distributed as bdist
    from ...checkpoint import checkpoint_note
    from ...data.paired import load_paired
    from ...errors import on_interrupt, resume_command
    from ...utils import write_json
    from .cascade import CascadeTrainConfig, RNACDM, cascade_preset, train_cascade
    from .vae import RNAEncoder

    dev = resolve_device(args.device)
    out = _output_dir(args)
    enc = RNAEncoder.load(args.vae)
    paired = load_paired(read_h5ad(args.rna, what="--rna file"), args.tiles, sample_key=args.sample_key,
                         allow_unmatched=args.allow_unmatched)
    if args.init:
        model = RNACDM.load(args.init, preset=args.preset)
    else:
        torch.manual_seed(args.seed)  # the same initial weights in every process (and every run)
        model = RNACDM(cascade_preset(args.preset, enc.latent_dim))
    if model.config.latent_dim != enc.latent_dim:
        raise ValueError(f"the cascade expects latents of {model.config.latent_dim} but the VAE makes {enc.latent_dim}")
    model.to(dev)
    z = _latents_per_tile(enc, paired)
    with on_interrupt(lambda: checkpoint_note(out / "checkpoint", resume_command(args.argv))):
        hist = train_cascade(model, paired.tiles, z,
                             CascadeTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                ema_decay=args.ema, seed=args.seed,
                                                max_seconds=args.minutes * 60 if args.minutes else None),
                             stages=tuple(args.stages), log=lambda msg: print(msg, flush=True),
                             checkpoint_dir=out / "checkpoint", checkpoint_every=args.checkpoint_every,
                             resume=args.resume)
    if bdist.is_main():
        model.save(out / "cascade.safetensors", extra={"vae": str(args.vae)})
        write_json(out / "history.json", _js({**hist, "world_size": bdist.world_size()}))
        print(f"wrote {out}/cascade.safetensors")
    bdist.barrier()  # the checkpoint is complete before any process returns
    return 0


def _cmd_sample(args) -> int:
    import torch

    from ...data.images import save_grid
    from ...utils import atomic_path, prepare_output_dir
    from .cascade import RNACDM
    from .vae import RNAEncoder
    from PIL import Image

    dev = resolve_device(args.device)
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    enc = RNAEncoder.load(args.vae)
    model = RNACDM.load(args.model, preset=args.preset).to(dev)
    adata = read_h5ad(args.rna, what="--rna file")
    if args.samples:
        missing = [s for s in args.samples if s not in adata.obs_names]
        if missing:
            raise ValueError(f"sample id(s) not in {args.rna}: {missing[:5]}")
        adata = adata[args.samples].copy()
    z = enc.encode(adata)
    zr = torch.from_numpy(np.repeat(z, args.per_sample, axis=0))
    g = torch.Generator().manual_seed(args.seed)
    tiles = model.sample(zr, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance,
                         generator=g, progress=not args.no_progress).cpu().numpy()
    for i, sid in enumerate(np.repeat(np.asarray(adata.obs_names), args.per_sample)):
        j = i % args.per_sample
        arr = ((tiles[i].transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
        d = out / str(sid)
        d.mkdir(exist_ok=True)
        with atomic_path(d / f"generated_{j:03d}.png") as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")
    save_grid(tiles, out / "grid.png", nrow=args.per_sample)
    print(f"wrote {len(tiles)} tiles for {adata.n_obs} sample(s) to {out}")
    return 0


def _downstream_line(d: dict) -> str:
    parts = []
    for s in d["summary"]:
        if s["metric"] == "f1_macro" and (s["arm"] != "synthetic" or s["fraction"] == d["config"]["fractions"][0]):
            where = "no real data" if s["arm"] == "synthetic" else f"{s['fraction']:.0%} real"
            parts.append(f"{s['arm']} ({where}) {s['mean']:.3f} ± {s['std']:.3f}")
    sig = [f"{c['a']} vs {c['b']} at {c['fraction']:.0%}: {c['mean_diff']:+.3f} (Holm p {c['p_holm']:.2g})"
           for c in d["comparisons"] if c["metric"] == "f1_macro" and c["significant"]]
    return ("downstream macro F1 (mean ± sd over folds): " + "; ".join(parts)
            + "\nsignificant: " + ("; ".join(sig) or "none"))


def _downstream_config(args):
    from .downstream import DownstreamConfig

    return DownstreamConfig(folds=args.folds, fractions=tuple(args.fractions), epochs=args.downstream_epochs,
                            pretrain_epochs=args.downstream_epochs, seed=args.seed)


def _cmd_evaluate(args) -> int:
    from ...data.paired import load_paired
    from ...data.toy_tissue import CELL_TYPES
    from ...metrics import plot_composition
    from ...utils import prepare_output_dir, write_json
    from .cascade import RNACDM
    from .vae import RNAEncoder

    down_cfg = _downstream_config(args) if args.downstream else None  # bad options fail before any work
    dev = resolve_device(args.device)
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    enc = RNAEncoder.load(args.vae)
    model = RNACDM.load(args.model, preset=args.preset).to(dev)
    paired = load_paired(read_h5ad(args.rna, what="--rna file"), args.tiles, sample_key=args.sample_key,
                         allow_unmatched=args.allow_unmatched,
                         size=model.config.sr_size)
    z = enc.encode(paired.adata)
    intended = _intended_fractions(paired.adata, fractions_key=args.fractions_key)
    ev = evaluate_generated(model, z, intended, tiles_per_sample=args.per_sample, scheduler=args.scheduler,
                            steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
    labels = (paired.adata.obs[args.label_key].astype("category").cat.codes.to_numpy()[paired.sample_index]
              if args.label_key in paired.adata.obs else np.zeros(len(paired.tiles), np.int64))
    metrics = {"fid_kid": _fid_kid(paired.tiles, ev["tiles"], paired.tiles, labels, args.seed),
               "generated_tiles": int(len(ev["tiles"]))}
    if ev["fidelity"] is not None:
        metrics["composition_fidelity"] = _js(ev["fidelity"])
        plot_composition(ev["counted"], ev["intended"], CELL_TYPES, out / "composition_fidelity.png")
    else:
        metrics["composition_fidelity"] = None
        print("note: no uns['signatures'] and no --fractions-key: composition fidelity skipped")
    if down_cfg is not None:
        from .downstream import run_downstream, simulator_labels

        lab = simulator_labels(paired.adata, args.downstream_label)
        ids = np.asarray(paired.adata.obs_names).astype(str)
        metrics["downstream"] = run_downstream(model, z, lab, ids, paired.tiles, lab[paired.sample_index],
                                               ids[paired.sample_index], out, down_cfg, per_sample=args.per_sample,
                                               steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                               log=print)
        print(_downstream_line(metrics["downstream"]))
    metrics = _js(metrics)
    write_json(out / "metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_demo(args) -> int:
    run_demo(args.out, minutes=args.minutes, preset=args.preset, n_samples=args.samples,
             tiles_per_sample=args.tiles_per_sample, eval_tiles_per_sample=args.eval_tiles, steps=args.steps,
             sr_steps=args.sr_steps, guidance_scale=args.guidance, seed=args.seed, overwrite=args.overwrite,
             downstream=not args.no_downstream, downstream_samples=args.downstream_samples,
             downstream_label=args.downstream_label, device=resolve_device(args.device))
    return 0


def add_cli(sub) -> None:
    from .cascade import CASCADE_PRESETS, SCHEDULER_NAMES

    rs = command_group(sub, "rnacdm", metavar="SUBCOMMAND",
                       help="RNA-CDM: RNA beta-VAE + cascaded diffusion from bulk RNA to histology tiles",
                       description="RNA-to-histology synthesis (seeds 000/002): train the RNA beta-VAE, train the "
                       "cascade, sample tiles for RNA profiles, evaluate them, or run the toy-tissue demo.")

    def common(q, out_help):
        add_out(q, out_help)
        add_seed(q)

    q = rs.add_parser("train-vae", help="train the RNA beta-VAE on an .h5ad (one row per sample)",
                      description="Train the beta-VAE on log expression; writes vae.safetensors (weights + z-score "
                      "stats + genes), latents.h5ad and a latent plot.")
    q.add_argument("--rna", required=True, help=".h5ad with X = log expression, one row per sample")
    q.add_argument("--hidden", type=int, nargs="+", default=[6000, 4000], help="hidden sizes (default 6000 4000)")
    q.add_argument("--latent", type=int, default=200, help="latent size (default 200)")
    q.add_argument("--beta", type=float, default=0.005, help="KL weight (default 0.005)")
    q.add_argument("--epochs", type=int, default=200, help="max epochs (default 200)")
    q.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    q.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    q.add_argument("--warmup-epochs", type=int, default=5, help="linear warm-up epochs before cosine decay (default 5)")
    q.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs (default 20)")
    q.add_argument("--label-key", default="cancer_type", help="obs column to stratify the split and colour the plot "
                   "('none' for a random split)")
    q.add_argument("--obsm-key", default="X_rnavae", help="obsm key for the latents (default X_rnavae)")
    q.add_argument("--plot", choices=["umap", "pca", "none"], default="umap", help="latent plot (default umap)")
    q.add_argument("--verbose", action="store_true", help="print the loss of every epoch")
    add_resume(q, "continue an interrupted run from OUT/checkpoint (written after every epoch; same data and "
               "options, --epochs may grow)")
    common(q, "output folder")
    add_device(q)
    q.set_defaults(func=_cmd_train_vae)

    q = rs.add_parser("train", help="train the diffusion cascade on paired RNA + tiles",
                      description="Train the base and/or SR stage on tiles/<sample_id>/*.png paired with the RNA.")
    q.add_argument("--rna", required=True, help=".h5ad, one row per sample")
    q.add_argument("--tiles", required=True, help="folder with one sub-folder of tiles per sample id")
    q.add_argument("--vae", required=True, help="vae.safetensors from train-vae")
    q.add_argument("--preset", choices=list(CASCADE_PRESETS), default="cpu", help="cascade size (default cpu)")
    q.add_argument("--stages", nargs="+", choices=["base", "sr"], default=["base", "sr"],
                   help="stages to train (together in one loop when both; default both)")
    q.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    q.add_argument("--minutes", type=float, default=None, help="optional wall-clock budget")
    q.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    q.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    q.add_argument("--ema", type=float, default=0.99, help="EMA decay of the weights, 0 = off (default 0.99)")
    add_resume(q, "continue an interrupted run from OUT/checkpoint (same data and options): the parameters end as "
               "an uninterrupted run's")
    q.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    q.add_argument("--init", default=None, metavar="CASCADE",
                   help="start from the weights of a cascade.safetensors of the same preset (with --resume, the "
                   "checkpoint's weights replace them)")
    q.add_argument("--sample-key", default=None, help="obs column with sample ids (default obs_names)")
    q.add_argument("--allow-unmatched", action="store_true", help="skip samples without tiles and folders without RNA")
    common(q, "output folder")
    add_device(q)
    q.set_defaults(func=_cmd_train)

    def sampling(q):
        q.add_argument("--model", required=True, help="cascade.safetensors")
        q.add_argument("--vae", required=True, help="vae.safetensors")
        q.add_argument("--preset", choices=list(CASCADE_PRESETS), default=None,
                       help="refuse a checkpoint of another preset")
        q.add_argument("--per-sample", type=int, default=4, help="tiles per sample (default 4)")
        q.add_argument("--scheduler", choices=list(SCHEDULER_NAMES), default="dpmsolver++",
                       help="sampler (default dpmsolver++)")
        q.add_argument("--steps", type=int, default=25, help="sampler steps per stage (default 25)")
        q.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
        add_device(q)

    q = rs.add_parser("sample", help="generate tiles for the RNA profiles of an .h5ad",
                      description="Encode each sample's RNA and generate tiles; writes <out>/<sample>/*.png and grid.png.")
    q.add_argument("--rna", required=True, help=".h5ad with the model's genes")
    q.add_argument("--samples", nargs="+", default=None, help="sample ids to generate for (default all)")
    sampling(q)
    common(q, "output folder")
    add_no_progress(q)
    q.set_defaults(func=_cmd_sample)

    q = rs.add_parser("evaluate", help="FID/KID and composition fidelity of generated tiles",
                      description="Generate tiles for every paired sample; FID/KID vs the real tiles (domain CNN "
                      "features) and, when the RNA carries uns['signatures'] (toy tissue) or --fractions-key, the "
                      "correlation of counted vs RNA-implied cell fractions.")
    q.add_argument("--rna", required=True, help=".h5ad, one row per sample")
    q.add_argument("--tiles", required=True, help="folder with one sub-folder of real tiles per sample id")
    q.add_argument("--fractions-key", default=None, help="obsm key with intended fractions (default: deconvolve)")
    q.add_argument("--label-key", default="cancer_type", help="obs column to train the FID domain CNN on")
    q.add_argument("--downstream", action="store_true", help="also test whether pretraining a small tile classifier on "
                   "generated tiles helps: from scratch / pretrained on generated then fine-tuned / generated only, "
                   "k-fold CV on the real tiles (grouped by sample; a fold never pretrains on tiles generated from its "
                   "test samples). Use samples the cascade did not train on. Writes downstream.png and downstream.md")
    q.add_argument("--downstream-label", default="cancer_type",
                   help="class of a tile: an obs column or 'dominant_cell_type' (from obsm['fractions']; default cancer_type)")
    q.add_argument("--folds", type=int, default=5, help="cross-validation folds of --downstream (default 5)")
    q.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0],
                   help="shares of each fold's real training samples (default 0.1 0.25 1)")
    q.add_argument("--downstream-epochs", type=int, default=15, help="classifier epochs per arm (default 15)")
    q.add_argument("--sample-key", default=None, help="obs column with sample ids (default obs_names)")
    q.add_argument("--allow-unmatched", action="store_true", help="skip samples without tiles and folders without RNA")
    sampling(q)
    common(q, "output folder")
    q.set_defaults(func=_cmd_evaluate, per_sample=2)

    q = rs.add_parser("demo", help="toy tissue end to end in a few minutes (cpu preset)",
                      description="Simulate toy tissue, train the VAE and the cascade within --minutes, then write "
                      "real-vs-generated grids, the composition-fidelity plot, the lymphocyte perturbation and "
                      "metrics.json.")
    q.add_argument("--minutes", type=float, default=4.0, help="cascade training budget (default 4)")
    q.add_argument("--preset", choices=list(CASCADE_PRESETS), default="cpu", help="cascade size (default cpu)")
    q.add_argument("--samples", type=int, default=120, help="toy samples (default 120)")
    q.add_argument("--tiles-per-sample", type=int, default=4, help="real tiles per sample (default 4)")
    q.add_argument("--eval-tiles", type=int, default=2, help="generated tiles per held-out sample (default 2)")
    q.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps, base stage (default 25)")
    q.add_argument("--sr-steps", type=int, default=15, help="DPM-Solver++ steps, SR stage (default 15)")
    q.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3)")
    q.add_argument("--no-downstream", action="store_true", help="skip the synthetic-pretraining test of a tile classifier")
    q.add_argument("--downstream-samples", type=int, default=60,
                   help="new simulated samples whose real tiles the downstream test cross-validates on (default 60)")
    q.add_argument("--downstream-label", default="cancer_type", choices=["cancer_type", "dominant_cell_type"],
                   help="what the downstream tile classifier predicts (default cancer_type)")
    add_device(q)
    common(q, "output folder")
    q.set_defaults(func=_cmd_demo)
