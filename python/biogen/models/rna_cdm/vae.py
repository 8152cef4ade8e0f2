"""RNA beta-VAE of RNA-CDM (SPEC 3.1): bulk expression -> a compact latent that conditions diffusion.

Layers: genes -> hidden[0] -> hidden[1] -> (mu, logvar) of ``latent_dim``; the decoder mirrors it.
Each hidden layer is Linear -> BatchNorm1d -> LeakyReLU. Loss: MSE(recon, x) + beta * KL with the
KL summed over latent dimensions and both terms averaged over the batch (MSE also over genes).

The module (:class:`RNAVAE`) takes tensors only; :class:`RNAEncoder` owns the gene list, the
z-scoring fitted on the training split (saved with the weights and reused at encode time), AnnData
I/O (latents to ``adata.obsm``), training and checkpoints.
"""

from __future__ import annotations

import copy
import os
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import load_training_state, save_training_state
from ...utils import save_figure

__all__ = ["RNAVAE", "RNAVAEConfig", "RNAEncoder", "VAETrainConfig", "VAEHistory", "kl_divergence",
           "plot_latents", "stratified_split"]


@dataclass
class RNAVAEConfig:
    """beta-VAE sizes. Defaults are the paper's (hidden 6000/4000, latent 200, beta 0.005)."""

    n_genes: int
    hidden: Sequence[int] = (6000, 4000)
    latent_dim: int = 200
    beta: float = 0.005
    negative_slope: float = 0.01
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if not isinstance(self.n_genes, int) or self.n_genes < 1:
            raise ValueError(f"n_genes must be a positive integer, got {self.n_genes!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden must be a non-empty sequence of positive sizes, got {self.hidden}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample: (batch, latent) -> (batch,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _mlp(sizes: Sequence[int], slope: float, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.LeakyReLU(slope)]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class RNAVAE(nn.Module):
    """The beta-VAE module. ``forward(x) -> (recon, mu, logvar)``; x: (batch, n_genes) z-scored."""

    def __init__(self, config: RNAVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = _mlp((c.n_genes,) + c.hidden, c.negative_slope, c.dropout)
        self.mu = nn.Linear(c.hidden[-1], c.latent_dim)
        self.logvar = nn.Linear(c.hidden[-1], c.latent_dim)
        self.decoder = nn.Sequential(_mlp((c.latent_dim,) + c.hidden[::-1], c.negative_slope, c.dropout),
                                     nn.Linear(c.hidden[0], c.n_genes))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, n_genes) -> mu, logvar: (batch, latent_dim)."""
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (batch, latent_dim) -> (batch, n_genes) z-scored reconstruction."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                eps: Optional[torch.Tensor] = None):
        """x: (batch, n_genes) -> recon (batch, n_genes), mu, logvar (batch, latent_dim).

        In training, z = mu + eps * sigma with ``eps`` (batch, latent_dim) when given (the trainer
        draws it for the whole global batch under torchrun), else drawn from ``generator``.
        """
        mu, logvar = self.encode(x)
        if self.training:
            if eps is None:
                eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            elif eps.shape != mu.shape:
                raise ValueError(f"eps must have shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
            z = mu + eps.to(mu) * (0.5 * logvar).exp()
        else:
            z = mu
        return self.decode(z), mu, logvar

    def loss(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
             eps: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """x: (batch, n_genes) -> dict(loss, mse, kl) (scalars; kl is the per-sample mean)."""
        recon, mu, logvar = self(x, generator, eps)
        mse = F.mse_loss(recon, x)
        kl = kl_divergence(mu, logvar).mean()
        return {"loss": mse + self.config.beta * kl, "mse": mse, "kl": kl}


@dataclass
class VAETrainConfig:
    """Training: Adam, linear warm-up then cosine decay, early stopping on the validation loss.

    ``val_fraction``/``test_fraction``: stratified split (by ``label_key``) of the samples (paper:
    60/20/20); ``patience``: epochs without validation improvement before stopping (the best
    weights are restored).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_epochs: int = 5
    patience: int = 20
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    label_key: Optional[str] = "cancer_type"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2 (BatchNorm needs 2 samples)")
        if not (0 < self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 < val_fraction, 0 <= test_fraction, sum < 1; got {self.val_fraction}, {self.test_fraction}")
        if self.lr <= 0 or self.warmup_epochs < 0 or self.patience < 1:
            raise ValueError("lr must be > 0, warmup_epochs >= 0, patience >= 1")


@dataclass
class VAEHistory:
    """Per-epoch train/val losses, the best epoch, and the split (sample indices)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    split: dict = field(default_factory=dict)
    test_loss: Optional[float] = None


def stratified_split(n: int, labels: Optional[Sequence], val: float, test: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Indices of a (stratified when ``labels`` is given) train/val/test split of ``n`` samples."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = np.asarray(labels) if labels is not None else None

    def split(ix, frac, s):
        if frac <= 0:
            return ix, ix[:0]
        try:
            return train_test_split(ix, test_size=frac, random_state=seed, stratify=s)
        except ValueError:  # too few samples of a class to stratify: fall back to a random split
            return train_test_split(ix, test_size=frac, random_state=seed)

    rest, te = split(idx, test, strat)
    tr, va = split(rest, val / (1 - test), strat[rest] if strat is not None else None)
    return {"train": np.sort(tr), "val": np.sort(va), "test": np.sort(te)}


def _check_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_genes), got shape {X.shape}")
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} NaN/inf value(s) in {len(rows)} sample(s) "
                         f"(first rows: {rows[:5].tolist()}); impute or drop them first")
    return X


def _dense(X) -> np.ndarray:
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


class RNAEncoder:
    """A trained RNA beta-VAE with its gene list and z-score statistics.

    Attributes: ``module`` (:class:`RNAVAE`), ``genes`` (list of gene names, the input order),
    ``mean``/``std`` (n_genes,) float32 z-score statistics of the training split.
    """

    def __init__(self, module: RNAVAE, genes: Sequence[str], mean: np.ndarray, std: np.ndarray) -> None:
        self.module = module
        self.genes = [str(g) for g in genes]
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        if len(self.genes) != module.config.n_genes or self.mean.shape != (len(self.genes),) or self.std.shape != self.mean.shape:
            raise ValueError("genes, mean and std must all have n_genes entries")

    @property
    def latent_dim(self) -> int:
        return self.module.config.latent_dim

    # ------------------------------------------------------------------ data

    def matrix(self, data, genes: Optional[Sequence[str]] = None) -> np.ndarray:
        """Expression in the model's gene order: AnnData (var_names) or an array with ``genes``.

        Raises ValueError for NaN/inf, genes the model does not know, or model genes missing.
        """
        if hasattr(data, "var_names"):
            genes, X = list(map(str, data.var_names)), _dense(data.X)
        else:
            X = np.asarray(data)
            if genes is None:
                if X.ndim != 2 or X.shape[1] != len(self.genes):
                    raise ValueError(f"an array input must be (n_samples, {len(self.genes)}) in the model's gene "
                                     f"order, got shape {X.shape}; or pass genes=")
                return _check_matrix(X)
        genes = [str(g) for g in genes]
        X = _check_matrix(X)
        if X.shape[1] != len(genes):
            raise ValueError(f"got {X.shape[1]} columns but {len(genes)} gene names")
        known = set(self.genes)
        unknown = [g for g in genes if g not in known]
        if unknown:
            raise ValueError(f"{len(unknown)} gene(s) unknown to this model (first: {unknown[:5]}); "
                             f"subset the data to the model's {len(self.genes)} genes")
        pos = {g: i for i, g in enumerate(genes)}
        missing = [g for g in self.genes if g not in pos]
        if missing:
            raise ValueError(f"{len(missing)} of the model's genes are missing from the data (first: {missing[:5]})")
        return X[:, [pos[g] for g in self.genes]]

    def zscore(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean) / self.std

    # ------------------------------------------------------------------ API

    @torch.no_grad()
    def encode(self, data, genes: Optional[Sequence[str]] = None, batch_size: int = 512) -> np.ndarray:
        """Latent means (n_samples, latent_dim) of AnnData / an expression matrix (log scale)."""
        X = torch.from_numpy(self.zscore(self.matrix(data, genes)))
        self.module.eval()
        return torch.cat([self.module.encode(X[i:i + batch_size])[0] for i in range(0, len(X), batch_size)]
                         or [torch.zeros(0, self.latent_dim)]).numpy()

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents (n, latent_dim) -> expression (n, n_genes) in the input (log) scale."""
        z = torch.as_tensor(np.asarray(z, np.float32))
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be (n, {self.latent_dim}), got {tuple(z.shape)}")
        self.module.eval()
        return self.module.decode(z).numpy() * self.std + self.mean

    def export_latents(self, adata, key: str = "X_rnavae") -> np.ndarray:
        """Write the latent means to ``adata.obsm[key]`` and return them."""
        z = self.encode(adata)
        adata.obsm[key] = z
        return z

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(cls, adata, config: Optional[RNAVAEConfig] = None, train: Optional[VAETrainConfig] = None,
            log=None, device: str | torch.device | None = None, checkpoint_dir: Optional[str] = None,
            resume: bool = False, **config_kw) -> tuple["RNAEncoder", VAEHistory]:
        """Train on AnnData (X = log expression, one row per sample).

        The z-score statistics come from the training split only. Returns the encoder with the
        best-validation weights (on the CPU) and the :class:`VAEHistory`.

        Runs unchanged under ``torchrun --nproc_per_node N`` (see :mod:`biogen.distributed`):
        ``train.batch_size`` is the *global* batch; every rank draws the same permutation and the
        reparameterisation noise of the whole global batch and trains on its contiguous part, under
        DistributedDataParallel. BatchNorm keeps per-rank batch statistics (SyncBatchNorm has no CPU
        implementation in PyTorch): a step on N ranks equals one process averaging the losses of N
        "ghost" sub-batches, each normalised by its own statistics; the running statistics are rank
        0's, broadcast before every evaluation. Train/validation/test losses are exact sums over the
        ranks' shards; early stopping acts on them, so all ranks stop together. ``log`` is called on
        rank 0 only. ``device``: default this rank's GPU under torchrun with NCCL, else the CPU.

        ``checkpoint_dir``: after every epoch write the weights, the best weights so far, optimizer,
        LR schedule, generator and history there (:mod:`biogen.checkpoint`); ``resume=True``
        continues from it (same data and settings; ``epochs`` may grow) and repeats what the
        uninterrupted run would have done.
        """
        from ... import distributed as bdist

        tc = train or VAETrainConfig()
        X = _check_matrix(_dense(adata.X))
        cfg = config or RNAVAEConfig(n_genes=X.shape[1], **config_kw)
        if cfg.n_genes != X.shape[1]:
            raise ValueError(f"config.n_genes={cfg.n_genes} but the data has {X.shape[1]} genes")
        labels = None
        if tc.label_key is not None:
            if tc.label_key not in adata.obs:
                raise KeyError(f"label_key {tc.label_key!r} is not an obs column (have: {list(adata.obs.columns)})")
            labels = adata.obs[tc.label_key].astype(str).to_numpy()
        split = stratified_split(len(X), labels, tc.val_fraction, tc.test_fraction, tc.seed)
        if len(split["train"]) < 2 or len(split["val"]) < 1:
            raise ValueError(f"too few samples ({len(X)}) for a train/val split")
        bdist.init()
        world = bdist.world_size()
        if tc.batch_size < 2 * world:
            raise ValueError(f"batch_size ({tc.batch_size}) is the global batch: with {world} processes it must be "
                             f">= {2 * world} (BatchNorm needs 2 samples per process)")
        if len(split["train"]) < 2 * world:
            raise ValueError(f"{len(split['train'])} training samples cannot give each of {world} processes 2")
        dev = torch.device(device) if device is not None else (bdist.device() if world > 1 else torch.device("cpu"))
        mean = X[split["train"]].mean(0)
        std = X[split["train"]].std(0)
        std = np.where(std < 1e-6, 1.0, std).astype(np.float32)  # constant genes: leave them at 0
        torch.manual_seed(tc.seed)
        enc = cls(RNAVAE(cfg), list(map(str, adata.var_names)), mean, std)
        Z = torch.from_numpy(enc.zscore(X).astype(np.float32))
        xtr, xva = Z[split["train"]], Z[split["val"]]
        model = enc.module.to(dev)
        loss_fn = bdist.wrap_loss(model, lambda m, xb, eps: m.loss(xb, eps=eps))
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(xtr) / tc.batch_size))
        total, warm = tc.epochs * steps_per_epoch, tc.warmup_epochs * steps_per_epoch

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            p = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        g = torch.Generator().manual_seed(tc.seed)
        hist = VAEHistory(split={k: v.tolist() for k, v in split.items()})
        best, best_state, bad = float("inf"), None, 0
        resumable = {"model": asdict(cfg), "train": {k: v for k, v in asdict(tc).items() if k != "epochs"},
                     "genes": enc.genes}
        start = 0
        if resume:
            if checkpoint_dir is None:
                raise ValueError("resume=True needs checkpoint_dir")
            best_state = {}
            state = load_training_state(checkpoint_dir, modules={"model": model, "best": best_state},
                                        optimizers={"opt": opt, "sched": sched}, generators={"g": g},
                                        config=resumable)
            start, best, bad = state["epoch"], state["best"], state["bad"]
            hist = VAEHistory(**state["history"])
            best_state = best_state or None
        elif checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
            raise FileExistsError(f"{checkpoint_dir} already holds a checkpoint: pass resume=True or another folder")
        for epoch in range(start, tc.epochs):
            if hist.stopped_early:
                break
            model.train()
            perm = torch.randperm(len(xtr), generator=g)
            sums = np.zeros(2)  # sum of per-sample losses, samples
            for i in range(0, len(xtr), tc.batch_size):
                n_glob = min(tc.batch_size, len(xtr) - i)
                if n_glob < 2 * world:  # BatchNorm cannot train on one sample (per process)
                    break
                part, scale = bdist.rank_share(n_glob, min_per_rank=2)
                idx = perm[i:i + n_glob][part]
                # The noise of the whole global batch, drawn as one process draws it (same generator
                # state on every rank): N ranks train on exactly the noise one process would use.
                eps = torch.randn((n_glob, cfg.latent_dim), generator=g)[part]
                out = loss_fn(xtr[idx].to(dev), eps.to(dev))
                opt.zero_grad()
                (out["loss"] * scale if scale != 1.0 else out["loss"]).backward()
                opt.step()
                sched.step()
                sums += (float(out["loss"].detach()) * len(idx), len(idx))
            bdist.broadcast_buffers(model)  # rank 0's running statistics everywhere before evaluating
            val = enc._eval_loss(xva)
            sums = bdist.all_reduce_sum(sums)
            hist.train_loss.append(float(sums[0] / max(sums[1], 1)))
            hist.val_loss.append(val)
            hist.lr.append(opt.param_groups[0]["lr"])
            if log and bdist.is_main():
                log(f"epoch {epoch + 1}/{tc.epochs} train {hist.train_loss[-1]:.4f} val {val:.4f}")
            if val < best - 1e-6:
                best, best_state, bad, hist.best_epoch = val, copy.deepcopy(model.state_dict()), 0, epoch
            else:
                bad += 1
                if bad >= tc.patience:
                    hist.stopped_early = True
            if checkpoint_dir is not None:
                save_training_state(checkpoint_dir, modules={"model": model, "best": best_state or {}},
                                    optimizers={"opt": opt, "sched": sched}, generators={"g": g},
                                    state={"epoch": epoch + 1, "best": best, "bad": bad, "history": asdict(hist),
                                           "config": resumable})
        if best_state is not None:
            model.load_state_dict(best_state)
        if len(split["test"]):
            hist.test_loss = enc._eval_loss(Z[split["test"]])
        model.cpu().eval()
        return enc, hist

    @torch.no_grad()
    def _eval_loss(self, x: torch.Tensor) -> float:
        """Mean loss over the rows of ``x`` (n, n_genes), deterministic (latent means).

        Under torchrun each rank evaluates its contiguous shard and the per-sample sums are added
        across ranks (identical result on every rank).
        """
        from ... import distributed as bdist

        self.module.eval()
        dev = next(self.module.parameters()).device
        if bdist.world_size() == 1:
            x = x.to(dev)
            recon, mu, logvar = self.module(x)
            return float(F.mse_loss(recon, x) + self.module.config.beta * kl_divergence(mu, logvar).mean())
        shard = np.array_split(np.arange(len(x)), bdist.world_size())[bdist.rank()]
        xs = x[shard].to(dev)
        s = np.zeros(2)
        if len(xs):
            recon, mu, logvar = self.module(xs)
            per = (recon - xs).pow(2).mean(1) + self.module.config.beta * kl_divergence(mu, logvar)
            s[:] = float(per.double().sum()), len(xs)
        s = bdist.all_reduce_sum(s)
        return float(s[0] / s[1])

    # ------------------------------------------------------------------ checkpoints

    FORMAT, FORMAT_VERSION = "biogen.rna_vae", 1

    def save(self, path: str | Path) -> Path:
        """One safetensors file: weights + z-score stats as tensors, config + genes as metadata, with the
        format version and a checksum of the tensors (:func:`biogen._io.save_safetensors`)."""
        from ..._io import save_safetensors

        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        tensors["zscore.mean"] = torch.from_numpy(self.mean)
        tensors["zscore.std"] = torch.from_numpy(self.std)
        meta = {"config": json.dumps(asdict(self.module.config)), "genes": json.dumps(self.genes)}
        return save_safetensors(tensors, path, fmt=self.FORMAT, version=self.FORMAT_VERSION, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "RNAEncoder":
        """Inverse of :meth:`save`; a truncated, corrupt or foreign file is refused by name."""
        from ..._io import load_safetensors_verified
        from ...errors import IncompatibleError

        redo = "train it again with 'biogen rnacdm train-vae'"
        tensors, meta = load_safetensors_verified(path, fmt=cls.FORMAT, version=cls.FORMAT_VERSION,
                                                  what="RNA VAE checkpoint", redo=redo)
        module = RNAVAE(RNAVAEConfig(**json.loads(meta["config"])))
        try:
            module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")})
        except RuntimeError as exc:  # torch lists every mismatched tensor
            raise IncompatibleError(f"does not fit its own config ({exc})", path=path, hint=redo) from exc
        module.eval()
        return cls(module, json.loads(meta["genes"]), tensors["zscore.mean"].numpy(), tensors["zscore.std"].numpy())


def plot_latents(z: np.ndarray, labels: Sequence, path: str | Path, method: str = "umap", seed: int = 0,
                 title: str = "RNA beta-VAE latents") -> Path:
    """Scatter of latents (n, d) reduced to 2-D by UMAP (umap-learn) or PCA, coloured by ``labels``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.asarray(z, np.float64)
    if method == "umap":
        import umap  # umap-learn, a scanpy dependency

        xy = umap.UMAP(n_neighbors=min(15, len(z) - 1), random_state=seed).fit_transform(z)
    elif method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(2, random_state=seed).fit_transform(z)
    else:
        raise ValueError(f"method must be 'umap' or 'pca', got {method!r}")
    labels = np.asarray(labels).astype(str)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for lab in np.unique(labels):
        m = labels == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=10, label=lab)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(title)
    ax.legend(markerscale=2, fontsize=8)
    return save_figure(fig, path, dpi=110)
