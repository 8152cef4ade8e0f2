"""scGPT-style foundation model for single-cell RNA-seq: the user-facing class that owns AnnData.

The network itself (tensors in, tensors out) is :class:`~biogen.models.scgpt_module.ScGPTModel`;
this module adds the scvi-tools-style wrapper :class:`ScGPT` (data checks, tokenisation through
:mod:`biogen.sc`, pretraining, fine-tuning with validation / early stopping / resumable
checkpoints, prediction written back into AnnData, save / load) and re-exports the pieces.

Input values are raw counts (``adata.X`` or ``adata.layers[layer]``). They are binned per cell
(scGPT's 51 value bins); binning depends only on each cell's ranks, so counts and
log1p(normalize_total(counts)) give the same tokens and no normalisation step is needed here.

Example
-------
>>> from biogen.models.scgpt import ScGPT
>>> model = ScGPT(adata, label_key="cell_type", config="small")
>>> model.fit(epochs=10)                      # thesis: 10 epochs, batch 128, lr 1e-4, Adam
>>> model.predict(query)                      # query.obs["scgpt_pred"], .obsm["scgpt_proba"], .obsm["X_scgpt"]
>>> model.save("my_model"); model = ScGPT.load("my_model")
"""

from __future__ import annotations

import contextlib
import copy as _copy
import json
import os
import tempfile
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset

from .scgpt_checkpoint import load_scgpt_checkpoint, map_reference_keys
from .scgpt_module import GenerationResult, ScGPTConfig, ScGPTModel, ScGPTOutput

__all__ = [
    "GenerationResult", "ScGPT", "ScGPTConfig", "ScGPTModel", "ScGPTOutput", "load_scgpt_checkpoint",
    "map_reference_keys",
]

_FORMAT = "biogen.ScGPT"
_PRETRAIN_MODES = ("mlm", "generative", "both")


# ---------------------------------------------------------------------------- file helpers


