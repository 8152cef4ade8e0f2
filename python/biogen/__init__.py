"""biogen: generative and foundation models for computational biology, with fast kernels."""

from ._version import __version__
from ._info import info

__all__ = ["__version__", "info"]
