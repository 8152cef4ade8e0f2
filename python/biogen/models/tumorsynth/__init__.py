"""TumorSynth: ``networks`` (config, discriminator, the two generators), ``training`` (GAN loop,
checkpoints, sampling) and ``cli`` (``biogen tumorsynth``)."""

from .networks import Discriminator, Generator1, Generator2, TumorSynthConfig, build_models, count_parameters
from .training import EpochRecord, TrainResult, default_extractor, load_generator, sample, train

__all__ = [
    "Discriminator", "Generator1", "Generator2", "TumorSynthConfig", "build_models", "count_parameters",
    "EpochRecord", "TrainResult", "default_extractor", "load_generator", "sample", "train",
]
