"""Metrics: generative-image scores (FID, KID, IS) and cell-composition fidelity."""

from .composition import (
    CompositionFidelity,
    PerturbationEffect,
    composition_fidelity,
    perturbation_effect,
    plot_composition,
)

from .generative import (
    DomainCNN,
    DomainFeatures,
    GenerativeScores,
    InceptionFeatures,
    evaluate_images,
    extract,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid_from_features,
)

__all__ = [
    "CompositionFidelity",
    "PerturbationEffect",
    "composition_fidelity",
    "perturbation_effect",
    "plot_composition",
    "DomainCNN",
    "DomainFeatures",
    "GenerativeScores",
    "InceptionFeatures",
    "evaluate_images",
    "extract",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "kid_from_features",
]
