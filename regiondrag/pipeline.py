"""RegionDragPipeline: the public API and the scheduler loop (ALGORITHM.md §3, §9-13).

An edit runs in numbered stages (see :meth:`RegionDragPipeline.edit`):

1. inputs: image, drag and editing mask to the processing size (sides multiples of 8), point lists
2. conditioning: text and IP-Adapter image tokens (§2)
3. VAE encode with a seeded posterior sample (§3.4)
4. inversion, recording the self-attention keys/values of each UNet call (§5, §7, §10-11)
5. sampling with blur, copy-paste, mask blend and K/V replay (§6, §8, §9)
6. VAE decode and postprocess (§12)

The networks run through a runner (:mod:`regiondrag.runner`; the backend picks eager PyTorch or a
compiled engine). The random draws follow §13 on one generator on the edit's device, so a seed
reproduces the reference's noise. Nothing inside the step loops reads a device value back to the host.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import schedule as sch
from .drags import border_points
from .inputs import EditInputs, load_image, prepare_inputs  # noqa: F401 (load_image: public here too)
from .params import NOISE_SCALE_MAX, check_prompt, check_seed, real, resolve_device
from .engine.backends import BACKENDS
from .models import DEFAULT_MODEL, Components, RunsComponents, load_components
from .progress import Progress, StageBars
from .runner import TorchRunner
from .timing import StageTimer

VAE_SCALE = 0.18215  # the reference's constant for encode and decode, not the config's (§3.4, §12)
METHODS = ("encode_then_cp", "cp_then_encode")


def check_edit_params(method: str = "encode_then_cp", steps: int = 20, start_t: float = 0.5, end_t: float = 0.2,
                      noise_scale: float = 1.0, scheduler_config=None, seed=42, prompt="") -> sch.Schedule:
    """The checks :meth:`RegionDragPipeline.edit` makes on its parameters; returns the schedule.

    Front ends call it without a model (``scheduler_config`` None: the default timestep grid) to refuse
    bad settings before anything is loaded (the CLI, bench) or saved (the UI).
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    real("noise_scale", noise_scale, 0.0, NOISE_SCALE_MAX)
    check_seed(seed)
    check_prompt(prompt)
    return sch.make_schedule(steps, start_t, end_t, method == "encode_then_cp", scheduler_config or {})


def check_edit(image, drag, mask=None, preview=None, **params) -> EditInputs:
    """Every check :meth:`RegionDragPipeline.edit` makes that needs no model: the parameters (as
    :func:`check_edit_params`), then the image, the drag at pixel and latent scale, the editing mask
    and the preview. Front ends call it before loading a model; returns the prepared inputs."""
    check_edit_params(**params)
    return prepare_inputs(image, drag, mask, preview, need_preview=params.get("method") == "cp_then_encode")


@dataclass
class EditResult:
    """Output of :meth:`RegionDragPipeline.edit`."""

    image: Image.Image  # same size as the input image
    latent: torch.Tensor  # 1 x 4 x h x w, the final latent before decoding
    timings: dict[str, float] = field(default_factory=dict)  # stage -> milliseconds
    seed: int | None = None  # the seed the draws came from (None when a generator was passed)


