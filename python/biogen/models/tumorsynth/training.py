"""TumorSynth training: the GAN loop with KID/diversity tracking, checkpoints, resume and sampling."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ...utils import save_figure, write_json

log = logging.getLogger("biogen.tumorsynth")

from .networks import TumorSynthConfig, build_models


# ------------------------------------------------------------------------------------ training


@dataclass
class EpochRecord:
    epoch: int
    loss_d: float
    loss_g: float
    d_real: float  # mean D(x) probability on real images
    d_fake: float
    kid: float
    kid_std: float
    diversity: float  # mean pairwise feature distance of samples / the same for real images
    seconds: float


@dataclass
class TrainResult:
    out_dir: Path
    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = -1
    extractor: str = ""


def _pairwise_mean(f: np.ndarray) -> float:
    d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    n = len(f)
    return float(d.sum() / max(1, n * (n - 1)))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


CHECKPOINT_FORMAT, GENERATOR_FORMAT, FORMAT_VERSION = "biogen.tumorsynth.checkpoint", "biogen.tumorsynth.generator", 1
_REDO = "start the run again in a new --out folder"


def _save_checkpoint(ckpt_root: Path, G, D, opt_g, opt_d, state: dict) -> None:
    """Write the epoch's checkpoint into a new folder swapped in whole for ``last`` (never half-written),
    with a manifest of sizes and checksums."""
    from safetensors.torch import save_file

    from ..._io import replacing_dir, write_manifest

    with replacing_dir(ckpt_root / "last", overwrite=True) as new:
        save_file(_cpu_state(G), str(new / "generator.safetensors"))
        save_file(_cpu_state(D), str(new / "discriminator.safetensors"))
        torch.save({"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}, new / "optim.pt")
        (new / "state.json").write_text(json.dumps(state, indent=2))
        write_manifest(new, CHECKPOINT_FORMAT, FORMAT_VERSION)


def _find_checkpoint(ckpt_root: Path) -> Optional[Path]:
    last = ckpt_root / "last"
    if last.exists():
        return last
    # where the OS cannot swap two folders in one step, a crash between the two renames leaves it here
    old = sorted(ckpt_root.glob(".last.old-*"))
    return old[-1] if old else None


def verify_checkpoint(ckpt: Path) -> dict:
    """The trainer state of a checkpoint folder, after checking its files against the manifest."""
    from ..._io import read_json, verify_folder

    verify_folder(ckpt, CHECKPOINT_FORMAT, version=FORMAT_VERSION, what="TumorSynth checkpoint", redo=_REDO)
    return read_json(ckpt / "state.json", what="TumorSynth trainer state", hint=_REDO)


def checkpoint_note(out_dir: str | Path, resume: str) -> str:
    """What an interrupted ``train`` kept in ``out_dir`` (for the Ctrl-C message)."""
    from ...checkpoint import checkpoint_note as note

    ckpt = _find_checkpoint(Path(out_dir) / "checkpoints") or Path(out_dir) / "checkpoints" / "last"
    return note(ckpt, resume, verify=verify_checkpoint, epochs_done=lambda s: s["epoch"] + 1)


def _plot_history(history: list[EpochRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h.epoch for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    axes[0].plot(ep, [h.loss_d for h in history], "o-", label="discriminator")
    axes[0].plot(ep, [h.loss_g for h in history], "o-", label="generator")
    axes[0].set(title="BCE loss per epoch", xlabel="epoch")
    axes[0].legend()
    axes[1].errorbar(ep, [h.kid for h in history], yerr=[h.kid_std for h in history], fmt="o-")
    axes[1].set(title="KID vs held-out real (lower is better)", xlabel="epoch")
    axes[2].plot(ep, [h.diversity for h in history], "o-")
    axes[2].axhline(1.0, color="gray", ls="--", lw=1)
    axes[2].set(title="sample diversity / real diversity\n(well below 1: mode collapse)", xlabel="epoch")
    save_figure(fig, path, dpi=100)


def default_extractor(images: np.ndarray, labels: Optional[np.ndarray], seed: int = 0):
    """A domain feature extractor for KID/diversity: a small CNN trained to tell the classes apart
    when labels with two or more classes are given, else the same CNN with seeded random weights."""
    from ...metrics import DomainCNN, DomainFeatures

    if labels is not None and len(np.unique(labels)) > 1:
        feats = DomainFeatures.train(images, labels, epochs=3, seed=seed)
        feats.name = "domain-cnn (trained on the training images)"
        return feats
    torch.manual_seed(seed)
    feats = DomainFeatures(DomainCNN(images.shape[1], 2))
    feats.name = "domain-cnn (random weights)"
    return feats


def train(
    images: np.ndarray,
    labels: Optional[np.ndarray] = None,
    *,
    config: TumorSynthConfig = TumorSynthConfig(),
    out_dir: str | Path,
    resume: bool = False,
    extractor=None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train a TumorSynth GAN with BCE, Adam(lr, beta1), checkpointing every epoch.

    Runs unchanged under ``torchrun --nproc_per_node N`` (see :mod:`biogen.distributed`): G and D are
    wrapped in DistributedDataParallel, ``config.batch_size`` is the *global* batch and each rank
    trains on its contiguous ``batch_size / N`` slice of it (the same images and noise vectors a single
    process would use), so one step on N ranks equals one single-process step up to floating-point
    reduction order (and dropout masks, which are drawn per rank). Losses are averaged across ranks;
    only rank 0 evaluates KID, writes checkpoints, sample grids and the history. Checkpoints hold plain
    (unwrapped) weights, so a run resumes with any number of processes.

    Parameters
    ----------
    images : (n, 1, S, S) float in [-1, 1], S = config.image_size.
    labels : (n,) int class per image (needed when ``config.conditional``), optional otherwise.
    out_dir : receives ``checkpoints/last`` (weights, optimiser and RNG state, resumable),
        ``best_generator.safetensors`` (epoch with the lowest KID against held-out real images),
        ``samples_epoch_XXX.png``, ``history.json``, ``history.png`` (losses, KID, diversity).
    resume : continue from ``out_dir/checkpoints/last`` if present.
    extractor : feature extractor for KID/diversity; default :func:`default_extractor` (rank 0 only).
    device : where to train; default :func:`biogen.distributed.device` (this rank's GPU, else CPU).
    """
    from ... import distributed as bdist
    from ..._io import save_safetensors
    from tqdm.auto import tqdm

    from ...data.images import save_grid

    images = np.asarray(images, np.float32)
    S = config.image_size
    if images.ndim != 4 or images.shape[1:] != (1, S, S):
        raise ValueError(f"images must have shape (n, 1, {S}, {S}), got {images.shape}")
    if not np.isfinite(images).all() or images.min() < -1.0001 or images.max() > 1.0001:
        raise ValueError("images must be finite and scaled to [-1, 1]")
    if config.conditional and labels is None:
        raise ValueError("config.conditional is True: pass labels")
    if labels is not None:
        labels = np.asarray(labels, np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if config.conditional and (labels.min() < 0 or labels.max() >= config.n_classes):
            raise ValueError(f"labels must be in 0..{config.n_classes - 1}")
    out_dir = Path(out_dir)
    bdist.init()
    world, main = bdist.world_size(), bdist.is_main()
    shard = bdist.split_batch(config.batch_size)  # validates divisibility before any work
    dev = torch.device(device) if device is not None else bdist.device()
    rng = np.random.default_rng(config.seed)
    perm = rng.permutation(len(images))
    n_held = max(2, int(round(len(images) * config.heldout_fraction)))
    held_idx, train_idx = perm[:n_held], perm[n_held:]
    if len(train_idx) < config.batch_size:
        raise ValueError(f"batch size {config.batch_size} is larger than the training set ({len(train_idx)} "
                         f"images after holding out {n_held} for KID): use a smaller batch or more images")
    x_train = torch.from_numpy(images[train_idx])
    y_train = None if labels is None else torch.from_numpy(labels[train_idx])
    held = images[held_idx]
    torch.manual_seed(config.seed)
    G, D = build_models(config, dev)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    from ...metrics import extract, kid_from_features

    if main:  # evaluation is rank 0's job; the other ranks never need the extractor
        if extractor is None:
            extractor = default_extractor(images[train_idx], None if labels is None else labels[train_idx],
                                          config.seed)
        held_feats = extract(extractor, held)
        real_div = _pairwise_mean(held_feats)
    extractor_name = bdist.broadcast_object(extractor.name if main else None)
    gen = torch.Generator().manual_seed(config.seed + 1)
    z_eval = torch.randn(config.n_eval_samples, config.noise_dim, generator=gen)
    y_eval = torch.arange(config.n_eval_samples) % config.n_classes if config.conditional else None

    result = TrainResult(out_dir, extractor=extractor_name)
    start_epoch, best_kid = 0, math.inf
    ckpt_root = out_dir / "checkpoints"
    found = _find_checkpoint(ckpt_root) if resume else None
    if resume and found is None:
        log.info("no checkpoint under %s: starting from scratch", ckpt_root)
    if found is not None:
        from ..._io import load_safetensors, torch_load
        from ...errors import IncompatibleError

        state = verify_checkpoint(found)
        if state["config"] != asdict(config) | {"epochs": state["config"]["epochs"]}:
            diff = {k: (v, asdict(config)[k]) for k, v in state["config"].items()
                    if k != "epochs" and asdict(config).get(k) != v}
            raise IncompatibleError(f"was trained with another configuration (checkpoint vs now: {diff})", path=found,
                                    hint="resume with the same options, or train into a new --out folder")
        try:
            G.load_state_dict(load_safetensors(found / "generator.safetensors", what="generator weights"))
            D.load_state_dict(load_safetensors(found / "discriminator.safetensors", what="discriminator weights"))
        except RuntimeError as exc:  # torch lists every mismatched tensor
            raise IncompatibleError(f"holds weights of another architecture ({exc})", path=found, hint=_REDO) from exc
        opt = torch_load(found / "optim.pt", map_location=dev, what="optimizer state")
        opt_g.load_state_dict(opt["opt_g"])
        opt_d.load_state_dict(opt["opt_d"])
        result.history = [EpochRecord(**h) for h in state["history"]]
        start_epoch, best_kid, result.best_epoch = state["epoch"] + 1, state["best_kid"], state["best_epoch"]
        gen.set_state(torch.tensor(state["shuffle_rng"], dtype=torch.uint8))
    elif out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise FileExistsError(f"output folder {out_dir} is not empty; choose another or resume")
    bdist.barrier()  # every rank has checked / read the folder before rank 0 writes into it
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # D sees real and fake images in one call: one forward per DDP step keeps the gradient hooks simple.
    Gd, Dd = bdist.wrap_ddp(G), bdist.wrap_ddp(D)
    bce = nn.BCEWithLogitsLoss()
    n_batches = len(x_train) // config.batch_size
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        # Dropout draws from the global RNG, seeded per (seed, epoch, rank): resumable without saving
        # per-rank RNG state, and different masks on different ranks.
        torch.manual_seed(int(np.random.default_rng([config.seed, epoch, bdist.rank()]).integers(2**62)))
        G.train(), D.train()
        order = torch.randperm(len(x_train), generator=gen)
        sums = np.zeros(4)
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not (progress and main),
                   leave=False)
        for b in bar:
            # Every rank draws the whole global batch's indices and noise (same generator state), then
            # keeps its slice: the union over ranks is exactly the single-process batch.
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            z = torch.randn(len(idx), config.noise_dim, generator=gen)[shard].to(dev)
            idx = idx[shard]
            real = x_train[idx].to(dev)
            lab = None if y_train is None or not config.conditional else y_train[idx].to(dev)
            fake = Gd(z, lab)
            n = len(idx)
            logits = Dd(torch.cat([real, fake.detach()]), None if lab is None else torch.cat([lab, lab]))
            d_real, d_fake = logits[:n], logits[n:]
            loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # The generator step goes through the unwrapped D: its gradients w.r.t. D's weights are
            # discarded (zeroed before D's next step), so synchronising them would be wasted traffic.
            out = D(fake, lab)
            loss_g = bce(out, torch.ones_like(out))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            sums += [loss_d.item(), loss_g.item(), torch.sigmoid(d_real).mean().item(), torch.sigmoid(d_fake).mean().item()]
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        sums = bdist.all_reduce_mean(sums)  # equal shards: the mean of rank means is the global mean
        rec = None
        if main:
            G.eval()
            with torch.no_grad():
                samples = G(z_eval.to(dev), None if y_eval is None else y_eval.to(dev)).cpu().numpy()
            feats = extract(extractor, samples)
            kid, kid_std = kid_from_features(held_feats, feats, subsets=20,
                                             subset_size=min(len(feats), len(held_feats), 200), seed=epoch)
            rec = EpochRecord(epoch, *(sums / max(1, n_batches)).tolist(), kid, kid_std,
                              _pairwise_mean(feats) / max(real_div, 1e-12), time.perf_counter() - t0)
        rec = bdist.broadcast_object(rec)
        result.history.append(rec)
        kid_is_best = rec.kid < best_kid
        if kid_is_best:
            best_kid, result.best_epoch = rec.kid, epoch
        if not main:
            continue
        kid = rec.kid
        save_grid(samples[:32], out_dir / f"samples_epoch_{epoch:03d}.png")
        if kid_is_best:
            save_safetensors(_cpu_state(G), out_dir / "best_generator.safetensors", fmt=GENERATOR_FORMAT,
                             version=FORMAT_VERSION, metadata={"epoch": str(epoch)})
        state = {"epoch": epoch, "best_kid": best_kid, "best_epoch": result.best_epoch,
                 "config": asdict(config), "history": [asdict(h) for h in result.history],
                 "shuffle_rng": gen.get_state().tolist(), "extractor": extractor.name, "world_size": world}
        _save_checkpoint(ckpt_root, G, D, opt_g, opt_d, state)
        write_json(out_dir / "history.json", {"config": asdict(config), "extractor": extractor.name,
                                              "best_epoch": result.best_epoch,
                                              "history": [asdict(h) for h in result.history]})
        _plot_history(result.history, out_dir / "history.png")
        log.info("epoch %d: loss_d %.3f loss_g %.3f KID %.4f diversity %.2f", epoch, rec.loss_d, rec.loss_g, kid, rec.diversity)
    bdist.barrier()  # the last checkpoint is complete before any rank returns (and, e.g., reads it)
    return result


