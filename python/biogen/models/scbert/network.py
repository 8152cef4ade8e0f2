"""scBERT-style network (SPEC 2.3): tensors in, tensors out.

Every gene of a fixed panel is a token: a cell is a (n_genes + 1,) vector of expression tokens
(0..5, 6 = mask; the last position is the extra token the original appends). Input embedding =
token embedding + gene embedding (the original's gene2vec "positional" embedding: position i is
panel gene i). Encoder: pre-norm Performer layers (as performer-pytorch's ``PerformerLM``) on
:class:`biogen.nn.PerformerAttention`, then a final LayerNorm.

Heads: the MLM head (Linear(dim, n_tokens)) and the fine-tuning head of the original
(``finetune.py``'s ``Identity``): a 1 x dim convolution that turns each gene's dim-vector into one
number, ReLU, then Linear(n_genes + 1, 512) -> ReLU -> Linear(512, 128) -> ReLU -> Linear(128, classes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from biogen.nn import PerformerAttention
from biogen.nn.performer import _compute_dtype

__all__ = ["ScBERTConfig", "ScBERTModel", "ScBERTOutput", "N_BINS", "MASK_TOKEN", "PRESETS"]

N_BINS = 6  # expression tokens 0..5
MASK_TOKEN = 6  # the original's CLASS - 1 with CLASS = bin_num + 2 = 7


@dataclass
class ScBERTConfig:
    """scBERT hyper-parameters (``paper``: the original's PerformerLM on 16,906 genes).

    dim, depth, heads, dim_head, ff_mult : encoder width, layers, heads, head width, FF expansion.
    nb_features : random features per head (None: int(dim_head * ln dim_head), 64 -> 266).
    redraw_interval : redraw the projections every this many training forward calls (the
        original's feature_redraw_interval 1000); None never redraws. Eval never redraws.
    n_tokens : 7 (bins 0..5 and the mask token 6).
    emb_dropout, ff_dropout, attn_dropout : dropouts of the encoder (all 0 in the original).
    head_hidden : widths of the two hidden layers of the classification head (512, 128).
    head_dropout : dropout after each hidden layer of the head (the original fine-tunes with 0).
    mask_prob, replace_prob : MLM: fraction of non-zero genes masked (0.15) and, of those, the
        fraction replaced by the mask token (0.9; the rest keep their token).
    freeze_gene_emb : keep the gene embedding fixed (the original's gene2vec embedding is frozen).
    trainable_layers : fine-tuning freezes all but the last ``trainable_layers`` encoder layers, the
        final norm and the head (the original: 1, see :meth:`ScBERTModel.freeze_for_finetuning`);
        None trains everything.
    backend : kernel backend for the Performer attention (None: automatic).
    gradient_checkpointing : recompute each layer in the backward pass instead of storing its
        activations (``paper`` at 16,907 genes, float32: ~0.45 GB instead of ~1.7 GB per cell,
        ~1.25x the step time; bf16 autocast without checkpointing: ~1.1 GB, see
        benchmarks/bench_scbert.py).
    """

    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    ff_mult: int = 4
    nb_features: Optional[int] = 266
    redraw_interval: Optional[int] = 1000
    n_tokens: int = 7
    emb_dropout: float = 0.0
    ff_dropout: float = 0.0
    attn_dropout: float = 0.0
    head_hidden: tuple = (512, 128)
    head_dropout: float = 0.0
    mask_prob: float = 0.15
    replace_prob: float = 0.9
    freeze_gene_emb: bool = False
    trainable_layers: Optional[int] = None
    backend: Optional[str] = None
    gradient_checkpointing: bool = False

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"ScBERTConfig.{name}={getattr(self, name)!r}: {why}")

        self.head_hidden = tuple(int(h) for h in self.head_hidden)
        for name in ("dim", "depth", "heads", "dim_head", "ff_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, "must be a positive integer")
        if self.dim_head > 128:
            bad("dim_head", "the Performer kernels support head dimension at most 128")
        if self.nb_features is not None and (not isinstance(self.nb_features, int) or self.nb_features < 1):
            bad("nb_features", "must be a positive integer or None")
        if self.redraw_interval is not None and (not isinstance(self.redraw_interval, int) or self.redraw_interval < 1):
            bad("redraw_interval", "must be a positive integer or None")
        if self.n_tokens != N_BINS + 1:
            bad("n_tokens", f"must be {N_BINS + 1} (bins 0..{N_BINS - 1} and the mask token)")
        for name in ("emb_dropout", "ff_dropout", "attn_dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if len(self.head_hidden) != 2 or min(self.head_hidden) < 1:
            bad("head_hidden", "must be two positive widths")
        if not 0.0 < self.mask_prob < 1.0:
            bad("mask_prob", "must be in (0, 1)")
        if not 0.0 <= self.replace_prob <= 1.0:
            bad("replace_prob", "must be in [0, 1]")
        if self.trainable_layers is not None and not 0 <= self.trainable_layers <= self.depth:
            bad("trainable_layers", f"must be None or in [0, depth={self.depth}]")

    @property
    def n_features(self) -> int:
        return self.nb_features or int(self.dim_head * math.log(self.dim_head))

    @classmethod
    def preset(cls, name: str, **overrides) -> "ScBERTConfig":
        """``tiny`` (tests), ``small`` (CPU, a few hundred genes) or ``paper`` (the original)."""
        if name not in PRESETS:
            raise ValueError(f"unknown ScBERTConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head_hidden"] = list(self.head_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScBERTConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ScBERTConfig got unknown keys {unknown}")
        return cls(**d)


PRESETS = {
    "tiny": ScBERTConfig(dim=16, depth=1, heads=2, dim_head=8, ff_mult=2, nb_features=16, redraw_interval=1000,
                         head_hidden=(32, 16)),
    # CPU fine-tuning on a few hundred genes from scratch: narrow and shallow, the original's head
    "small": ScBERTConfig(dim=32, depth=2, heads=2, dim_head=16, ff_mult=2, nb_features=32, redraw_interval=1000,
                          head_hidden=(512, 128), head_dropout=0.1),
    "paper": ScBERTConfig(),
}


@dataclass
class ScBERTOutput:
    """encodings: (batch, n_genes + 1, dim) after the final norm; cell_emb: (batch, dim) mean over the
    n_genes panel positions; logits: (batch, classes) or None; mlm_logits: (n_masked, n_tokens) or None."""

    encodings: torch.Tensor
    cell_emb: torch.Tensor
    logits: Optional[torch.Tensor] = None
    mlm_logits: Optional[torch.Tensor] = None


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, dim * mult)
        self.w2 = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        h = self.w1(x)
        if self.dropout.p > 0 and self.training:
            return self.w2(self.dropout(F.gelu(h)))
        return _GeluLinear.apply(h, self.w2.weight, self.w2.bias, _compute_dtype(h, self.w2.weight))


class _GeluLinear(torch.autograd.Function):
    """y = Linear(GELU(h)) that saves the pre-activation h only and recomputes GELU(h) in the backward.

    Plain autograd keeps both h (for GELU's backward) and GELU(h) (for the weight gradient): two
    (length, ff_mult * dim) activations per layer, the largest ones of the model. One GELU more per
    layer in the backward buys one of them back.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, dtype):
        h_in_dtype = h.dtype
        with torch.autocast(h.device.type, enabled=False):
            h, w = h.to(dtype), weight.to(dtype)
            y = F.linear(F.gelu(h), w, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(h, w)
        ctx.has_bias, ctx.h_dtype, ctx.w_dtype = bias is not None, h_in_dtype, weight.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g = g.to(w.dtype)
        a = F.gelu(h)
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        dw = (g2.t() @ a2).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        del a, a2
        dh = torch.ops.aten.gelu_backward(g @ w, h).to(ctx.h_dtype) if ctx.needs_input_grad[0] else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            db = g2.sum(0, dtype=acc).to(ctx.w_dtype)
        return dh, dw, db, None


class PerformerLayer(nn.Module):
    """Pre-norm block: x + Drop(Attn(LN(x))), then x + FF(LN(x)) (performer-pytorch's PreLayerNorm)."""

    def __init__(self, c: ScBERTConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(c.dim)
        # redraws are counted here, not in the attention layer: a checkpointed layer runs its forward twice
        self.attn = PerformerAttention(c.dim, heads=c.heads, dim_head=c.dim_head, nb_features=c.n_features,
                                       redraw_interval=None, backend=c.backend)
        self.redraw_interval, self.checkpoint = c.redraw_interval, c.gradient_checkpointing
        self.attn_dropout = nn.Dropout(c.attn_dropout)
        self.ff_norm = nn.LayerNorm(c.dim)
        self.ff = _FeedForward(c.dim, c.ff_mult, c.ff_dropout)

    def _block(self, x):
        x = x + self.attn_dropout(self.attn(self.attn_norm(x)))
        return x + self.ff(self.ff_norm(x))

    def forward(self, x):
        if self.training and self.redraw_interval is not None:
            # performer-pytorch's schedule: calls 1..interval use the current projection, then redraw
            if int(self.attn.calls_since_redraw) >= self.redraw_interval:
                self.attn.redraw_projection()
            self.attn.calls_since_redraw += 1
        if self.checkpoint and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._block, x, use_reentrant=False)  # RNG state is replayed for dropout
        return self._block(x)


class ClassificationHead(nn.Module):
    """The original fine-tuning head: conv (1 x dim per gene) -> ReLU -> flatten -> MLP."""

    def __init__(self, dim: int, seq_len: int, hidden: tuple, n_classes: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.fc1 = nn.Linear(seq_len, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x: (batch, seq_len, dim) -> (batch, n_classes)."""
        # the 1 x dim convolution is one dot product per gene: a matvec instead of a Conv2d call
        h = F.relu(x @ self.conv1.weight.reshape(-1) + self.conv1.bias)
        h = self.dropout(F.relu(self.fc1(h)))
        h = self.dropout(F.relu(self.fc2(h)))
        return self.fc3(h)


class ScBERTModel(nn.Module):
    """scBERT network on a panel of ``n_genes`` genes (sequence length n_genes + 1).

    Parameters
    ----------
    config : :class:`ScBERTConfig`.
    n_genes : panel size (16,906 in the original).
    n_classes : classification head outputs; 0 builds no head.
    """

    def __init__(self, config: ScBERTConfig, n_genes: int, n_classes: int = 0):
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        self.config, self.n_genes, self.n_classes = config, int(n_genes), int(n_classes)
        c = config
        self.token_emb = nn.Embedding(c.n_tokens, c.dim)
        self.gene_emb = nn.Embedding(n_genes + 1, c.dim)
        self.gene_emb.weight.requires_grad_(not c.freeze_gene_emb)
        self.emb_dropout = nn.Dropout(c.emb_dropout)
        self.layers = nn.ModuleList(PerformerLayer(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.mlm_head = nn.Linear(c.dim, c.n_tokens)
        self.cls_head = (ClassificationHead(c.dim, n_genes + 1, c.head_hidden, n_classes, c.head_dropout)
                         if n_classes else None)

    @property
    def seq_len(self) -> int:
        return self.n_genes + 1

    def replace_classifier(self, n_classes: int) -> None:
        c = self.config
        dev = self.token_emb.weight.device
        self.n_classes = int(n_classes)
        self.cls_head = ClassificationHead(c.dim, self.seq_len, c.head_hidden, n_classes, c.head_dropout).to(dev)

    @torch.no_grad()
    def set_gene_vectors(self, vectors: torch.Tensor, known: torch.Tensor) -> None:
        """Copy gene vectors into the gene embedding. vectors: (n_genes, dim); known: (n_genes,) bool,
        rows to copy (others keep their initialisation). The extra last position is set to zero, as
        the original's gene2vec embedding."""
        w = self.gene_emb.weight
        w[:-1][known] = vectors[known].to(w)
        w[-1].zero_()

    def freeze_for_finetuning(self, trainable_layers: Optional[int]) -> None:
        """Freeze all but the last ``trainable_layers`` encoder layers, the final norm and the head.

        The original unfreezes ``norm`` and ``performer.net.layers[-2]`` (the second-to-last layer,
        leaving the last frozen); here the last layers are the trainable ones. None: all trainable
        (the gene embedding stays as ``config.freeze_gene_emb`` says).
        """
        for p in self.parameters():
            p.requires_grad_(trainable_layers is None)
        if trainable_layers is None:
            self.gene_emb.weight.requires_grad_(not self.config.freeze_gene_emb)
            return
        keep = [self.norm] + ([self.cls_head] if self.cls_head is not None else [])
        keep += list(self.layers[len(self.layers) - trainable_layers:]) if trainable_layers else []
        for m in keep:
            for p in m.parameters():
                p.requires_grad_(True)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch, n_genes + 1) int64 in [0, n_tokens) -> (batch, n_genes + 1, dim)."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"tokens must have shape (batch, {self.seq_len}), got {tuple(tokens.shape)}")
        x = self.token_emb(tokens) + self.gene_emb.weight[None]
        x = self.emb_dropout(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, *, classify: bool = True,
                mlm_positions: Optional[torch.Tensor] = None) -> ScBERTOutput:
        """tokens: (batch, n_genes + 1) int64. ``mlm_positions``: (batch, n_genes + 1) bool, positions
        whose MLM logits are returned (flattened in row-major order)."""
        enc = self.encode(tokens)
        out = ScBERTOutput(encodings=enc, cell_emb=enc[:, :-1].mean(1))
        if classify and self.cls_head is not None:
            out.logits = self.cls_head(enc)
        if mlm_positions is not None:
            out.mlm_logits = self.mlm_head(enc[mlm_positions])
        return out

    def mlm_mask(self, tokens: torch.Tensor, generator: Optional[torch.Generator] = None):
        """The original's masking: each non-zero gene (never the extra last position) is chosen with
        probability ``mask_prob``; of those, ``replace_prob`` get the mask token.

        Returns (masked_tokens, chosen) with chosen: (batch, n_genes + 1) bool.
        """
        c = self.config
        u = torch.rand(tokens.shape, generator=generator, device="cpu").to(tokens.device)
        r = torch.rand(tokens.shape, generator=generator, device="cpu").to(tokens.device)
        eligible = tokens > 0
        eligible[:, -1] = False
        chosen = eligible & (u < c.mask_prob)
        masked = torch.where(chosen & (r < c.replace_prob), torch.full_like(tokens, MASK_TOKEN), tokens)
        return masked, chosen

    def mlm_loss(self, tokens: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        masked, chosen = self.mlm_mask(tokens, generator)
        out = self(masked, classify=False, mlm_positions=chosen)
        if out.mlm_logits.shape[0] == 0:
            return out.encodings.sum() * 0.0  # no non-zero gene in the batch: keep the graph, no signal
        return F.cross_entropy(out.mlm_logits.float(), tokens[chosen])
