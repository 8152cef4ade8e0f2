"""The scGPT-style network: tensors in, tensors out (no AnnData here; see :mod:`biogen.models.scgpt`).

Layout and parameter names follow the reference ``scgpt.model.TransformerModel`` (bowang-lab/scGPT
v0.2.4) so that its checkpoints load name for name: ``encoder.embedding`` / ``encoder.enc_norm``,
``value_encoder.linear1`` / ``linear2`` / ``norm`` (continuous) or ``value_encoder.embedding`` /
``enc_norm`` (category), ``batch_encoder.*``, ``transformer_encoder.layers.N.*``, ``decoder.fc.*``,
``mvc_decoder.gene2query`` / ``W``, ``cls_decoder._decoder.*`` / ``out_layer``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from biogen.nn.transformer import TransformerEncoder

INPUT_STYLES = ("continuous", "category")
CELL_EMB_STYLES = ("cls", "avg-pool")
OBJECTIVES = ("mlm", "generative", "both", "classify")


@dataclass
class ScGPTConfig:
    """Hyper-parameters of the scGPT-style model, validated on construction.

    Defaults are the reference's whole-human model (the ``paper`` preset); use
    :meth:`preset` for ``tiny`` (tests), ``small`` (CPU demo) and ``paper``.

    Attributes
    ----------
    d_model, nhead, nlayers, d_hid : transformer width, heads, depth, feed-forward width.
    dropout : dropout of embeddings, residual branches and feed-forward (thesis fine-tuning: 0.2).
    n_bins : number of expression bins (bin 0 = zero expression).
    input_style : ``"continuous"`` (values through Linear(1,d)-ReLU-Linear-LayerNorm, clamped at
        ``max_value``) or ``"category"`` (integer bins through an Embedding with pad/mask rows).
    max_seq_len : tokens per cell including ``<cls>`` (>= 2).
    cell_emb_style : ``"cls"`` (output at position 0) or ``"avg-pool"`` (mean over non-pad tokens).
    pre_norm : pre-norm transformer blocks instead of post-norm (``nn.TransformerEncoderLayer``).
    n_batches : number of batch / condition labels for the batch embedding (None: no batch input).
    mvc : build the MVC head (cell embedding x gene embedding -> value); needed by :meth:`generate`.
    nlayers_cls : layers of the classifier MLP (the last one is the output layer).
    pad_value, mask_value : input value at padded / masked (hidden) positions.
    mask_ratio : fraction of non-zero genes masked (or made unknown) in pretraining.
    max_value : continuous inputs are clamped at this value.
    """

    d_model: int = 512
    nhead: int = 8
    nlayers: int = 12
    d_hid: int = 512
    dropout: float = 0.2
    n_bins: int = 51
    input_style: str = "continuous"
    max_seq_len: int = 1200
    cell_emb_style: str = "cls"
    pre_norm: bool = False
    n_batches: Optional[int] = None
    mvc: bool = True
    nlayers_cls: int = 3
    pad_value: float = -2.0
    mask_value: float = -1.0
    mask_ratio: float = 0.4
    max_value: float = 512.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"ScGPTConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("d_model", "nhead", "nlayers", "d_hid", "nlayers_cls"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.d_model % self.nhead:
            bad("d_model", f"must be divisible by nhead={self.nhead}")
        if self.d_model // self.nhead > 128:
            bad("nhead", f"head dimension d_model/nhead={self.d_model // self.nhead} exceeds 128")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        if not isinstance(self.n_bins, int) or self.n_bins < 3:
            bad("n_bins", "must be an integer >= 3")
        if self.input_style not in INPUT_STYLES:
            bad("input_style", f"must be one of {INPUT_STYLES}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            bad("max_seq_len", "must be an integer >= 2 (the <cls> token plus at least one gene)")
        if self.cell_emb_style not in CELL_EMB_STYLES:
            bad("cell_emb_style", f"must be one of {CELL_EMB_STYLES}")
        if self.n_batches is not None and (not isinstance(self.n_batches, int) or self.n_batches < 1):
            bad("n_batches", "must be None or a positive integer")
        if not 0.0 < self.mask_ratio < 1.0:
            bad("mask_ratio", "must be in (0, 1)")
        if self.pad_value == self.mask_value:
            bad("mask_value", "must differ from pad_value")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ScGPTConfig":
        """``tiny`` (tests), ``small`` (CPU demo) or ``paper`` (d_model 512, 8 heads, 12 layers)."""
        if name not in PRESETS:
            raise ValueError(f"unknown ScGPTConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ScGPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ScGPTConfig got unknown keys {unknown}")
        return cls(**d)


PRESETS = {
    "tiny": ScGPTConfig(d_model=32, nhead=2, nlayers=2, d_hid=64, dropout=0.0, max_seq_len=64),
    "small": ScGPTConfig(d_model=128, nhead=4, nlayers=4, d_hid=256, dropout=0.2, max_seq_len=1200),
    "paper": ScGPTConfig(),
}


@dataclass
class ScGPTOutput:
    """Outputs of :meth:`ScGPTModel.forward` (B = cells, L = tokens).

    cell_emb: (B, d_model). hidden: (B, L, d_model) last transformer layer. expr_pred: (B, L)
    expression decoder value per token. mvc_pred: (B, L) or None, MVC value per token from the cell
    embedding. logits: (B, n_classes) or None.
    """

    cell_emb: torch.Tensor
    hidden: torch.Tensor
    expr_pred: torch.Tensor
    mvc_pred: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


@dataclass
class GenerationResult:
    """Result of :meth:`ScGPTModel.generate`.

    values: (B, L) inputs with every originally unknown gene filled in. step: (B, L) long, the
    iteration at which each gene was generated (-1 for genes that were known or padding).
    """

    values: torch.Tensor
    step: torch.Tensor


class GeneEncoder(nn.Module):
    def __init__(self, n_tokens: int, d_model: int, padding_idx: Optional[int]):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids):
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    def __init__(self, d_model: int, dropout: float, max_value: float):
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_value = max_value

    def forward(self, values):
        x = values.unsqueeze(-1).clamp(max=self.max_value)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Bins 0..n_bins-1, then row n_bins for padding and n_bins+1 for masked values."""

    def __init__(self, n_bins: int, d_model: int, pad_value: float, mask_value: float):
        super().__init__()
        self.n_bins, self.pad_value, self.mask_value = n_bins, pad_value, mask_value
        self.embedding = nn.Embedding(n_bins + 2, d_model, padding_idx=n_bins)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, values):
        idx = values.round().clamp(0, self.n_bins - 1).long()
        idx = torch.where(values == self.pad_value, self.n_bins, idx)
        idx = torch.where(values == self.mask_value, self.n_bins + 1, idx)
        return self.enc_norm(self.embedding(idx))


