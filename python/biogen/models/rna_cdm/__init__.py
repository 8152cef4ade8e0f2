"""RNA-CDM: ``vae`` (the RNA beta-VAE whose latent conditions diffusion), ``cascade`` (the two-stage
diffusion cascade) and ``cli`` (``biogen rnacdm``)."""

from .cascade import (CASCADE_PRESETS, CascadeConfig, CascadeTrainConfig, LatentTokens, RNACDM, cascade_preset,
                      train_cascade)
from .vae import (RNAVAE, RNAEncoder, RNAVAEConfig, VAEHistory, VAETrainConfig, kl_divergence, plot_latents,
                  stratified_split)

__all__ = [
    "CASCADE_PRESETS", "CascadeConfig", "CascadeTrainConfig", "LatentTokens", "RNACDM", "cascade_preset",
    "train_cascade", "RNAVAE", "RNAVAEConfig", "RNAEncoder", "VAETrainConfig", "VAEHistory", "kl_divergence",
    "plot_latents", "stratified_split",
]
