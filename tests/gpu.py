"""The one marker module for GPU-only tests: ``from tests.gpu import requires_cuda``."""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
