"""Package metadata for regiondrag.

The repository keeps a flat top-level layout (``regiondrag/``, ``engine/``, ``export/``, ``kernels/``);
``package_dir`` maps each folder to a subpackage of ``regiondrag`` so that nothing named ``engine``,
``export`` or ``kernels`` is installed at the top level of site-packages.
"""
from setuptools import setup

setup(
    name="regiondrag",
    version="0.1.0",
    description="A compiled inference engine for RegionDrag (region-based drag editing with Stable Diffusion)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["regiondrag", "regiondrag.engine", "regiondrag.export", "regiondrag.kernels"],
    package_dir={
        "regiondrag": "regiondrag",
        "regiondrag.engine": "engine",
        "regiondrag.export": "export",
        "regiondrag.kernels": "kernels",
    },
    package_data={"regiondrag": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30",
        "transformers>=4.45",
        "safetensors",
        "huggingface_hub",
        "numpy",
        "pillow",
        "opencv-python-headless",
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18"],
        "trt": ["onnx>=1.16", "onnxscript>=0.5", "tensorrt>=10"],
        "ui": ["gradio>=6,<7"],  # engine/ui.py uses gradio 6 APIs (launch css, Image buttons, gr.skip)
        "eval": ["scipy", "lpips"],
        "bench": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "triton", "onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["regiondrag=regiondrag.engine.__main__:main"]},
)
