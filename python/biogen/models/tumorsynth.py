"""TumorSynth: GANs for 128 x 128 grayscale brain MRI (seed 003, SPEC 3.3).

Layer lists follow the slides; with 'same' padding and biases the parameter counts are:
- Discriminator: 582,785; Generator 1: 27,265,281; G1 + D = 27,848,066 (the slides' number).
- Generator 2 (encoder-decoder): 427,009,793; G2 + D = 427,592,578. This is what the slides' layer
  list gives; the slides also report 427,362,946 (229,632 fewer), which no reading of the listed
  layers reproduces, so biogen implements the layer list.
The discriminator ends in a Dense(1) logit; the sigmoid lives in the loss (BCE with logits), which
is the same model and numerically safer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..utils import atomic_path, write_json

log = logging.getLogger("biogen.tumorsynth")


@dataclass
class TumorSynthConfig:
    """Training configuration; defaults are the seed's (SPEC 3.3)."""

    generator: str = "g1"  # "g1" (dense + transposed convs) or "g2" (dense + encoder-decoder)
    image_size: int = 128
    noise_dim: int = 100
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    epochs: int = 10
    conditional: bool = False  # condition G and D on the class (tumour / no tumour)
    n_classes: int = 2
    leaky_slope: float = 0.2
    dropout: float = 0.4
    heldout_fraction: float = 0.2  # real images kept out of training to score KID per epoch
    n_eval_samples: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.generator not in ("g1", "g2"):
            raise ValueError(f"generator must be 'g1' or 'g2', got {self.generator!r}")
        if self.image_size % 8 or self.image_size < 16:
            raise ValueError(f"image_size must be a multiple of 8 and >= 16, got {self.image_size}")
        for name in ("noise_dim", "batch_size", "epochs", "n_classes", "n_eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


_EMB = 50  # label embedding width of the conditional variants (Keras cGAN convention)


def _same_conv_k4(cin: int, cout: int) -> nn.Sequential:
    """Keras Conv2D(k=4, padding='same'): pad 1 before and 2 after, as TensorFlow does for even kernels."""
    return nn.Sequential(nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(cin, cout, 4))


class Discriminator(nn.Module):
    """Conv(64,k3) -> Conv(128,k3,s2) -> Conv(128,k3,s2) -> Conv(256,k3,s2), LeakyReLU after each,
    Flatten, Dropout(0.4), Dense(1). Input (B, 1, S, S) in [-1, 1]; output (B, 1) logits."""

    def __init__(self, image_size: int = 128, channels: int = 1, n_classes: int = 0,
                 slope: float = 0.2, dropout: float = 0.4):
        super().__init__()
        self.n_classes = n_classes
        cin = channels + (1 if n_classes else 0)
        if n_classes:
            self.label_emb = nn.Embedding(n_classes, _EMB)
            self.label_map = nn.Linear(_EMB, image_size * image_size)
        self.image_size = image_size
        act = lambda: nn.LeakyReLU(slope)  # noqa: E731
        self.net = nn.Sequential(
            nn.Conv2d(cin, 64, 3, padding=1), act(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), act(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), act(),
            nn.Conv2d(128, 256, 3, stride=2, padding=1), act(),
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(256 * (image_size // 8) ** 2, 1),
        )

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.n_classes:
            if labels is None:
                raise ValueError("this discriminator is conditional: pass labels")
            lab = self.label_map(self.label_emb(labels)).view(-1, 1, self.image_size, self.image_size)
            x = torch.cat([x, lab], 1)
        return self.net(x)


class _GeneratorBase(nn.Module):
    def __init__(self, noise_dim: int, n_classes: int):
        super().__init__()
        self.noise_dim, self.n_classes = noise_dim, n_classes
        if n_classes:
            self.label_emb = nn.Embedding(n_classes, _EMB)

    def _input(self, z: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (batch, {self.noise_dim}), got {tuple(z.shape)}")
        if self.n_classes:
            if labels is None:
                raise ValueError("this generator is conditional: pass labels")
            z = torch.cat([z, self.label_emb(labels)], 1)
        return z


class Generator1(_GeneratorBase):
    """Dense(S/4 * S/4 * 256) + LeakyReLU -> ConvT(128,k4,s2) -> ConvT(128,k4,s2) (LeakyReLU) ->
    Conv(1,k4,'same',tanh). (B, noise_dim) -> (B, 1, S, S) in [-1, 1]."""

    def __init__(self, image_size: int = 128, noise_dim: int = 100, n_classes: int = 0, slope: float = 0.2):
        super().__init__(noise_dim, n_classes)
        self.s0 = image_size // 4
        self.fc = nn.Linear(noise_dim + (_EMB if n_classes else 0), self.s0 * self.s0 * 256)
        self.act = nn.LeakyReLU(slope)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 4, stride=2, padding=1), nn.LeakyReLU(slope),
            nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.LeakyReLU(slope),
            _same_conv_k4(128, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.fc(self._input(z, labels))).view(-1, 256, self.s0, self.s0)
        return self.net(h)


class Generator2(_GeneratorBase):
    """Dense(S * S * 256) + LeakyReLU -> Conv 512/256/128 (k3, s2) -> ConvT 128/256/512 (k2, s2) ->
    Conv(1,k4,'same',tanh), LeakyReLU between. (B, noise_dim) -> (B, 1, S, S)."""

    def __init__(self, image_size: int = 128, noise_dim: int = 100, n_classes: int = 0, slope: float = 0.2):
        super().__init__(noise_dim, n_classes)
        self.s0 = image_size
        self.fc = nn.Linear(noise_dim + (_EMB if n_classes else 0), image_size * image_size * 256)
        a = lambda: nn.LeakyReLU(slope)  # noqa: E731
        self.act = a()
        self.net = nn.Sequential(
            nn.Conv2d(256, 512, 3, stride=2, padding=1), a(),
            nn.Conv2d(512, 256, 3, stride=2, padding=1), a(),
            nn.Conv2d(256, 128, 3, stride=2, padding=1), a(),
            nn.ConvTranspose2d(128, 128, 2, stride=2), a(),
            nn.ConvTranspose2d(128, 256, 2, stride=2), a(),
            nn.ConvTranspose2d(256, 512, 2, stride=2), a(),
            _same_conv_k4(512, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.fc(self._input(z, labels))).view(-1, 256, self.s0, self.s0)
        return self.net(h)


def build_models(config: TumorSynthConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Discriminator]:
    n_cls = config.n_classes if config.conditional else 0
    G = (Generator1 if config.generator == "g1" else Generator2)(
        config.image_size, config.noise_dim, n_cls, config.leaky_slope)
    D = Discriminator(config.image_size, 1, n_cls, config.leaky_slope, config.dropout)
    return G.to(device), D.to(device)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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


def _save_checkpoint(ckpt_root: Path, G, D, opt_g, opt_d, state: dict) -> None:
    """Write the epoch's checkpoint as a folder swapped in whole, so ``last`` is never half-written."""
    from safetensors.torch import save_file

    new, last, old = ckpt_root / "last.new", ckpt_root / "last", ckpt_root / "last.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    save_file(_cpu_state(G), str(new / "generator.safetensors"))
    save_file(_cpu_state(D), str(new / "discriminator.safetensors"))
    torch.save({"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}, new / "optim.pt")
    (new / "state.json").write_text(json.dumps(state, indent=2))
    if last.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(last, old)
    os.replace(new, last)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(ckpt_root: Path) -> Optional[Path]:
    for name in ("last", "last.old"):  # last.old survives a crash between the two renames
        p = ckpt_root / name
        if (p / "state.json").is_file():
            return p
    return None


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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def default_extractor(images: np.ndarray, labels: Optional[np.ndarray], seed: int = 0):
    """A domain feature extractor for KID/diversity: a small CNN trained to tell the classes apart
    when labels with two or more classes are given, else the same CNN with seeded random weights."""
    from ..metrics import DomainCNN, DomainFeatures

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
    from .. import distributed as bdist
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..data.images import save_grid

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
    from ..metrics import extract, kid_from_features

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
        state = json.loads((found / "state.json").read_text())
        if state["config"] != asdict(config) | {"epochs": state["config"]["epochs"]}:
            raise ValueError(f"checkpoint {found} was trained with another configuration: {state['config']}")
        G.load_state_dict(load_file(str(found / "generator.safetensors")))
        D.load_state_dict(load_file(str(found / "discriminator.safetensors")))
        opt = torch.load(found / "optim.pt", weights_only=False, map_location=dev)
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
            with atomic_path(out_dir / "best_generator.safetensors") as tmp:
                save_file(_cpu_state(G), str(tmp))
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
    """The generator of a training run (its best-KID epoch, or the last checkpoint)."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    ckpt = _find_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} holds no TumorSynth checkpoint (checkpoints/last/state.json)")
    config = TumorSynthConfig(**json.loads((ckpt / "state.json").read_text())["config"])
    G, _ = build_models(config)
    weights = run_dir / "best_generator.safetensors" if best and (run_dir / "best_generator.safetensors").is_file() \
        else ckpt / "generator.safetensors"
    G.load_state_dict(load_file(str(weights)))
    return G.eval(), config


@torch.no_grad()
def sample(G: nn.Module, n: int, *, labels: Optional[torch.Tensor] = None, seed: int = 0) -> np.ndarray:
    """``n`` images (n, 1, S, S) in [-1, 1] from a generator, reproducible with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, G.noise_dim, generator=g)
    if G.n_classes and labels is None:
        labels = torch.arange(n) % G.n_classes
    return G.eval()(z, labels).numpy()