def make_runner(backend: str, components: Components, cache_dir=None, progress=None) -> TorchRunner:
    """The runner of ``backend``: ``torch`` is eager PyTorch; the others run compiled artifacts that
    are built on first use and cached under ``cache_dir`` (default ``$REGIONDRAG_CACHE/engines``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available; allowed: {', '.join(BACKENDS)}")
    if backend == "torch":
        return TorchRunner(components)
    from regiondrag.engine.backends import make_runner as make_compiled
    from regiondrag.engine.cache import ArtifactCache

    return make_compiled(backend, components, cache=ArtifactCache(cache_dir), progress=progress)


class RegionDragPipeline(RunsComponents):
    """Region-based drag editing with Stable Diffusion 1.x (+ IP-Adapter-Plus)."""

    def __init__(self, components: Components, backend: str = "torch", cache_dir=None,
                 build_progress: Callable[[str], None] | None = None):
        self.components, self.backend = components, backend
        self.runner = make_runner(backend, components, cache_dir, build_progress)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, ip_adapter: str | None = "default",
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        backend: str = "torch", config: str | None = None, cache_dir=None,
                        build_progress: Callable[[str], None] | None = None) -> "RegionDragPipeline":
        """Load ``model`` (hub id, local diffusers dir, ``.safetensors`` file or ``"tiny"``).

        ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA, float32 elsewhere.
        ``backend``: torch | compiled | onnxruntime | tensorrt (compiled ones build on first use, with
        ``build_progress(message)`` told about each network; artifacts cached in ``cache_dir``).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not available; allowed: {', '.join(BACKENDS)}")
        device = resolve_device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        return cls(load_components(model, ip_adapter, device, dtype, config=config), backend, cache_dir,
                   build_progress)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Configure the edit's progress bars as in diffusers: ``disable=True`` turns them off; other
        keys (``file``, ``leave``, ``ncols``, ...) go to ``tqdm``. Bars are on by default."""
        self._bar_config = dict(kwargs)

    def _progress_bars(self, callback: Progress | None) -> StageBars:
        return StageBars(callback, getattr(self, "_bar_config", None))

    def _generator(self, seed: int, generator: torch.Generator | None) -> tuple[torch.Generator, int | None]:
        """The edit's one generator (§13): ``generator`` as given, else a new one seeded with ``seed``
        (already checked)."""
        if generator is None:
            return torch.Generator(self.device).manual_seed(seed), seed
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device} but the pipeline runs on {self.device}; "
                             f"create it with torch.Generator({str(self.device)!r})")
        return generator, None

    # ------------------------------------------------------------------ the edit
    @torch.no_grad()
    def edit(self, image, drag, prompt: str = "", method: str = "encode_then_cp", steps: int = 20,
             start_t: float = 0.5, end_t: float = 0.2, noise_scale: float = 1.0, seed: int | None = 42,
             mask=None, preview=None, progress: Progress | None = None,
             generator: torch.Generator | None = None) -> EditResult:
        """Move the content of each handle region of ``drag`` to its target region.

        ``image``: PIL image, HxWx3 uint8 array or path. ``drag``: RegionPairs, PolygonPairs,
        RegionPoints or PointPairs in the image's pixel coordinates. ``mask``: HxW editing mask in
        {0,1} (None = all ones). ``preview``: the image whose inversion 'cp_then_encode' copies from
        (None = ``drag.preview(image)``, as the paper's UI). ``seed`` None draws a random seed (returned
        in the result); ``generator``, a ``torch.Generator`` on the pipeline's device, replaces ``seed``
        (the draws advance it). ``prompt`` None is the empty prompt. ``progress(stage, i, n)`` is called
        at each step, besides the progress bar (:meth:`set_progress_bar_config`). See README for every
        parameter.
        """
        # seed and prompt are checked (and normalised) once, here, rather than by check_edit_params
        plan = check_edit_params(method, steps, start_t, end_t, noise_scale, self.components.scheduler_config)
        prompt = check_prompt(prompt)
        gen, seed = self._generator(check_seed(seed), generator)
        sde = method == "encode_then_cp"
        timer = StageTimer(self.device)
        progress = self._progress_bars(progress)

        # 1. inputs at the processing size, point lists as device index tensors
        with timer("inputs"):
            inp = prepare_inputs(image, drag, mask, preview, need_preview=not sde)
            pts = self._point_lists(inp, sde)
        with timer("prepare"):  # compiled backends: build or load the artifacts for this shape (once)
            self.runner.prepare(*inp.image.shape[:2])
        # 2. conditioning
        with timer("text_encode"):
            cond = self._encode_text(prompt)
        with timer("image_encode"):
            ip = self._encode_image(inp.image)
        unet = self._unet_fns(cond, ip, plan)
        # 3. VAE encode (posterior samples: the first random draws, §13)
        with timer("vae_encode"):
            z0 = self._encode_latent(inp.image, gen)
            z0_prev = self._encode_latent(inp.preview, gen) if not sde else None
        # 4. inversion, recording K/V: ETCP over the image (SDE); CPTE over the preview (no
        #    recording) and then over the image (recording), both ODE
        kv: list[tuple] = []  # one entry per recorded UNet call: its 2L keys/values
        with timer("inversion"):
            if sde:
                hooks, noises = self._invert_sde(plan, z0, gen, unet.capture(kv), progress)
                start = None
            else:
                hooks = self._invert_ode(plan, z0_prev, unet.plain, progress, "inversion (preview)")
                start = self._invert_ode(plan, z0, unet.capture(kv), progress)[-1]
                noises = None
        # 5. sampling
        with timer("sampling"):
            latent = self._sample(plan, hooks, noises, start, pts, noise_scale, gen, unet.replay(kv), progress,
                                  timer)
        del kv, hooks
        # 6. decode + postprocess
        with timer("vae_decode"):
            decoded = self.runner.vae_decoder(latent / VAE_SCALE)
        with timer("postprocess"):
            out = inp.postprocess(decoded)
        progress.close()
        return EditResult(image=Image.fromarray(out), latent=latent, timings=timer.finish(), seed=seed)

    # ------------------------------------------------------------------ stages
    def _point_lists(self, inp: EditInputs, sde: bool) -> dict:
        """§3.2-3 point roles as flat latent indices; duplicates resolved once (last pair wins)."""
        from regiondrag.kernels.region_ops import last_unique

        h, w = inp.latent_hw
        src, trg = inp.latent_points
        copy_pts, paste_pts = (src, trg) if sde else (trg, trg)
        # QUIRK (§3.3): CPTE also blurs the outline VERTICES of the target (CHAIN_APPROX_SIMPLE); they are
        # overwritten by the first copy-paste but consume random draws.
        blur_pts = src if sde else np.concatenate([border_points(trg).astype(np.int64), src])

        def flat(p):
            return p[:, 1] * w + p[:, 0]

        paste_u, paste_last = last_unique(flat(paste_pts))
        blur_u, blur_last = last_unique(flat(blur_pts))
        dev = self.device
        return dict(copy=torch.from_numpy(flat(copy_pts)[paste_last]).to(dev),
                    paste=torch.from_numpy(paste_u).to(dev),
                    blur=torch.from_numpy(blur_u).to(dev), blur_last=torch.from_numpy(blur_last).to(dev),
                    n_blur=len(blur_pts),
                    mask=torch.from_numpy(inp.latent_mask).to(dev))

    def _encode_text(self, prompt: str) -> torch.Tensor:
        """§2: last hidden state of the text encoder on the prompt padded/truncated to 77 tokens."""
        ids = self.components.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids.to(self.device)
        return self.runner.text_encoder(ids).to(self.dtype)

    def _encode_image(self, image: np.ndarray):
        """§2: IP-Adapter tokens of ``stack(e_0, e_img)`` (penultimate hidden states), or None.

        QUIRK (IP tokens): both the zero-image and the real-image embeddings reach the IP branch,
        which then attends over 32 tokens; reproduced by projecting the stacked pair, as the reference.
        The projection (Resampler) runs once here instead of inside every UNet call.
        """
        if self.runner.image_encoder is None:
            return None
        pix = self.components.feature_extractor(image, return_tensors="pt").pixel_values
        return self.runner.image_encoder(pix.to(self.device, self.dtype))

    def _encode_latent(self, image: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """§3.4: ``z0 = 0.18215 · (mean + std · randn)`` of the VAE posterior, ``randn`` from ``gen``."""
        x = torch.from_numpy(image).permute(2, 0, 1)[None].to(self.device, torch.float32) / 255.0
        mean, std = self.runner.vae_encoder((2 * x - 1).to(self.dtype))
        noise = torch.randn(mean.shape, generator=gen, device=self.device, dtype=mean.dtype)
        return VAE_SCALE * (mean + std * noise)

    def _unet_fns(self, cond: torch.Tensor, ip, plan: sch.Schedule) -> "UNetCalls":
        """ε(x, t) callables for one edit: guidance scale 1, one UNet call each (§2)."""
        levels = {c.t_model for c in plan.forward + plan.backward}
        t_dev = {t: torch.tensor([t], dtype=torch.int64).to(self.device) for t in levels}  # before the loops
        return UNetCalls(self.runner, cond, ip, t_dev)

    def _invert_sde(self, plan: sch.Schedule, z0, gen, eps, progress):
        """§5 SDE inversion over F; returns (hook latents (S+1), noises (S))."""
        hooks, noises, x = [z0], [], z0
        for j, c in enumerate(plan.forward):
            progress("inversion", j, plan.num_steps)
            xi = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x, n = sch.forward_sde_step(c, x, xi, eps)
            hooks.append(x)
            noises.append(n)
        return hooks, noises

    def _invert_ode(self, plan: sch.Schedule, z0, eps, progress, stage: str = "inversion"):
        """§5 ODE (DDIM) inversion over F; returns the S+1 latents."""
        hooks, x = [z0], z0
        for j, c in enumerate(plan.forward):
            progress(stage, j, plan.num_steps)
            x = sch.forward_ode_step(c, x, eps)
            hooks.append(x)
        return hooks

    def _sample(self, plan: sch.Schedule, hooks, noises, start, pts, noise_scale, gen, replay, progress,
                timer: StageTimer | None = None):
        """§9: blur, then per step: pop hook -> copy-paste (if t >= E) -> mask blend -> sampler step.

        ``replay(j)`` is ε with the keys/values of inversion call j. On CUDA the region operations are
        Triton kernels (one launch each); elsewhere their PyTorch references. Their time is recorded as
        the stage ``region_ops`` (also part of ``sampling``).
        """
        from regiondrag.kernels import region_ops as ro

        gpu = self.device.type == "cuda"
        blur = ro.blur if gpu else ro.blur_ref
        paste_blend = ro.paste_blend if gpu else ro.paste_blend_ref
        region_ops = (lambda: timer("region_ops")) if timer is not None else contextlib.nullcontext
        s = plan.num_steps
        x = hooks[-1].clone() if start is None else start.clone()
        z = torch.randn((x.shape[1], pts["n_blur"]), generator=gen, device=x.device, dtype=x.dtype)
        with region_ops():
            blur(x, pts["blur"], z[:, pts["blur_last"]], noise_scale)
        for i, c in enumerate(plan.backward):
            progress("sampling", i, s)
            h = hooks[s - i]
            with region_ops():
                if plan.copy_mask[i]:
                    paste_blend(x, h, pts["copy"], pts["paste"], pts["mask"])
                else:
                    x = torch.where(pts["mask"], x, h)
            if noises is not None:
                noise = noises[s - 1 - i]
            else:  # ODE: σ = 0, but the reference still draws (and discards) one randn per step (§13)
                noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            # Backward call i replays the K/V of inversion call S-1-i (§7).
            x = sch.sample_step(c, x, noise, replay(s - 1 - i))
        return x


class UNetCalls:
    """The three ways an edit calls the UNet, bound to its conditioning and device timesteps."""

    def __init__(self, runner: TorchRunner, cond, ip, t_dev: dict):
        self.runner, self.t_dev = runner, t_dev
        self.cond = (cond,) if ip is None else (cond, ip)  # the UNet takes ip_tokens only with an IP-Adapter

    def plain(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self.runner.unet(x, self.t_dev[t], *self.cond)

    def capture(self, kv: list) -> sch.Eps:
        """ε that appends each call's keys/values to ``kv``."""
        def eps(x: torch.Tensor, t: int) -> torch.Tensor:
            out = self.runner.unet_capture(x, self.t_dev[t], *self.cond)
            kv.append(tuple(out[1:]))
            return out[0]
        return eps

    def replay(self, kv: list) -> Callable[[int], sch.Eps]:
        """``replay(kv)(j)`` is ε that uses the keys/values of recorded call ``j``."""
        def for_call(j: int) -> sch.Eps:
            return lambda x, t: self.runner.unet_replay(x, self.t_dev[t], *self.cond, *kv[j])
        return for_call
