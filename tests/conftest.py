import hashlib
import os
import shutil
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


HERE = Path(__file__).resolve().parent
# Reference files too large for git (weights over 5 MB): copied from the team's shared reference folder
# (``../shared/reference`` beside the checkout, or $REGIONDRAG_REFERENCE) into tests/fixtures, checked
# against these digests so that the golden tests always run on the reference's exact weights.
UNTRACKED = {"tiny-sd15/text_encoder/model.safetensors":
             "1ee94060018db0691fdc7b46991f381250b6a6b9c1b33e9ba0260282b2619cf6"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _provide_untracked_fixtures() -> None:
    source = Path(os.environ.get("REGIONDRAG_REFERENCE") or HERE.parents[1] / "shared" / "reference")
    for rel, digest in UNTRACKED.items():
        dst = HERE / "fixtures" / rel
        if dst.is_file() and _sha256(dst) == digest:
            continue
        src = source / rel
        if not src.is_file():
            raise pytest.UsageError(
                f"tests/fixtures/{rel} (reference weights, kept out of git) is missing and {src} does not "
                "exist: put the shared reference folder beside the checkout (../shared/reference) or set "
                "REGIONDRAG_REFERENCE to it")
        if _sha256(src) != digest:
            raise pytest.UsageError(f"{src} is not the reference file (SHA-256 differs from {digest})")
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def pytest_configure(config):
    _provide_untracked_fixtures()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