def load_generator(run_dir: str | Path, *, best: bool = True) -> tuple[nn.Module, TumorSynthConfig]:
    """The generator of a training run (its best-KID epoch, or the last checkpoint); every file is
    checked (sizes, checksums) before it is loaded."""
    from ..._io import load_safetensors, load_safetensors_verified
    from ...errors import IncompatibleError, MissingFileError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError("is not a folder (pass the --out folder of 'biogen tumorsynth train')", path=run_dir)
    ckpt = _find_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise MissingFileError("holds no TumorSynth checkpoint (checkpoints/last is missing)", path=run_dir,
                               hint="pass the --out folder of 'biogen tumorsynth train'")
    config = TumorSynthConfig(**verify_checkpoint(ckpt)["config"])
    G, _ = build_models(config)
    best_path = run_dir / "best_generator.safetensors"
    if best and best_path.exists():
        weights, path = load_safetensors_verified(best_path, fmt=GENERATOR_FORMAT, version=FORMAT_VERSION,
                                                  what="TumorSynth generator", redo=_REDO)[0], best_path
    else:
        path = ckpt / "generator.safetensors"
        weights = load_safetensors(path, what="generator weights")
    try:
        G.load_state_dict(weights)
    except RuntimeError as exc:
        raise IncompatibleError(f"does not fit the generator of {ckpt} ({exc})", path=path, hint=_REDO) from exc
    return G.eval(), config


@torch.no_grad()
def sample(G: nn.Module, n: int, *, labels: Optional[torch.Tensor] = None, seed: int = 0) -> np.ndarray:
    """``n`` images (n, 1, S, S) in [-1, 1] from a generator, reproducible with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.noise_dim, generator=g)
    if G.n_classes and labels is None:
        labels = torch.arange(n) % G.n_classes
    return G.eval()(z, labels).numpy()
