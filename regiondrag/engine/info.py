"""``info``: versions, devices, optional backends and the on-disk cache."""
from __future__ import annotations

import platform

from .hardware import package_version


def _devices() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu (no CUDA device)"
    names = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        names.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    return "; ".join(names)


def _cache_listing() -> list[str]:
    from regiondrag.engine.cache import ArtifactCache
    from regiondrag.models import cache_root

    root = cache_root()
    rows = [str(root)]
    models = root / "models"
    for entry in sorted(models.glob("*")) if models.is_dir() else []:
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        rows.append(f"model {entry.name}  {size / 2**20:.1f} MiB")
    for m in ArtifactCache().entries():
        meta = m.get("meta", {})
        rows.append(f"{meta.get('backend', '?')} {meta.get('network', '?')} {meta.get('height')}x{meta.get('width')} "
                    f"{meta.get('precision', '')} {meta.get('model', '')}  {m['bytes'] / 2**20:.1f} MiB  {m['path']}")
    return rows


def collect_info() -> dict[str, str]:
    import regiondrag

    info = {"regiondrag": regiondrag.__version__, "python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "huggingface_hub", "kernels", "triton", "onnx", "onnxruntime",
                "tensorrt", "gradio"):
        info[mod] = package_version(mod) or "not installed"
    info["devices"] = _devices()
    cache = _cache_listing()
    info["cache"] = cache[0]
    for i, row in enumerate(cache[1:]):
        info[f"  [{i}]"] = row.strip()
    return info
