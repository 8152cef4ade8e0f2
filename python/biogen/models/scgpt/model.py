"""scGPT-style foundation model for single-cell RNA-seq: the user-facing class that owns AnnData.

The network itself (tensors in, tensors out) is :class:`~biogen.models.scgpt.network.ScGPTModel`;
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

from dataclasses import replace
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader

from ..singlecell.base import SingleCellModel, categories, check_adata, obs_column, to_py
from ..singlecell.training import check_train_args  # the training loop is shared with ScBERT
from .checkpoint import load_scgpt_checkpoint, map_reference_keys
from .network import GenerationResult, ScGPTConfig, ScGPTModel, ScGPTOutput

__all__ = [
    "GenerationResult", "ScGPT", "ScGPTConfig", "ScGPTModel", "ScGPTOutput", "load_scgpt_checkpoint",
    "map_reference_keys",
]

_PRETRAIN_MODES = ("mlm", "generative", "both")


class ScGPT(SingleCellModel):
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

    _FORMAT = "biogen.ScGPT"
    _CONFIG = ScGPTConfig
    _HEAD = "cls_decoder"
    _PREDICT_BATCH = 64

    def __init__(self, adata, label_key: Optional[str] = None, batch_key: Optional[str] = None,
                 layer: Optional[str] = None, config: Union[str, ScGPTConfig] = "small", vocab=None,
                 device: Optional[Union[str, torch.device]] = None, **config_overrides):
        check_adata(adata, layer)
        cfg = self._make_config(config, config_overrides)
        label_categories = self._label_categories(adata, label_key)
        batch_categories = None
        if batch_key is not None:
            batch_categories = categories(obs_column(adata, batch_key, "batch_key"))
            if adata.obs[batch_key].isna().any():
                raise ValueError(f"batch_key {batch_key!r} has missing values")
            cfg = replace(cfg, n_batches=len(batch_categories))
        vocab = self._vocab_for(adata, vocab)
        module = ScGPTModel(cfg, len(vocab), vocab.pad_id, n_classes=len(label_categories or ()))
        self._setup(module, vocab, label_key, batch_key, layer, label_categories, batch_categories, device)
        self.adata = adata

    @classmethod
    def from_h5ad(cls, source, label_key: Optional[str] = None, batch_key: Optional[str] = None,
                  layer: Optional[str] = None, config: Union[str, ScGPTConfig] = "small", vocab=None,
                  device: Optional[Union[str, torch.device]] = None, chunk_size: int = 1024,
                  buffer_size: int = 16384, **config_overrides) -> "ScGPT":
        """A model that trains out of core on a backed ``.h5ad``, a folder of ``.h5ad`` shards or a list.

        ``pretrain`` / ``fit`` then stream the cells with :class:`biogen.sc.StreamingScGPTDataset`:
        sparse CSR counts read in chunks of ``chunk_size`` cells, shuffled in a buffer of
        ``buffer_size`` cells, each rank of a ``torchrun`` job reading its own chunks; memory is bounded
        by the buffer whatever the number of cells. Only ``var`` and the label / batch categories are
        read here; the counts are checked chunk by chunk as they stream (NaN, negative or non-integer
        values raise, naming the file and rows). There is no validation split (pass
        ``validation_fraction=0``); evaluate with :meth:`predict` on held-out cells (a backed AnnData
        works). Default vocabulary: the union of the shards' genes.
        """
        from anndata.io import read_elem
        import h5py

        from biogen.sc import GeneVocab, StreamingScGPTDataset
        from biogen.sc.streaming import h5ad_shards

        cfg = cls._make_config(config, config_overrides)
        if vocab is None:
            genes: dict = {}
            for path in h5ad_shards(source):
                with h5py.File(path, "r") as f:
                    genes.update(dict.fromkeys(read_elem(f["var"]).index.astype(str)))
            vocab = GeneVocab(list(genes))
        elif not isinstance(vocab, GeneVocab):
            raise TypeError(f"vocab must be a biogen.sc.GeneVocab, got {type(vocab).__name__}")
        probe = StreamingScGPTDataset(source, vocab, layer=layer, label_key=label_key, batch_key=batch_key,
                                      chunk_size=chunk_size, buffer_size=buffer_size, rank=0, world_size=1,
                                      n_bins=cfg.n_bins, max_seq_len=cfg.max_seq_len)
        labels, batches = probe.label_categories, probe.batch_categories
        if label_key is not None and len(labels) < 2:
            raise ValueError(f"label_key {label_key!r} has {len(labels)} class(es); a classifier needs at least 2")
        if batch_key is not None:
            cfg = replace(cfg, n_batches=len(batches))
        self = cls.__new__(cls)
        self._setup(ScGPTModel(cfg, len(vocab), vocab.pad_id, n_classes=len(labels or ())), vocab, label_key,
                    batch_key, layer, labels, batches, device)
        self.source = source
        self._stream_options = {"chunk_size": chunk_size, "buffer_size": buffer_size}
        return self

    def _setup(self, module, vocab, label_key, batch_key, layer, label_categories, batch_categories, device):
        self._setup_base(module, vocab, label_key, batch_key, layer, label_categories, device)
        self.batch_categories = None if batch_categories is None else [to_py(c) for c in batch_categories]
        self.source = None  # backed .h5ad file(s) streamed by from_h5ad models
        self._stream_options: dict = {}

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

    def _train(self, objective, mask_ratio, *, epochs, batch_size, lr, validation_fraction, early_stopping_patience,
               class_weights, checkpoint_dir, resume, progress, mixed_precision, seed):
        from biogen.sc.data import collate

        from ..singlecell.training import fit_loop

        check_train_args(epochs, batch_size, lr, validation_fraction, early_stopping_patience, checkpoint_dir, resume)
        if self.source is not None:
            return self._train_streaming(objective, mask_ratio, epochs=epochs, batch_size=batch_size, lr=lr,
                                         validation_fraction=validation_fraction, class_weights=class_weights,
                                         checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                                         mixed_precision=mixed_precision, seed=seed)
        if self.adata is None:
            raise ValueError("this ScGPT has no training AnnData (it was loaded); construct ScGPT(adata, ...) to train")
        ds = self._dataset(self.adata, mask_ratio=mask_ratio, labels=objective == "classify", seed=seed)

        def get_batch(rows, gen):
            return self._to_device(collate([ds[int(i)] for i in rows]))

        loss_fn, n_correct = self._loss_fns(objective)
        return fit_loop(self, objective, n_cells=len(ds), labels=ds.labels if objective == "classify" else None,
                        params=self.module.parameters(), get_batch=get_batch, loss_fn=loss_fn,
                        n_correct=n_correct, epochs=epochs, batch_size=batch_size, lr=lr,
                        validation_fraction=validation_fraction, early_stopping_patience=early_stopping_patience,
                        class_weights=class_weights, checkpoint_dir=checkpoint_dir, resume=resume,
                        progress=progress, mixed_precision=mixed_precision, seed=seed, desc=f"scGPT {objective}",
                        on_epoch=ds.set_epoch)  # masks depend on (seed, epoch, cell) only: any world size

    def _loss_fns(self, objective):
        def loss_fn(module, batch, weights, gen):
            return module.loss(batch, objective, class_weights=weights)["loss"]

        def n_correct(module, batch):
            logits = module(batch["gene_ids"], batch["values"], batch["padding_mask"],
                            batch_ids=batch.get("batch_ids"), heads=("cls",)).logits
            ok = batch["labels"] >= 0
            return int((logits.argmax(1) == batch["labels"])[ok].sum()), int(ok.sum())

        return loss_fn, n_correct

    def _train_streaming(self, objective, mask_ratio, *, epochs, batch_size, lr, validation_fraction, class_weights,
                         checkpoint_dir, resume, progress, mixed_precision, seed):
        from biogen.sc import StreamingScGPTDataset
        from biogen.sc.data import collate

        from ... import distributed as bdist
        from ..singlecell.training import fit_loop

        if validation_fraction:
            raise ValueError("a model streaming from .h5ad files (from_h5ad) has no validation split: pass "
                             "validation_fraction=0 and evaluate with predict() on held-out cells")
        if class_weights:
            raise ValueError("class_weights needs the label counts of the training cells, which a streaming "
                             "model does not read up front; train without class_weights")
        bdist.init()
        world = bdist.world_size()
        if batch_size % world:
            raise ValueError(f"the global batch size ({batch_size}) must be divisible by the number of processes "
                             f"({world}) when streaming: each rank reads batch_size / world cells per step")
        c = self.config
        ds = StreamingScGPTDataset(
            self.source, self.vocab, layer=self.layer, label_key=self.label_key if objective == "classify" else None,
            batch_key=self.batch_key, n_bins=c.n_bins, max_seq_len=c.max_seq_len, mask_ratio=mask_ratio, seed=seed,
            label_categories=self.label_categories, batch_categories=self.batch_categories, even=True,
            **self._stream_options)
        local = batch_size // world

        def stream():
            for batch in DataLoader(ds, batch_size=local, collate_fn=collate):
                yield self._to_device(batch), batch["gene_ids"].shape[0]

        loss_fn, n_correct = self._loss_fns(objective)
        return fit_loop(self, objective, n_cells=None, labels=None, params=self.module.parameters(), get_batch=None,
                        loss_fn=loss_fn, n_correct=n_correct, epochs=epochs, batch_size=batch_size, lr=lr,
                        validation_fraction=0.0, early_stopping_patience=None, class_weights=False,
                        checkpoint_dir=checkpoint_dir, resume=resume, progress=progress,
                        mixed_precision=mixed_precision, seed=seed, desc=f"scGPT {objective} (streaming)",
                        on_epoch=ds.set_epoch, stream=stream, stream_steps=-(-len(ds) // local))

    # ------------------------------------------------------------------ inference

    def _check_query(self, adata, what="adata"):
        super()._check_query(adata, what)
        if self.batch_key is not None:
            col = obs_column(adata, self.batch_key, "batch_key", what)
            unknown = sorted(set(col.dropna().unique().tolist()) - set(self.batch_categories))
            if unknown:
                raise ValueError(f"{what}.obs[{self.batch_key!r}] has batches the model was not trained on: {unknown[:5]}")

    @torch.no_grad()
    def _run(self, adata, batch_size: int, min_gene_overlap, classify: bool):
        from biogen.sc.data import collate

        heads = ("cls",) if classify else ()
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
        adata = self._prepare_predict(adata, prefix, overwrite)
        emb, logits = self._run(adata, batch_size, min_gene_overlap, classify=True)
        proba = torch.softmax(logits, dim=1).numpy()
        return self._write_predictions(adata, prefix, copy, emb, proba, proba.argmax(1), self.label_categories)

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

    # ------------------------------------------------------------------ persistence

    def _meta(self) -> dict:
        return {"format": self._FORMAT, "version": 1, "config": self.config.to_dict(), "n_tokens": self.module.n_tokens,
                "pad_id": self.module.pad_id, "n_classes": self.module.n_classes, "label_key": self.label_key,
                "batch_key": self.batch_key, "layer": self.layer, "label_categories": self.label_categories,
                "batch_categories": self.batch_categories}

    @staticmethod
    def _module_from_meta(meta: dict) -> ScGPTModel:
        return ScGPTModel(ScGPTConfig.from_dict(meta["config"]), meta["n_tokens"], meta["pad_id"],
                          n_classes=meta["n_classes"])

    def _restore(self, module, vocab, meta: dict, device) -> None:
        self._setup(module, vocab, meta["label_key"], meta["batch_key"], meta["layer"], meta["label_categories"],
                    meta["batch_categories"], device)

    @classmethod
    def from_scgpt_checkpoint(cls, path: str, adata, label_key: Optional[str] = None, layer: Optional[str] = None,
                              device: Optional[Union[str, torch.device]] = None) -> "ScGPT":
        """Start from an original scGPT model folder (see :func:`load_scgpt_checkpoint`); with
        ``label_key`` a fresh classifier head for its categories is attached for :meth:`fit`."""
        module, vocab = load_scgpt_checkpoint(path)
        if module.config.n_batches:
            raise ValueError("checkpoints with a batch embedding are not supported by from_scgpt_checkpoint")
        check_adata(adata, layer)
        vocab.map_genes(adata, min_overlap=0.5)
        label_categories = cls._label_categories(adata, label_key)
        if label_categories is not None:
            module.replace_classifier(len(label_categories))
        self = cls.__new__(cls)
        self._setup(module, vocab, label_key, None, layer, label_categories, None, device)
        self.adata = adata
        return self

