"""regiondrag.kernels"""
import os


def triton_interpret() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``, read as Triton reads it): the kernels
    then also run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