def _atomic_write(path: str, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    _atomic_write(path, w)


def _save_weights(path: str, module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    _atomic_write(path, lambda tmp: save_file(state, tmp))


def _load_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------------------- data checks


def _check_adata(adata, layer: Optional[str], what: str = "adata") -> None:
    from biogen.sc.preprocess import check_counts

    if not hasattr(adata, "obs") or not hasattr(adata, "var_names"):
        raise TypeError(f"{what} must be an AnnData, got {type(adata).__name__}")
    check_counts(adata, layer=layer, what=f"{what}.X" if layer is None else f"{what}.layers[{layer!r}]")


def _obs_column(adata, key: str, role: str, what: str = "adata"):
    if key not in adata.obs.columns:
        raise KeyError(f"{role} {key!r} is not a column of {what}.obs; available columns: "
                       f"{list(map(str, adata.obs.columns))}")
    return adata.obs[key]


def _categories(series: pd.Series) -> list:
    if isinstance(series.dtype, pd.CategoricalDtype):
        used = set(series.dropna().unique().tolist())
        return [c for c in series.cat.categories if c in used]
    return sorted(series.dropna().unique().tolist())


def _to_py(x):
    return x.item() if isinstance(x, np.generic) else x


class ScGPT:
    """scGPT-style model on an AnnData: pretraining, cell-type fine-tuning, prediction, embeddings.

    Parameters
    ----------
    adata : AnnData with raw counts in ``X`` (or ``layers[layer]``): finite, non-negative integers.
    label_key : ``obs`` column with cell types; builds the classifier head (one output per category).
    batch_key : ``obs`` column with batch / condition labels; builds the batch embedding.
    layer : layer with the counts (default ``X``).
    config : preset name (``"tiny"``, ``"small"``, ``"paper"``) or an :class:`ScGPTConfig`.
    vocab : :class:`biogen.sc.GeneVocab`; default: the genes of ``adata``.
    device : torch device; default CUDA when available, else CPU.
    **config_overrides : fields of :class:`ScGPTConfig` replacing the preset's (e.g. ``max_seq_len``).

    All inputs are checked here, before any training: NaN, negative or non-integer counts, an empty
    AnnData, a missing ``obs`` column, fewer than two label classes, too little gene overlap with
    ``vocab``, an invalid config (e.g. ``max_seq_len < 2``) raise with a message naming the problem.
    """

    def __init__(self, adata, label_key: Optional[str] = None, batch_key: Optional[str] = None,
                 layer: Optional[str] = None, config: Union[str, ScGPTConfig] = "small", vocab=None,
                 device: Optional[Union[str, torch.device]] = None, **config_overrides):
        from biogen.sc import GeneVocab

        _check_adata(adata, layer)
        cfg = _make_config(config, config_overrides)
        label_categories = batch_categories = None
        if label_key is not None:
            label_categories = _categories(_obs_column(adata, label_key, "label_key"))
            if len(label_categories) < 2:
                raise ValueError(f"label_key {label_key!r} has {len(label_categories)} class(es); a classifier "
                                 "needs at least 2")
        if batch_key is not None:
            batch_categories = _categories(_obs_column(adata, batch_key, "batch_key"))
            if adata.obs[batch_key].isna().any():
                raise ValueError(f"batch_key {batch_key!r} has missing values")
            cfg = replace(cfg, n_batches=len(batch_categories))
        if vocab is None:
            vocab = GeneVocab.from_adata(adata)
        elif not isinstance(vocab, GeneVocab):
            raise TypeError(f"vocab must be a biogen.sc.GeneVocab, got {type(vocab).__name__}")
        vocab.map_genes(adata, min_overlap=0.5)  # raises naming missing genes
        module = ScGPTModel(cfg, len(vocab), vocab.pad_id, n_classes=len(label_categories or ()))
        self._setup(module, vocab, label_key, batch_key, layer, label_categories, batch_categories, device)
        self.adata = adata

    def _setup(self, module, vocab, label_key, batch_key, layer, label_categories, batch_categories, device):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.module = module.to(self.device)
        self.vocab = vocab
        self.label_key, self.batch_key, self.layer = label_key, batch_key, layer
        self.label_categories = None if label_categories is None else [_to_py(c) for c in label_categories]
        self.batch_categories = None if batch_categories is None else [_to_py(c) for c in batch_categories]
        self.history: list[dict] = []
        self.adata = None

    @property
    def config(self) -> ScGPTConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        return (f"ScGPT(d_model={c.d_model}, nlayers={c.nlayers}, genes={len(self.vocab.genes)}, "
                f"classes={self.label_categories}, batch_key={self.batch_key!r}, device={self.device})")

    # ------------------------------------------------------------------ data

    def _dataset(self, adata, *, mask_ratio, labels: bool, seed: int, min_overlap=0.5):
        from biogen.sc.data import ScGPTDataset

        c = self.config
        return ScGPTDataset(
            adata, self.vocab, layer=self.layer, label_key=self.label_key if labels else None,
            batch_key=self.batch_key, n_bins=c.n_bins, max_seq_len=c.max_seq_len, mask_ratio=mask_ratio,
            seed=seed, input_style="binned",
            # the model itself writes config.pad_value / mask_value at padded / hidden positions, so the
            # tokenizer's own (negative) markers are fine whatever the config (category checkpoints use n_bins)
            label_categories=self.label_categories, batch_categories=self.batch_categories,
            min_overlap=min_overlap)

    def _to_device(self, batch: dict) -> dict:
        if batch["gene_ids"].shape[1] < 2:
            # a batch of cells without any expressed vocabulary gene: one padding column keeps L >= 2
            B = batch["gene_ids"].shape[0]
            extra = {"gene_ids": self.vocab.pad_id, "values": self.config.pad_value,
                     "target_values": self.config.pad_value, "padding_mask": True, "mlm_mask": False, "known": True}
            for k, fill in extra.items():
                batch[k] = torch.cat([batch[k], torch.full((B, 1), fill, dtype=batch[k].dtype)], 1)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self, enabled: bool):
        if not enabled:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ training

    def pretrain(self, epochs: int = 1, mode: str = "mlm", batch_size: int = 32, lr: float = 1e-4,
                 validation_fraction: float = 0.1, early_stopping_patience: Optional[int] = None,
                 checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
                 mixed_precision: bool = False, seed: int = 0) -> list[dict]:
        """Self-supervised pretraining on ``self.adata`` (labels unused).

        mode : ``"mlm"`` masked value prediction (``config.mask_ratio`` of each cell's genes masked),
            ``"generative"`` the known/unknown split of scGPT (each cell draws 25/50/75 % unknown
            genes; unknown values hidden and the attention mask applied), or ``"both"`` (sum of the two
            losses on the same split). The MVC head is trained alongside when ``config.mvc``.

        Other arguments as in :meth:`fit`. Returns the per-epoch history.
        """
        if mode not in _PRETRAIN_MODES:
            raise ValueError(f"mode must be one of {_PRETRAIN_MODES}, got {mode!r}")
        mask_ratio = self.config.mask_ratio if mode == "mlm" else "generative"
        return self._train(mode, mask_ratio, epochs=epochs, batch_size=batch_size, lr=lr,
                           validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                           class_weights=False, checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                           mixed_precision=mixed_precision, seed=seed)

    def fit(self, epochs: int = 10, batch_size: int = 128, lr: float = 1e-4, validation_fraction: float = 0.1,
            early_stopping_patience: Optional[int] = None, class_weights: bool = False,
            checkpoint_dir: Optional[str] = None, resume: bool = False, progress: bool = True,
            mixed_precision: bool = False, seed: int = 0) -> list[dict]:
        """Fine-tune for cell-type classification on ``self.adata[label_key]`` (cross-entropy, Adam).

        Parameters
        ----------
        epochs : total epochs (with ``resume``, training continues up to this count).
        batch_size, lr : thesis defaults 128 and 1e-4.
        validation_fraction : cells held out (stratified by label) for the validation loss and
            accuracy; 0 disables validation and early stopping.
        early_stopping_patience : stop after this many epochs without a lower validation loss; the
            weights of the best epoch are restored at the end. None: train all epochs (the weights of
            the last epoch are kept).
        class_weights : weight the loss by inverse class frequency of the training cells.
        checkpoint_dir : after every epoch write weights (safetensors), optimizer state and a JSON
            trainer state there, atomically.
        resume : continue from ``checkpoint_dir`` (epoch, step, optimizer, history, early-stopping
            state); the data order and masks of each epoch depend only on (seed, epoch), so a resumed
            run repeats what the uninterrupted run would have done.
        progress : tqdm progress bar.
        mixed_precision : autocast to bfloat16 (CPU) / float16 with loss scaling (CUDA).
        seed : seeds the split, shuffling, masks and dropout (torch's global RNG is restored after).

        Returns
        -------
        list of per-epoch dicts (epoch, step, train_loss, val_loss, val_accuracy).
        """
        if self.module.cls_decoder is None:
            raise ValueError("fit() trains the classifier: construct ScGPT with label_key=... "
                             "(use pretrain() for self-supervised training)")
        return self._train("classify", 0.0, epochs=epochs, batch_size=batch_size, lr=lr,
                           validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                           class_weights=class_weights, checkpoint_dir=checkpoint_dir, resume=resume,
                           progress=progress, mixed_precision=mixed_precision, seed=seed)

    def _split(self, n: int, labels: Optional[np.ndarray], fraction: float, seed: int):
        idx = np.arange(n)
        if fraction == 0:
            return idx, np.array([], dtype=np.int64)
        n_val = int(round(fraction * n))
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"validation_fraction={fraction} leaves {n - n_val} training / {n_val} validation "
                             f"cells of {n}; use 0 to disable validation")
        from sklearn.model_selection import train_test_split

        strat = None
        if labels is not None:
            _, counts = np.unique(labels, return_counts=True)
            if counts.min() >= 2 and n_val >= len(counts):
                strat = labels
        tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
        return np.sort(tr), np.sort(va)

    def _train(self, objective, mask_ratio, *, epochs, batch_size, lr, validation_fraction, early_stopping_patience,
               class_weights, checkpoint_dir, resume, progress, mixed_precision, seed):
        from tqdm.auto import tqdm

        from biogen.sc.data import collate

        if self.adata is None:
            raise ValueError("this ScGPT has no training AnnData (it was loaded); construct ScGPT(adata, ...) to train")
        for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        if early_stopping_patience is not None and (early_stopping_patience < 1 or validation_fraction == 0):
            raise ValueError("early_stopping_patience needs validation_fraction > 0 and a value >= 1")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")

        ds = self._dataset(self.adata, mask_ratio=mask_ratio, labels=objective == "classify", seed=seed)
        labels = ds.labels if objective == "classify" else None
        tr_idx, va_idx = self._split(len(ds), labels, validation_fraction, seed)
        weights = None
        if objective == "classify":
            if class_weights:
                lab = labels[tr_idx]
                lab = lab[lab >= 0]
                counts = np.bincount(lab, minlength=len(self.label_categories)).astype(np.float64)
                w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
                weights = torch.tensor(w, dtype=torch.float32, device=self.device)
        opt = torch.optim.Adam(self.module.parameters(), lr=lr)
        scaler = torch.amp.GradScaler("cuda") if (mixed_precision and self.device.type == "cuda") else None
        state = {"objective": objective, "epoch": 0, "step": 0, "best_val": None, "bad_epochs": 0, "history": []}
        if checkpoint_dir is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            if resume:
                state = self._load_checkpoint(checkpoint_dir, opt, objective)
            elif os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
                raise FileExistsError(f"{checkpoint_dir} already holds a training checkpoint; pass resume=True "
                                      "to continue it or choose another checkpoint_dir")
        best_weights = None
        if early_stopping_patience is not None and checkpoint_dir is not None and resume:
            best_path = os.path.join(checkpoint_dir, "best.safetensors")
            if os.path.exists(best_path):
                best_weights = _load_weights(best_path)

        g_split = torch.Generator()
        steps_per_epoch = -(-len(tr_idx) // batch_size)
        bar = tqdm(total=max(0, epochs - state["epoch"]) * steps_per_epoch, disable=not progress,
                   desc=f"scGPT {objective}", unit="batch")
        cuda_devs = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devs):
            for epoch in range(state["epoch"], epochs):
                if early_stopping_patience is not None and state["bad_epochs"] >= early_stopping_patience:
                    break
                torch.manual_seed(seed * 100_003 + epoch)  # dropout draws depend on (seed, epoch) only
                ds.set_epoch(epoch)
                g_split.manual_seed(seed * 100_003 + epoch)
                loader = DataLoader(Subset(ds, tr_idx.tolist()), batch_size=batch_size, shuffle=True,
                                    generator=g_split, collate_fn=collate)
                self.module.train()
                total, count = 0.0, 0
                for batch in loader:
                    batch = self._to_device(batch)
                    with self._autocast(mixed_precision):
                        loss = self.module.loss(batch, objective, class_weights=weights)["loss"]
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
                        opt.step()
                    n = batch["gene_ids"].shape[0]
                    total += float(loss.detach()) * n
                    count += n
                    state["step"] += 1
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
                rec = {"epoch": epoch + 1, "step": state["step"], "train_loss": total / max(count, 1)}
                if len(va_idx):
                    rec.update(self._evaluate(Subset(ds, va_idx.tolist()), objective, batch_size, weights,
                                              mixed_precision))
                    if state["best_val"] is None or rec["val_loss"] < state["best_val"]:
                        state["best_val"], state["bad_epochs"] = rec["val_loss"], 0
                        if early_stopping_patience is not None:
                            best_weights = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
                            if checkpoint_dir is not None:
                                _save_weights(os.path.join(checkpoint_dir, "best.safetensors"), self.module)
                    else:
                        state["bad_epochs"] += 1
                state["epoch"] = epoch + 1
                state["history"].append(rec)
                if checkpoint_dir is not None:
                    self._save_checkpoint(checkpoint_dir, opt, state)
        bar.close()
        if best_weights is not None:
            self.module.load_state_dict(best_weights)
        self.module.eval()
        self.history = list(state["history"])
        return self.history

    @torch.no_grad()
    def _evaluate(self, ds, objective, batch_size, weights, mixed_precision) -> dict:
        from biogen.sc.data import collate

        self.module.eval()
        total, count, correct, n_lab = 0.0, 0, 0, 0
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate):
            batch = self._to_device(batch)
            with self._autocast(mixed_precision):
                total += float(self.module.loss(batch, objective, class_weights=weights)["loss"]) * len(batch["gene_ids"])
                if objective == "classify":
                    logits = self.module(batch["gene_ids"], batch["values"], batch["padding_mask"],
                                         batch_ids=batch.get("batch_ids"), heads=("cls",)).logits
                    ok = batch["labels"] >= 0
                    correct += int((logits.argmax(1) == batch["labels"])[ok].sum())
                    n_lab += int(ok.sum())
            count += len(batch["gene_ids"])
        out = {"val_loss": total / max(count, 1)}
        if objective == "classify":
            out["val_accuracy"] = correct / max(n_lab, 1)
        return out

    def _save_checkpoint(self, folder, opt, state) -> None:
        _save_weights(os.path.join(folder, "model.safetensors"), self.module)
        _atomic_write(os.path.join(folder, "optimizer.pt"), lambda tmp: torch.save(opt.state_dict(), tmp))
        self._write_meta(folder)
        # the trainer state goes last: its presence marks a complete checkpoint
        _write_json(os.path.join(folder, "trainer_state.json"), state)

    def _load_checkpoint(self, folder, opt, objective) -> dict:
        path = os.path.join(folder, "trainer_state.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume=True but {folder} holds no trainer_state.json")
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("objective") != objective:
            raise ValueError(f"checkpoint in {folder} is from objective {state.get('objective')!r}, not {objective!r}")
        self.module.load_state_dict(_load_weights(os.path.join(folder, "model.safetensors")))
        opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=self.device,
                                       weights_only=True))
        return state

    # ------------------------------------------------------------------ inference

    def _check_query(self, adata, what="adata"):
        _check_adata(adata, self.layer, what)
        if self.batch_key is not None:
            col = _obs_column(adata, self.batch_key, "batch_key", what)
            unknown = sorted(set(col.dropna().unique().tolist()) - set(self.batch_categories))
            if unknown:
                raise ValueError(f"{what}.obs[{self.batch_key!r}] has batches the model was not trained on: {unknown[:5]}")

    @torch.no_grad()
    def _run(self, adata, batch_size: int, min_gene_overlap, heads):
        from biogen.sc.data import collate

        ds = self._dataset(adata, mask_ratio=0.0, labels=False, seed=0, min_overlap=min_gene_overlap)
        self.module.eval()
        embs, logits = [], []
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate):
            batch = self._to_device(batch)
            out = self.module(batch["gene_ids"], batch["values"], batch["padding_mask"],
                              batch_ids=batch.get("batch_ids"), heads=heads)
            embs.append(out.cell_emb.float().cpu())
            if out.logits is not None:
                logits.append(out.logits.float().cpu())
        return torch.cat(embs), (torch.cat(logits) if logits else None)

    def get_latent_representation(self, adata=None, batch_size: int = 64, normalize: bool = True,
                                  min_gene_overlap: Union[float, int] = 0.5) -> np.ndarray:
        """Cell embeddings (n_cells, d_model) float32: the transformer output at ``<cls>``.

        ``normalize`` scales each embedding to unit L2 norm (as scGPT's ``embed_data``), which suits
        cosine kNN and UMAP. ``adata`` defaults to the training AnnData; ``min_gene_overlap``: the
        fraction (or count) of the query's genes that must be in the vocabulary.
        """
        adata = self._default_adata(adata)
        self._check_query(adata)
        emb, _ = self._run(adata, batch_size, min_gene_overlap, heads=())
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.numpy().astype(np.float32)

    def predict(self, adata=None, prefix: str = "scgpt", batch_size: int = 64, copy: bool = False,
                overwrite: bool = False, min_gene_overlap: Union[float, int] = 0.5):
        """Predict cell types and write them, with probabilities and embeddings, into AnnData.

        Writes ``obs[f"{prefix}_pred"]`` (categorical over the training classes),
        ``obsm[f"{prefix}_proba"]`` (n_cells, n_classes) softmax probabilities (columns in the
        order of ``self.label_categories``, also stored in ``uns[prefix]["classes"]``),
        ``obsm[f"X_{prefix}"]`` (n_cells, d_model) L2-normalised cell embeddings, and run metadata in
        ``uns[prefix]``.

        Copy policy: with ``copy=False`` (default) ``adata`` is modified in place and returned; with
        ``copy=True`` a copy is written to and returned and ``adata`` is untouched. Existing keys of
        those names are only replaced when they were written by an earlier ``predict`` with the same
        prefix or when ``overwrite=True``; otherwise a ValueError is raised before any work.
        """
        if self.module.cls_decoder is None:
            raise ValueError("this model has no classifier (constructed without label_key); use "
                             "get_latent_representation() for embeddings")
        adata = self._default_adata(adata)
        self._check_query(adata)
        keys = [("obs", f"{prefix}_pred"), ("obsm", f"{prefix}_proba"), ("obsm", f"X_{prefix}")]
        ours = isinstance(adata.uns.get(prefix), dict) and adata.uns[prefix].get("writer") == _FORMAT
        clash = [f"{a}[{k!r}]" for a, k in keys if k in getattr(adata, a).keys()]
        if clash and not (ours or overwrite):
            raise ValueError(f"adata already has {clash}; pass overwrite=True or another prefix")
        emb, logits = self._run(adata, batch_size, min_gene_overlap, heads=("cls",))
        proba = torch.softmax(logits, dim=1).numpy()
        target = adata.copy() if copy else adata
        cats = self.label_categories
        target.obs[f"{prefix}_pred"] = pd.Categorical.from_codes(proba.argmax(1), categories=cats)
        target.obsm[f"{prefix}_proba"] = proba.astype(np.float32)
        target.obsm[f"X_{prefix}"] = torch.nn.functional.normalize(emb, dim=1).numpy().astype(np.float32)
        target.uns[prefix] = {"writer": _FORMAT, "classes": [str(c) for c in cats], "label_key": self.label_key or "",
                              "config": {k: ("" if v is None else v) for k, v in self.config.to_dict().items()}}
        return target

    def generate(self, adata=None, unknown_fraction: float = 0.5, n_iters: int = 1, batch_size: int = 64,
                 seed: int = 0) -> list[GenerationResult]:
        """K-step generative inference on cells of ``adata``: per cell, ``unknown_fraction`` of its
        expressed genes are hidden and regenerated in ``n_iters`` steps (see
        :meth:`ScGPTModel.generate` for the confidence rule). Returns one :class:`GenerationResult`
        per batch, with ``cell_index`` and ``target_values`` (the true bins) attached for evaluation.
        """
        from biogen.sc.data import collate

        if not 0 < unknown_fraction < 1:
            raise ValueError(f"unknown_fraction must be in (0, 1), got {unknown_fraction!r}")
        adata = self._default_adata(adata)
        self._check_query(adata)
        ds = self._dataset(adata, mask_ratio=float(unknown_fraction), labels=False, seed=seed)
        results = []
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate):
            batch = self._to_device(batch)
            known = ~batch["mlm_mask"]
            res = self.module.generate(batch["gene_ids"], batch["values"], batch["padding_mask"], known,
                                       n_iters=n_iters, batch_ids=batch.get("batch_ids"))
            res.cell_index = batch["cell_index"].cpu()
            res.target_values = batch["target_values"].cpu()
            res.values, res.step = res.values.cpu(), res.step.cpu()
            results.append(res)
        return results

    def _default_adata(self, adata):
        if adata is None:
            if self.adata is None:
                raise ValueError("pass adata: this model was loaded without one")
            return self.adata
        return adata

    # ------------------------------------------------------------------ persistence

    def _meta(self) -> dict:
        return {"format": _FORMAT, "version": 1, "config": self.config.to_dict(), "n_tokens": self.module.n_tokens,
                "pad_id": self.module.pad_id, "n_classes": self.module.n_classes, "label_key": self.label_key,
                "batch_key": self.batch_key, "layer": self.layer, "label_categories": self.label_categories,
                "batch_categories": self.batch_categories}

    def _write_meta(self, folder: str) -> None:
        _write_json(os.path.join(folder, "config.json"), self._meta())
        self.vocab.save(os.path.join(folder, "vocab.json"))

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write ``model.safetensors``, ``config.json`` (config, label / batch categories, keys) and
        ``vocab.json`` into folder ``path`` (each file atomically). An existing saved model there is
        replaced only with ``overwrite=True``."""
        if os.path.exists(os.path.join(path, "model.safetensors")) and not overwrite:
            raise FileExistsError(f"{path} already holds a saved model; pass overwrite=True to replace it")
        os.makedirs(path, exist_ok=True)
        _save_weights(os.path.join(path, "model.safetensors"), self.module)
        self._write_meta(path)

    @classmethod
    def load(cls, path: str, adata=None, device: Optional[Union[str, torch.device]] = None) -> "ScGPT":
        """Load a model written by :meth:`save` (or a checkpoint folder of :meth:`fit`).

        ``adata`` (optional) becomes the default data of :meth:`predict` and of further training.
        """
        from biogen.sc import GeneVocab

        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{path} holds no config.json; is it a folder written by ScGPT.save()?")
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{cfg_path} is not a {_FORMAT} config")
        vocab = GeneVocab.load(os.path.join(path, "vocab.json"))
        module = ScGPTModel(ScGPTConfig.from_dict(meta["config"]), meta["n_tokens"], meta["pad_id"],
                            n_classes=meta["n_classes"])
        module.load_state_dict(_load_weights(os.path.join(path, "model.safetensors")))
        self = cls.__new__(cls)
        self._setup(module, vocab, meta["label_key"], meta["batch_key"], meta["layer"], meta["label_categories"],
                    meta["batch_categories"], device)
        self.module.eval()
        if adata is not None:
            self._check_query(adata)
            self.adata = adata
        return self

    @classmethod
    def from_scgpt_checkpoint(cls, path: str, adata, label_key: Optional[str] = None, layer: Optional[str] = None,
                              device: Optional[Union[str, torch.device]] = None) -> "ScGPT":
        """Start from an original scGPT model folder (see :func:`load_scgpt_checkpoint`); with
        ``label_key`` a fresh classifier head for its categories is attached for :meth:`fit`."""
        module, vocab = load_scgpt_checkpoint(path)
        if module.config.n_batches:
            raise ValueError("checkpoints with a batch embedding are not supported by from_scgpt_checkpoint")
        _check_adata(adata, layer)
        vocab.map_genes(adata, min_overlap=0.5)
        label_categories = None
        if label_key is not None:
            label_categories = _categories(_obs_column(adata, label_key, "label_key"))
            if len(label_categories) < 2:
                raise ValueError(f"label_key {label_key!r} has fewer than 2 classes")
            module.replace_classifier(len(label_categories))
        self = cls.__new__(cls)
        self._setup(module, vocab, label_key, None, layer, label_categories, None, device)
        self.adata = adata
        return self


def _make_config(config, overrides: dict) -> ScGPTConfig:
    if isinstance(config, str):
        return ScGPTConfig.preset(config, **overrides)
    if isinstance(config, ScGPTConfig):
        return replace(config, **overrides) if overrides else _copy.copy(config)
    raise TypeError(f"config must be a preset name or an ScGPTConfig, got {type(config).__name__}")
