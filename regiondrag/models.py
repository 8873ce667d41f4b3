"""Loading SD-1.x components and IP-Adapter-Plus (ALGORITHM.md §2).

``load_components(model, ip_adapter, device, dtype)`` accepts:

* a hub id (default ``stable-diffusion-v1-5/stable-diffusion-v1-5``), fetched through diffusers;
* a local diffusers directory (``model_index.json`` inside);
* a single ``.safetensors`` / ``.ckpt`` checkpoint (``StableDiffusionPipeline.from_single_file``);
* ``"tiny"``: a small random-weight SD-1.5-architecture model with a tiny IP-Adapter, written once
  from configs with a fixed seed (see :mod:`regiondrag.tiny`) and then loaded like any local directory;
* ``"random-sd15"``: the full-size SD-1.5 architecture (+ CLIP ViT-H/14 and IP-Adapter-Plus) with random
  weights and a fixed seed, built in memory (:func:`regiondrag.tiny.random_sd15_pipeline`): the real
  model's cost without its weights, for benchmarks.

``ip_adapter`` is a hub id laid out like ``h94/IP-Adapter`` (``models/ip-adapter-plus_sd15.*`` and
``models/image_encoder/``), a local directory with that layout, ``None`` (no IP-Adapter) or
``"default"`` (``h94/IP-Adapter``, or the tiny adapter for ``model="tiny"``). Scale 0.5 on every
cross-attention layer, as the reference.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter"
IP_ADAPTER_SCALE = 0.5
RANDOM_SD15 = "random-sd15"  # see regiondrag.tiny.random_sd15_pipeline
IP_WEIGHT_NAMES = ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sd15.bin")


class ModelLoadError(ValueError):
    """The weights could not be found or fetched; the message is one sentence meant for the user."""


@dataclass
class Components:
    """The networks of one SD-1.x model (+ optional IP-Adapter-Plus), on one device and dtype."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    image_encoder: Any = None
    feature_extractor: Any = None
    ip_adapter_scale: float | None = None
    source: str = ""
    random_weights: bool = False
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)
    # Where the networks ran, kept when a compiled runner frees the eager weights its artifacts replace
    # (those tensors are on "meta" then; the artifacts still run here).
    home: tuple[torch.device, torch.dtype] | None = None

    @property
    def device(self) -> torch.device:
        return self.home[0] if self.home else self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.home[1] if self.home else self.unet.dtype


class RunsComponents:
    """Base of what runs a :class:`Components` (the pipeline, the runners): their device and dtype."""

    components: Components
    device = property(lambda self: self.components.device, doc="The components' device.")
    dtype = property(lambda self: self.components.dtype, doc="The components' dtype.")


def cache_root() -> Path:
    """Root of regiondrag's on-disk cache (``REGIONDRAG_CACHE`` or ``~/.cache/regiondrag``)."""
    return Path(os.environ.get("REGIONDRAG_CACHE", Path.home() / ".cache" / "regiondrag"))


def _not_found(what: str, name: str, exc: Exception, instead: str) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {what} {name!r} (no network, an unknown hub id, or a path that does not exist: "
        f"{type(exc).__name__}); {instead}")


