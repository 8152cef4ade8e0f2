"""PumaMedNet training: ``fit_vae`` (denoising beta-VAE + attention head) and ``fit_classifier``."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...checkpoint import load_training_state, save_training_state
from .network import PumaMedNet, PumaMedNetConfig, corrupt


# --------------------------------------------------------------------------------------- training
def _check_data(model: PumaMedNet, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    model.check_images(images)
    if labels is not None:
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= model.cfg.n_classes:
            raise ValueError(f"labels must be in [0, {model.cfg.n_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")


class _Parts(nn.Module):
    """A container of some of a model's submodules: DDP then synchronises exactly their parameters."""

    def __init__(self, **parts: Optional[nn.Module]) -> None:
        super().__init__()
        for k, m in parts.items():
            if m is not None:
                self.add_module(k, m)


def _resumable(cfg: PumaMedNetConfig) -> dict:
    """What a resumed run must share with its checkpoint: everything but the number of epochs."""
    return {k: v for k, v in cfg.to_dict().items() if k != "epochs"}


def fit_vae(model: PumaMedNet, images: torch.Tensor, *, epochs: Optional[int] = None,
            gen: Optional[torch.Generator] = None, log: Optional[list] = None,
            checkpoint_dir: Optional[str] = None, resume: bool = False) -> list[dict]:
    """Train the denoising beta-VAE (and attention head) on images (n, c, s, s) in [-1, 1].

    Returns one dict of mean losses per epoch (also appended to ``log`` if given).
    ``checkpoint_dir``: after every epoch write weights, optimizer, generator state and history there
    (see :mod:`biogen.checkpoint`); ``resume=True`` continues from it (with the same configuration)
    and repeats what the uninterrupted run would have done.

    Runs unchanged under ``torchrun --nproc_per_node N`` (see :mod:`biogen.distributed`): ``cfg.batch_size``
    is the *global* batch; every rank draws the same permutation and the corruption and latent
    noise of the whole global batch, and trains on its contiguous part under DistributedDataParallel
    (GroupNorm has no batch statistics), so a step on N ranks equals one single-process step up to
    floating-point reduction order. A last global batch smaller than N is skipped. The epoch losses
    are exact means over all ranks' images. The model must be on this rank's device.
    """
    from ... import distributed as bdist

    _check_data(model, images)
    cfg = model.cfg
    bdist.init()
    world = bdist.world_size()
    if cfg.batch_size < world or images.shape[0] < world:
        raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch and must be >= the number of "
                         f"processes ({world}), and so must the number of images ({images.shape[0]})")
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    params = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    dev = next(model.parameters()).device

    def vae_loss(_parts, inputs, targets, eps):
        out = model.loss(inputs, targets, gen) if eps is None else model.loss(inputs, targets, eps=eps)
        zero = out.total.new_zeros(())
        return out.total, out.recon, out.kl, zero if out.attention is None else out.attention

    loss_fn = bdist.wrap_loss(_Parts(encoder=model.encoder, decoder=model.decoder,
                                     attention_head=model.attention_head), vae_loss)
    history = log if log is not None else []
    start = 0
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        state = load_training_state(checkpoint_dir, modules={"model": model}, optimizers={"opt": opt},
                                    generators={"gen": gen}, config=_resumable(cfg))
        start = state["epoch"]
        history.extend(state["history"])
    elif checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
        raise FileExistsError(f"{checkpoint_dir} already holds a checkpoint: pass resume=True or another folder")
    model.train()
    n = images.shape[0]
    for ep in range(start, epochs if epochs is not None else cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        sums = np.zeros(5)  # loss, recon, kl, attention (each times the images), images
        for i in range(0, n, cfg.batch_size):
            n_glob = min(cfg.batch_size, n - i)
            if n_glob < world:  # ranks stay in lockstep: a tail too small to share is skipped by all
                break
            part, scale = bdist.rank_share(n_glob)
            x = images[perm[i:i + n_glob][part]].to(dev)
            eps = None
            if world > 1:
                pair = corrupt(x, cfg, gen, global_batch=n_glob, rank_slice=part)
                eps = torch.randn((n_glob, cfg.latent_dim), generator=gen)[part].to(dev)
            else:
                pair = corrupt(x, cfg, gen)
            total, recon, kl, att = loss_fn(pair.inputs, pair.targets, eps)
            opt.zero_grad(set_to_none=True)
            (total * scale if scale != 1.0 else total).backward()
            opt.step()
            b = x.shape[0]
            sums += [float(total.detach()) * b, float(recon.detach()) * b, float(kl.detach()) * b,
                     float(att.detach()) * b, b]
        sums = bdist.all_reduce_sum(sums)
        history.append({"epoch": ep + 1, **{k: float(v / sums[4]) for k, v in
                                            zip(("loss", "recon", "kl", "attention"), sums[:4])}})
        if checkpoint_dir is not None:
            save_training_state(checkpoint_dir, modules={"model": model}, optimizers={"opt": opt},
                                generators={"gen": gen},
                                state={"epoch": ep + 1, "history": history[-(ep + 1):], "config": _resumable(cfg)})
    model.eval()
    return history


def fit_classifier(model: PumaMedNet, images: torch.Tensor, labels: torch.Tensor, *,
                   finetune: Optional[bool] = None, epochs: Optional[int] = None,
                   gen: Optional[torch.Generator] = None) -> dict:
    """Train the classifier head on the latent mean of clean images.

    Frozen encoder (default): full-batch Adam on the cached latents, ``cfg.clf_epochs`` steps.
    ``finetune=True``: encoder and head trained together by minibatches, ``epochs`` (default
    ``max(1, cfg.epochs // 3)``) passes at a tenth of ``cfg.lr``. Returns the training accuracy and loss.

    Under ``torchrun`` (see :mod:`biogen.distributed`): frozen, each rank encodes only its contiguous
    shard of the images and the full-batch loss is the exact mean over all shards (DDP on the head);
    fine-tuned, each global minibatch is split across the ranks as in :func:`fit_vae`. Accuracy and
    loss are exact over all images.
    """
    from ... import distributed as bdist

    _check_data(model, images, labels)
    cfg = model.cfg
    finetune = cfg.finetune_encoder if finetune is None else finetune
    bdist.init()
    world = bdist.world_size()
    n = images.shape[0]
    if n < world:
        raise ValueError(f"{n} image(s) cannot be shared by {world} processes")
    gen = gen or torch.Generator().manual_seed(cfg.seed + 1)
    dev = next(model.parameters()).device
    y = labels.to(dev).long()
    shard, shard_scale = bdist.rank_share(n)  # the whole set in one process
    model.eval()
    if not finetune:
        mu = model.latent_mean(images[shard].to(dev))
        ys = y[shard]
        head = bdist.wrap_ddp(model.classifier)
        opt = torch.optim.Adam(model.classifier.parameters(), lr=cfg.clf_lr)
        for _ in range(epochs if epochs is not None else cfg.clf_epochs):
            loss = F.cross_entropy(head(mu), ys)
            opt.zero_grad(set_to_none=True)
            (loss * shard_scale if shard_scale != 1.0 else loss).backward()
            opt.step()
    else:
        if cfg.batch_size < world:
            raise ValueError(f"batch_size ({cfg.batch_size}) is the global batch and must be >= the number of "
                             f"processes ({world})")
        params = list(model.encoder.parameters()) + list(model.classifier.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr / 10)
        logits_fn = bdist.wrap_loss(_Parts(encoder=model.encoder, classifier=model.classifier),
                                    lambda _parts, xb: model.logits(xb))
        for _ in range(epochs if epochs is not None else max(1, cfg.epochs // 3)):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                n_glob = min(cfg.batch_size, n - i)
                if n_glob < world:
                    break
                part, scale = bdist.rank_share(n_glob)
                idx = perm[i:i + n_glob][part]
                loss = F.cross_entropy(logits_fn(images[idx].to(dev)), y[idx.to(dev)])
                opt.zero_grad(set_to_none=True)
                (loss * scale if scale != 1.0 else loss).backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        if world == 1:
            logits = torch.cat([model.logits(b) for b in images.to(dev).split(256)])
            return {"train_accuracy": float((logits.argmax(-1) == y).float().mean()),
                    "train_loss": float(F.cross_entropy(logits, y))}
        logits = torch.cat([model.logits(b) for b in images[shard].to(dev).split(256)])
        ys = y[shard]
        s = bdist.all_reduce_sum(np.array([float((logits.argmax(-1) == ys).sum()),
                                           float(F.cross_entropy(logits.double(), ys, reduction="sum")), len(ys)]))
        return {"train_accuracy": float(s[0] / s[2]), "train_loss": float(s[1] / s[2])}
