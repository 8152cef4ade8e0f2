import os

import pytest
import torch

# Triton kernels run on the CPU only under its interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.pop("BIOGEN_BACKEND", None)  # tests choose backends explicitly


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