MODEL_INSTEAD = "pass a local diffusers directory, a .safetensors checkpoint, or 'tiny' for a random-weight test model"
IP_INSTEAD = "pass a local directory laid out like h94/IP-Adapter, or 'none' to edit without the IP-Adapter"


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name still works there, with a warning)."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_sd_pipeline(model: str, config: str | None, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    kwargs = dict(safety_checker=None, requires_safety_checker=False, **{_dtype_kwarg(): dtype})
    path = Path(model).expanduser()
    try:
        if path.is_file():
            if path.suffix not in (".safetensors", ".ckpt"):
                raise ModelLoadError(f"{model!r} is a file but not a .safetensors or .ckpt checkpoint")
            if config is not None:
                kwargs["config"] = config
            return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{model!r} is a directory without model_index.json; "
                                     f"expected a diffusers Stable Diffusion directory")
            return StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise ModelLoadError(f"model {model!r} is neither an existing path nor a hub id (owner/name); "
                                 f"pass a local diffusers directory, a .safetensors checkpoint, or 'tiny'")
        return StableDiffusionPipeline.from_pretrained(model, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _not_found("model", model, exc, MODEL_INSTEAD) from exc


def _attach_ip_adapter(pipe, ip_adapter: str) -> None:
    """Load IP-Adapter-Plus (weights in ``models/``, encoder in ``models/image_encoder``) at scale 0.5."""
    path = Path(ip_adapter).expanduser()
    weight = IP_WEIGHT_NAMES[0]
    if path.is_dir():
        found = [n for n in IP_WEIGHT_NAMES if (path / "models" / n).is_file()]
        if not found or not (path / "models" / "image_encoder").is_dir():
            raise ModelLoadError(f"IP-Adapter directory {ip_adapter!r} must hold models/ip-adapter-plus_sd15"
                                 f".safetensors (or .bin) and models/image_encoder/, like h94/IP-Adapter")
        weight, ip_adapter = found[0], str(path)
    # A hub repository may hold either file (h94/IP-Adapter: the reference loads the .bin); try both.
    names = [weight] if path.is_dir() else list(IP_WEIGHT_NAMES)
    for i, name in enumerate(names):
        try:
            pipe.load_ip_adapter(ip_adapter, subfolder="models", weight_name=name, image_encoder_folder="image_encoder")
            break
        except (OSError, ValueError, EnvironmentError) as exc:
            if i == len(names) - 1:
                raise _not_found("IP-Adapter", ip_adapter, exc, IP_INSTEAD) from exc
    pipe.set_ip_adapter_scale(IP_ADAPTER_SCALE)


def _explicit_scheduler_config(config) -> dict:
    """The keys the scheduler config file really sets.

    diffusers fills missing keys with the loading class's defaults (PNDM: ``timestep_spacing="leading"``)
    and lists them in ``_use_default_values``; the reference converts the config to
    DPMSolverMultistepScheduler, which drops those and applies its own defaults (``"linspace"``).
    """
    defaults = set(config.get("_use_default_values", ()))
    return {k: v for k, v in dict(config).items() if k not in defaults}


def _fingerprint(*nets) -> str:
    """A short content id of the weights: configs plus the first values of every tensor of ``nets``
    (None entries skipped). Every network that is compiled into a cached artifact must be among them.

    The UNet's parameters include the IP-Adapter's projections once it is attached.
    """
    nets = [n for n in nets if n is not None]
    configs = [dict(n.config) if hasattr(n.config, "items") else n.config.to_dict() for n in nets]
    configs = [{k: v for k, v in c.items() if not k.startswith("_")} for c in configs]  # no paths
    h = hashlib.sha256(json.dumps(configs, default=str, sort_keys=True).encode())
    for net in nets:
        for name, p in net.named_parameters():
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class _DropTorchvisionFallback(logging.Filter):
    """transformers >= 5 warns, once per image-processor class, that without torchvision it falls back to
    the PIL image processor. That fallback is what we want (the golden fidelity tests pass with it), and the
    warning comes from our own loading of the model's feature extractor, so our loads drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@contextlib.contextmanager
def _quiet_library_notices():
    """Only while our loading code runs: what diffusers and transformers print about a load we make
    (their progress bars, "accelerate is not installed", "modules kept in float32", a float16 pipeline
    that "cannot run with cpu device" before we move it) is silenced, errors still raise; the filter
    above on the logger that emits the torchvision notice. Their settings are restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    logger, drop = logging.getLogger("transformers.utils.import_utils"), _DropTorchvisionFallback()
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside the libraries' own calls
            for lib, _, _ in saved:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
            yield
    finally:
        logger.removeFilter(drop)
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()


def load_components(model: str = DEFAULT_MODEL, ip_adapter: str | None = "default", device: str = "cpu",
                    dtype: torch.dtype = torch.float32, config: str | None = None) -> Components:
    """Load the networks of ``model`` (+ IP-Adapter-Plus) onto ``device`` in ``dtype``.

    ``config`` is only used for single-file checkpoints: a diffusers directory or hub id whose
    configs describe the checkpoint (diffusers otherwise fetches them from the hub).
    Raises :class:`ModelLoadError` (a ``ValueError``) with a one-sentence message when the weights
    cannot be found or fetched.
    """
    with _quiet_library_notices():
        return _load_components(model, ip_adapter, device, dtype, config)


def _load_components(model: str, ip_adapter: str | None, device: str, dtype: torch.dtype,
                     config: str | None) -> Components:
    random_weights = model in ("tiny", RANDOM_SD15)
    builtin_ip = model == RANDOM_SD15 and ip_adapter == "default"  # its random adapter is built with it
    if model == "tiny":
        from .tiny import tiny_model_dir

        root = tiny_model_dir()
        model_path = str(root)
        if ip_adapter == "default":
            ip_adapter = str(root / "ip_adapter")
    else:
        model_path = model
        if ip_adapter == "default":
            ip_adapter = DEFAULT_IP_ADAPTER
    if model == RANDOM_SD15:
        from .tiny import random_sd15_pipeline

        pipe = random_sd15_pipeline(dtype, ip_adapter=builtin_ip)
    else:
        pipe = _load_sd_pipeline(model_path, config, dtype)
    random_weights = random_weights or (Path(model_path) / "REGIONDRAG_RANDOM_WEIGHTS").is_file()
    if builtin_ip:
        pipe.set_ip_adapter_scale(IP_ADAPTER_SCALE)
    elif ip_adapter is not None:
        _attach_ip_adapter(pipe, ip_adapter)
    pipe.to(device)
    for net in (pipe.vae, pipe.unet, pipe.text_encoder, pipe.image_encoder):
        if net is not None:
            net.eval().requires_grad_(False)
    return Components(
        vae=pipe.vae, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler_config=_explicit_scheduler_config(pipe.scheduler.config),
        image_encoder=pipe.image_encoder if ip_adapter is not None else None,
        feature_extractor=pipe.feature_extractor if ip_adapter is not None else None,
        ip_adapter_scale=IP_ADAPTER_SCALE if ip_adapter is not None else None,
        source=model, random_weights=random_weights,
        fingerprint=_fingerprint(pipe.unet, pipe.vae, pipe.text_encoder,
                                 pipe.image_encoder if ip_adapter is not None else None))
