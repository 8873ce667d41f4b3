"""Without TensorRT the backend module still imports, and using it says how to install TensorRT."""
import importlib

import pytest

try:
    importlib.import_module("tensorrt")
except ImportError:
    pass
else:
    pytest.skip("TensorRT is installed: the missing-TensorRT behaviour cannot be checked here",
                allow_module_level=True)

from helpers import reference_components  # noqa: E402

HOW = r"TensorRT is not installed: install it from NVIDIA's package index \(pip install tensorrt " \
      r"--extra-index-url https://pypi\.nvidia\.com\)"


def test_module_imports_without_tensorrt():
    mod = importlib.import_module("regiondrag.engine.backends.tensorrt")
    assert mod.TRT_AVAILABLE is False
    assert mod.tensorrt_version() is None


def test_runner_says_how_to_install():
    from regiondrag.engine.backends.tensorrt import TensorRTRunner

    with pytest.raises(RuntimeError, match=HOW):
        TensorRTRunner(reference_components())


def test_build_engine_says_how_to_install(tmp_path):
    from regiondrag.engine.backends.tensorrt import build_engine

    with pytest.raises(RuntimeError, match=HOW):
        build_engine(tmp_path / "unet.onnx", tmp_path / "unet.plan", {})


def test_backend_factory_says_how_to_install():
    from regiondrag.engine.backends import make_runner

    with pytest.raises(RuntimeError, match=HOW):
        make_runner("tensorrt", reference_components())
