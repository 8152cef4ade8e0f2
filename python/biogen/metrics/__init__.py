"""Metrics: generative-image scores (FID, KID, IS)."""

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
