"""PumaMedNet: a denoising beta-VAE for explainable, bias-aware medical image classification.

``network`` (config, loss, corruption, the tensors-in/tensors-out network), ``training``, ``explain``,
``audit``, ``data`` (synthetic chest X-rays, image folders) and ``cli`` (``biogen pumamednet``).
"""

from .audit import AuditItem, AuditReport, bias_audit, grid_regions, plot_audit
from .data import SyntheticCXR, load_images, make_synthetic_cxr, write_synthetic_folder
from .explain import classifier_directions, explain, latent_traversal
from .network import (PRESETS, Corrupted, PumaMedNet, PumaMedNetConfig, VAELoss, beta_vae_loss, corrupt,
                      kl_diag_gaussian, random_geometry)
from .training import fit_classifier, fit_vae

__all__ = [
    "PumaMedNetConfig", "PRESETS", "PumaMedNet", "VAELoss", "beta_vae_loss", "kl_diag_gaussian",
    "Corrupted", "corrupt", "random_geometry", "fit_vae", "fit_classifier", "latent_traversal",
    "classifier_directions", "explain", "AuditItem", "AuditReport", "bias_audit", "plot_audit",
    "grid_regions", "SyntheticCXR", "make_synthetic_cxr", "write_synthetic_folder", "load_images",
]