class ExprDecoder(nn.Module):
    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_in, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )

    def forward(self, h):
        return self.fc(h).squeeze(-1)


class MVCDecoder(nn.Module):
    """scGPT's "inner product" MVC head: value_j = W sigmoid(gene2query(gene_emb_j)) . cell_emb."""

    def __init__(self, d_model: int, d_in: int):
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_in, bias=False)

    def forward(self, cell_emb, gene_emb):
        """cell_emb: (B, d_in); gene_emb: (B, L, d_model) -> (B, L)."""
        q = self.W(torch.sigmoid(self.gene2query(gene_emb)))
        return torch.einsum("bld,bd->bl", q, cell_emb)


class ClsDecoder(nn.Module):
    def __init__(self, d_model: int, n_classes: int, nlayers: int):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x):
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over True positions; 0 (with gradient) when there are none, never NaN."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


class ScGPTModel(nn.Module):
    """scGPT-style transformer over gene tokens.

    Parameters
    ----------
    config : :class:`ScGPTConfig`.
    n_tokens : vocabulary size (genes + special tokens).
    pad_id : id of ``<pad>`` in the vocabulary (its embedding row stays zero).
    n_classes : classifier outputs; 0 builds no classifier head.
    """

    def __init__(self, config: ScGPTConfig, n_tokens: int, pad_id: int, n_classes: int = 0):
        super().__init__()
        if n_tokens < 2:
            raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
        if not 0 <= pad_id < n_tokens:
            raise ValueError(f"pad_id={pad_id} is outside the vocabulary of {n_tokens} tokens")
        if n_classes < 0 or n_classes == 1:
            raise ValueError(f"n_classes must be 0 (no classifier) or >= 2, got {n_classes}")
        self.config, self.n_tokens, self.pad_id, self.n_classes = config, n_tokens, pad_id, n_classes
        c = config
        self.encoder = GeneEncoder(n_tokens, c.d_model, pad_id)
        if c.input_style == "continuous":
            self.value_encoder = ContinuousValueEncoder(c.d_model, c.dropout, c.max_value)
        else:
            self.value_encoder = CategoryValueEncoder(c.n_bins, c.d_model, c.pad_value, c.mask_value)
        self.batch_encoder = GeneEncoder(c.n_batches, c.d_model, None) if c.n_batches else None
        self.transformer_encoder = TransformerEncoder(c.nlayers, c.d_model, c.nhead, c.d_hid, c.dropout, c.pre_norm)
        d_in = 2 * c.d_model if c.n_batches else c.d_model  # batch embedding is concatenated, as in scGPT
        self.decoder = ExprDecoder(d_in, c.d_model)
        self.mvc_decoder = MVCDecoder(c.d_model, d_in) if c.mvc else None
        self.cls_decoder = ClsDecoder(c.d_model, n_classes, c.nlayers_cls) if n_classes else None
        with torch.no_grad():  # the reference's initialisation of the gene embedding
            self.encoder.embedding.weight.uniform_(-0.1, 0.1)
            self.encoder.embedding.weight[pad_id].zero_()

    def replace_classifier(self, n_classes: int) -> None:
        """Attach a fresh classifier head with ``n_classes`` outputs (fine-tuning a pretrained model)."""
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        dev = self.encoder.embedding.weight.device
        self.cls_decoder = ClsDecoder(self.config.d_model, n_classes, self.config.nlayers_cls).to(dev)
        self.n_classes = n_classes

    # ------------------------------------------------------------------ forward

    def _check(self, gene_ids, values, padding_mask, known, batch_ids):
        if gene_ids.ndim != 2 or gene_ids.dtype != torch.long:
            raise ValueError(f"gene_ids must be (batch, length) int64, got {tuple(gene_ids.shape)} {gene_ids.dtype}")
        B, L = gene_ids.shape
        if L < 2:
            raise ValueError(f"sequences need <cls> plus at least one gene; got length {L}")
        if values.shape != (B, L) or not values.is_floating_point():
            raise ValueError(f"values must be float of shape {(B, L)}, got {tuple(values.shape)} {values.dtype}")
        for name, m in (("padding_mask", padding_mask), ("known", known)):
            if m is not None and (m.shape != (B, L) or m.dtype != torch.bool):
                raise ValueError(f"{name} must be bool of shape {(B, L)}, got {tuple(m.shape)} {m.dtype}")
        if self.batch_encoder is not None:
            if batch_ids is None or batch_ids.shape != (B,):
                raise ValueError(f"this model has a batch embedding (n_batches={self.config.n_batches}): "
                                 f"batch_ids of shape ({B},) is required")
        elif batch_ids is not None:
            raise ValueError("batch_ids given but the model has no batch embedding (config.n_batches is None)")

    def forward(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        known: Optional[torch.Tensor] = None,
        batch_ids: Optional[torch.Tensor] = None,
        *,
        heads: tuple[str, ...] = ("expr", "mvc", "cls"),
    ) -> ScGPTOutput:
        """Encode cells and run the requested heads.

        Parameters
        ----------
        gene_ids : (batch, length) int64, ``<cls>`` at position 0.
        values : (batch, length) float, binned or continuous input values.
        padding_mask : (batch, length) bool, True = padding (None: no padding).
        known : (batch, length) bool, True = known token (generative split). Values of unknown genes
            are replaced by ``mask_value`` here, whatever the caller passed, and attention follows
            :func:`biogen.ops.masked_gene_attention`. None: every token known.
        batch_ids : (batch,) int64, required iff ``config.n_batches`` is set.
        heads : which of "expr", "mvc", "cls" to compute (missing heads are skipped).
        """
        self._check(gene_ids, values, padding_mask, known, batch_ids)
        c = self.config
        if known is not None:
            values = values.masked_fill(~known, c.mask_value)
        if padding_mask is not None:
            values = values.masked_fill(padding_mask, c.pad_value)
        gene_emb = self.encoder(gene_ids)
        h = self.transformer_encoder(gene_emb + self.value_encoder(values), padding_mask, known)
        if c.cell_emb_style == "cls":
            cell_emb = h[:, 0]
        else:
            valid = torch.ones_like(gene_ids, dtype=torch.bool) if padding_mask is None else ~padding_mask
            cell_emb = (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        dec_in, cell_in = h, cell_emb
        if self.batch_encoder is not None:
            b = self.batch_encoder(batch_ids)
            dec_in = torch.cat([h, b[:, None, :].expand(-1, h.shape[1], -1)], dim=-1)
            cell_in = torch.cat([cell_emb, b], dim=-1)
        out = ScGPTOutput(cell_emb=cell_emb, hidden=h, expr_pred=self.decoder(dec_in) if "expr" in heads else None)
        if "mvc" in heads and self.mvc_decoder is not None:
            out.mvc_pred = self.mvc_decoder(cell_in, gene_emb)
        if "cls" in heads and self.cls_decoder is not None:
            out.logits = self.cls_decoder(cell_emb)
        return out

    # ------------------------------------------------------------------ objectives

    def loss(self, batch: dict, objective: str = "mlm", class_weights: Optional[torch.Tensor] = None) -> dict:
        """Training loss for one collated batch (see :func:`biogen.sc.collate` for the keys).

        objective
            ``"mlm"``: masked value prediction, MSE of the expression (and MVC) heads at
            ``mlm_mask`` positions, whose inputs are set to ``mask_value``; every token known.
            ``"generative"``: the genes to predict are *unknown*: their values are hidden and the
            attention mask of SPEC 1.1 applies; MSE at unknown genes. The split is ``batch["known"]``
            when it hides something, else ``~mlm_mask`` (``<cls>`` always known).
            ``"both"``: the sum of the two on the same batch.
            ``"classify"``: cross-entropy of the classifier on ``labels`` (``class_weights``: (n_classes,)).

        Returns a dict with ``loss`` (the total) and its parts.
        """
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        ids, vals, pad = batch["gene_ids"], batch["values"], batch["padding_mask"]
        bids = batch.get("batch_ids") if self.batch_encoder is not None else None
        parts: dict = {}
        if objective == "classify":
            if self.cls_decoder is None:
                raise ValueError("objective 'classify' needs a classifier head: build the model with n_classes >= 2")
            if "labels" not in batch:
                raise ValueError("objective 'classify' needs batch['labels']")
            out = self.forward(ids, vals, pad, None, bids, heads=("cls",))
            w = None if class_weights is None else class_weights.to(out.logits.device, out.logits.dtype)
            labels = batch["labels"]
            if bool((labels >= 0).any()):  # -100 marks cells without a usable label
                parts["cls"] = F.cross_entropy(out.logits.float(), labels, weight=None if w is None else w.float())
            else:  # a batch of unlabelled cells contributes nothing (cross-entropy would be NaN)
                parts["cls"] = out.logits.float().sum() * 0.0
        target = batch.get("target_values")
        if objective in ("mlm", "both"):
            m = batch["mlm_mask"] & ~pad
            out = self.forward(ids, vals.masked_fill(m, self.config.mask_value), pad, None, bids, heads=("expr", "mvc"))
            parts["mlm"] = _masked_mean((out.expr_pred.float() - target) ** 2, m)
            if out.mvc_pred is not None:
                parts["mlm_mvc"] = _masked_mean((out.mvc_pred.float() - target) ** 2, m)
        if objective in ("generative", "both"):
            known = batch.get("known")
            if known is None or bool((known | pad).all()):
                known = ~batch["mlm_mask"]
            known = known.clone()
            known[:, 0] = True
            unknown = ~known & ~pad
            out = self.forward(ids, vals, pad, known, bids, heads=("expr", "mvc"))
            parts["gen"] = _masked_mean((out.expr_pred.float() - target) ** 2, unknown)
            if out.mvc_pred is not None:
                parts["gen_mvc"] = _masked_mean((out.mvc_pred.float() - target) ** 2, unknown)
        parts["loss"] = sum(parts.values())
        return parts

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(
        self,
        gene_ids: torch.Tensor,
        values: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        known: torch.Tensor,
        n_iters: int = 1,
        batch_ids: Optional[torch.Tensor] = None,
    ) -> GenerationResult:
        """K-step generative inference: fill in the values of unknown genes.

        Each of the ``n_iters`` iterations runs one dropout-free (eval-mode) pass with the current
        known/unknown split and turns the most confident ``1/(iterations left)`` of each cell's
        remaining unknown genes into known genes carrying their predicted value, so that after K
        iterations every gene is generated and later genes condition on earlier ones.

        Confidence of a prediction is the agreement of the model's two independent value heads,
        ``-|expr_pred - mvc_pred|`` (the expression decoder reads the gene's own token; the MVC head
        reads only the cell embedding and the gene identity): where the two routes agree the value is
        better determined. It is a heuristic, not a calibrated probability. Requires ``config.mvc``.

        Shapes: gene_ids, values, padding_mask, known (batch, length); batch_ids (batch,).
        """
        if self.mvc_decoder is None:
            raise ValueError("generate() ranks genes by expression/MVC head agreement: build with config.mvc=True")
        if not isinstance(n_iters, int) or n_iters < 1:
            raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}")
        self._check(gene_ids, values, padding_mask, known, batch_ids)
        was_training = self.training
        self.eval()
        try:
            pad = torch.zeros_like(known) if padding_mask is None else padding_mask
            cur_known = known | pad
            cur_known[:, 0] = True
            values = values.clone()
            step = torch.full_like(gene_ids, -1)
            c = self.config
            for it in range(n_iters):
                remaining = ~cur_known
                if not remaining.any():
                    break
                out = self.forward(gene_ids, values, padding_mask, cur_known, batch_ids, heads=("expr", "mvc"))
                pred = out.expr_pred.float()
                if c.input_style == "category":
                    pred = pred.round().clamp(0, c.n_bins - 1)
                conf = -(out.expr_pred.float() - out.mvc_pred.float()).abs()
                conf = conf.masked_fill(~remaining, float("-inf"))
                n_take = torch.ceil(remaining.sum(1).float() / (n_iters - it)).long()
                rank = torch.argsort(torch.argsort(conf, dim=1, descending=True, stable=True), dim=1)
                take = (rank < n_take[:, None]) & remaining
                values = torch.where(take, pred.to(values.dtype), values)
                step = torch.where(take, torch.full_like(step, it), step)
                cur_known = cur_known | take
        finally:
            self.train(was_training)
        return GenerationResult(values=values, step=step)

    @torch.no_grad()
    def embed(self, gene_ids, values, padding_mask=None, batch_ids=None) -> torch.Tensor:
        """Cell embeddings (batch, d_model) from one eval-mode pass (no heads run)."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(gene_ids, values, padding_mask, None, batch_ids, heads=()).cell_emb
        finally:
            self.train(was_training)
