import os
import sys
from pathlib import Path

import pytest
import torch

# Triton runs kernels on CPU tensors only through its interpreter, which must be chosen before
# triton is imported; on a machine without CUDA every kernel test runs interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The reference fixtures were made with 2 threads; fewer threads also keep CI predictable.
torch.set_num_threads(int(os.environ.get("REGIONDRAG_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
