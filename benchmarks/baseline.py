"""The benchmark's baseline: RegionDrag as the paper's own code runs it, written from ALGORITHM.md.

:func:`baseline_edit` is a plain mirror of the reference ``drag()`` (ALGORITHM.md §2-12) so that the
engine's speed-ups are measured against the real starting point, side by side, on the same machine:

* eager diffusers networks, float16 on CUDA, the attention processors diffusers installs with the
  IP-Adapter (``AttnProcessor2_0`` on ``attn1``, ``IPAdapterAttnProcessor2_0`` on ``attn2``);
* self-attention K/V copy with forward hooks on every ``attn1.to_k`` / ``attn1.to_v``: record the
  outputs during the inversion of the original image, reverse each call's chunk, and overwrite the
  outputs (``output[:] = stored.pop()``) during sampling (§7);
* the IP-Adapter Resampler runs inside EVERY UNet call (``added_cond_kwargs={"image_embeds": [...]}``
  with the unprojected CLIP states of the zero image and the image, QUIRK IP tokens, §2);
* the empty-prompt embedding is computed and never used (§2), the timestep grid and ``ᾱ`` come from
  ``DPMSolverMultistepScheduler`` (§0), the step coefficients are 0-d float32 CPU tensors and the
  timesteps are 0-d CPU tensors handed to the UNet, as in the reference sampler;
* blur, copy-paste and the mask blend are plain torch indexing (§8, §9);
* ``cudnn.deterministic = True`` / ``cudnn.benchmark = False`` (the reference's ``set_seed``) and
  ``torch.cuda.empty_cache()`` after removing each set of hooks and at the end, as the reference does.

The random draws follow §13 on one generator on the edit's device seeded with ``seed`` (the same
stream as the reference's global generator after ``torch.manual_seed(seed)``), so on the same inputs
the final latent equals the engine's up to float tolerance (tests/test_bench.py checks 1e-4 in fp32).

The caller passes freshly loaded components (:func:`regiondrag.models.load_components`): the engine's
runners replace the UNet's attention processors and detach its IP projection, which this mirror must
not see.
"""
from __future__ import annotations

import contextlib

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from regiondrag.pipeline import EditResult
from regiondrag.timing import StageTimer

VAE_SCALE = 0.18215
METHODS = ("encode_then_cp", "cp_then_encode")


@contextlib.contextmanager
def _reference_cudnn_flags():
    """The reference's ``set_seed`` sets these for every edit; restored afterwards."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_fresh(components) -> None:
    from regiondrag.attention import KVReplayProcessor

    unet = components.unet
    replaced = any(isinstance(p, KVReplayProcessor) for p in unet.attn_processors.values())
    detached = type(getattr(unet, "encoder_hid_proj", None)).__name__ == "_ProjectedIP"
    if replaced or detached:
        raise ValueError("baseline_edit needs freshly loaded components: an engine runner has replaced the "
                         "UNet's attention processors or detached its IP-Adapter projection")


def _self_attention_blocks(unet) -> list:
    """``attn1`` of every transformer block in execution order (down, mid, up), as the reference walks them."""
    blocks = []
    for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
        for attention in getattr(block, "attentions", None) or ():
            blocks.extend(tb.attn1 for tb in attention.transformer_blocks)
    return blocks


def _outline_vertices(points: np.ndarray) -> np.ndarray:
    """§3.3 ``border(P)``: OpenCV's CHAIN_APPROX_SIMPLE outline vertices of the drawn points (x, y)."""
    x_max, y_max = points.max(axis=0)
    canvas = np.zeros((y_max + 1, x_max + 1), np.uint8)
    canvas[points[:, 1], points[:, 0]] = 1
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return np.concatenate([c[:, 0, :] for c in contours], axis=0)


def _vae_latent(vae, image: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """§3.4: ``0.18215 · sample`` of the posterior of ``2·ToTensor(I) − 1`` (a random draw)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(vae.device, torch.float32) / 255.0
    x = x.to(vae.dtype)
    return vae.encode(x * 2 - 1).latent_dist.sample(generator=gen) * VAE_SCALE


def _text_embedding(components, prompt: str) -> torch.Tensor:
    tok = components.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(components.device)
    return components.text_encoder(ids, output_hidden_states=True)[0]


def _image_embeds(components, image: np.ndarray) -> list[torch.Tensor]:
    """§2: ``[stack(e_0, e_img)]``, penultimate CLIP states of the zero image and the image (unprojected)."""
    enc = components.image_encoder
    pix = components.feature_extractor(image, return_tensors="pt").pixel_values.to(enc.device, enc.dtype)
    e_img = enc(pix, output_hidden_states=True).hidden_states[-2]
    e_0 = enc(torch.zeros_like(pix), output_hidden_states=True).hidden_states[-2]
    return [torch.stack([e_0, e_img], dim=0)]


@torch.no_grad()
def baseline_edit(components, image: np.ndarray, src_pts, trg_pts, prompt: str = "", mask=None, preview=None,
                  method: str = "encode_then_cp", steps: int = 20, start_t: float = 0.5, end_t: float = 0.2,
                  noise_scale: float = 1.0, seed: int = 42) -> EditResult:
    """One RegionDrag edit the way the reference ``drag()`` runs it (see the module docstring).

    ``image``: HxWx3 uint8, sides multiples of 8. ``src_pts``/``trg_pts``: Nx2 integer (x, y) image
    coordinates, row k of one paired with row k of the other (the reference's ``source``/``target``:
    the latent-grid mapping times 8). ``mask``: HxW {0,1} (None = all ones). ``preview``: the pixel
    copy-paste image 'cp_then_encode' inverts (required for that method). Returns an
    :class:`~regiondrag.pipeline.EditResult` whose ``timings`` use the pipeline's stage names plus
    ``region_ops`` (blur, copy-paste and mask blend; part of ``sampling``).
    """
    from diffusers import DPMSolverMultistepScheduler

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    image = np.asarray(image)
    H, W = image.shape[:2]
    if image.ndim != 3 or H % 8 or W % 8:
        raise ValueError(f"image must be HxWx3 with sides multiples of 8, got {image.shape}")
    sde = method == "encode_then_cp"
    if not sde and preview is None:
        raise ValueError("cp_then_encode needs the copy-paste preview image")
    _check_fresh(components)
    c, dev = components, components.device
    timer = StageTimer(dev)
    mask = np.ones((H, W), np.uint8) if mask is None else (np.asarray(mask) > 0).astype(np.uint8)

    with _reference_cudnn_flags():
        gen = torch.Generator(dev).manual_seed(int(seed))
        scheduler = DPMSolverMultistepScheduler.from_config(c.scheduler_config)
        scheduler.set_timesteps(steps)
        grid, ac = scheduler.timesteps, scheduler.alphas_cumprod  # CPU int64 / float32
        delta = scheduler.config.num_train_timesteps // steps
        n_inv, e_cut = int(start_t * steps), int(end_t * steps)

        # §3: latent coordinates and point roles
        with timer("inputs"):
            source = torch.from_numpy(np.asarray(src_pts, np.int64)).to(dev) // 8
            target = torch.from_numpy(np.asarray(trg_pts, np.int64)).to(dev) // 8
            if sde:
                blur_pts, copy_pts = source, source
            else:
                border = torch.from_numpy(_outline_vertices(target.cpu().numpy()).astype(np.int64)).to(dev)
                blur_pts, copy_pts = torch.cat([border, source]), target
            paste_pts = target
            mask_lat = F.interpolate(torch.from_numpy(mask)[None, None].to(dev), size=(H // 8, W // 8))
            mask_lat = mask_lat.expand(1, 4, H // 8, W // 8)
        with timer("vae_encode"):
            z0 = _vae_latent(c.vae, image, gen)
            z0_prev = _vae_latent(c.vae, np.asarray(preview), gen) if not sde else None
        with timer("text_encode"):
            text = torch.cat([_text_embedding(c, ""), _text_embedding(c, prompt)])[-1:]  # guidance 1
        with timer("image_encode"):
            added = {"image_embeds": _image_embeds(c, image)} if c.image_encoder is not None else None

        def eps(x, t):  # one UNet call; the Resampler runs inside it (added_cond_kwargs)
            return c.unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample

        # §7: forward hooks on attn1.to_k / attn1.to_v
        attn1 = _self_attention_blocks(c.unet)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []

        def register(copy: bool) -> list:
            def record(store):
                return lambda module, inputs, output: store.append(output)

            def overwrite(store):
                def hook(module, inputs, output):
                    output[:] = store.pop()
                return hook

            make = record if copy else overwrite
            return [h for a in attn1 for h in (a.to_k.register_forward_hook(make(keys)),
                                                a.to_v.register_forward_hook(make(values)))]

        def unregister(handles) -> None:
            for h in handles:
                h.remove()
            _empty_cache(dev)

        def invert(z, sde_mode: bool):
            """§5 over F; returns (hook latents (S+1), noises (S; None for ODE))."""
            hooks, noises = [z], []
            for s in grid[steps - n_inv:].flip(dims=[0]):
                u = s + delta
                a_s, a_u = ac[s], ac[u]
                if sde_mode:
                    x_u = (a_u / a_s) ** 0.5 * z + (1 - a_u / a_s) ** 0.5 * torch.randn(
                        z.shape, generator=gen, device=dev, dtype=z.dtype)
                    e = eps(x_u, u)
                    sigma = ((1 - a_s) / (1 - a_u)) ** 0.5 * (1 - a_u / a_s) ** 0.5
                    x0 = (x_u - (1 - a_u) ** 0.5 * e) / a_u ** 0.5
                    noises.append((z - a_s ** 0.5 * x0 - (1 - a_s - sigma ** 2) ** 0.5 * e) / sigma)
                    z = x_u
                else:
                    e = eps(z, s)
                    x0 = (z - (1 - a_s) ** 0.5 * e) / a_s ** 0.5
                    z = a_u ** 0.5 * x0 + (1 - a_u) ** 0.5 * e
                    noises.append(None)
                hooks.append(z)
            return hooks, noises

        # §10-11: inversion(s), recording K/V over the original image
        with timer("inversion"):
            if not sde:
                hooks, noises = invert(z0_prev, False)
            handles = register(copy=True)
            if sde:
                hooks, noises = invert(z0, True)
                start = None
            else:
                start = invert(z0, False)[0][-1]
            unregister(handles)
            n_layers = len(handles) // 2
            keys[:] = [k for i in range(0, len(keys), n_layers) for k in reversed(keys[i:i + n_layers])]
            values[:] = [v for i in range(0, len(values), n_layers) for v in reversed(values[i:i + n_layers])]

        # §9: blur, then per step pop hook -> copy-paste -> mask blend -> sampler step with K/V replay
        with timer("sampling"):
            handles = register(copy=False)
            x = hooks[-1].clone() if start is None else start
            with timer("region_ops"):
                idx = (0, slice(None), blur_pts[:, 1], blur_pts[:, 0])
                r = (1 - noise_scale ** 2) ** 0.5 if noise_scale < 1 else 0
                x[idx] = x[idx] * r + torch.randn(x[idx].shape, generator=gen, device=dev, dtype=x.dtype) * noise_scale
            for t in grid[steps - n_inv - 1:-1]:
                h = hooks.pop()
                with timer("region_ops"):
                    if t >= e_cut:
                        x[0, :, paste_pts[:, 1], paste_pts[:, 0]] = h[0, :, copy_pts[:, 1], copy_pts[:, 0]]
                    x = torch.where(mask_lat == 1, x, h)
                noise = noises.pop()
                e = eps(x, t)
                p = t - delta
                a_t = ac[t]
                a_p = ac[p] if p >= 0 else torch.tensor(1.0)
                sigma = ((1 - a_p) / (1 - a_t)) ** 0.5 * (1 - a_t / a_p) ** 0.5 if sde else 0
                x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
                if noise is None:  # ODE: σ = 0 but a draw is still made (§13)
                    noise = torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)
                x = a_p ** 0.5 * x0 + (1 - a_p - sigma ** 2) ** 0.5 * e + sigma * noise
            unregister(handles)

        # §12
        with timer("vae_decode"):
            decoded = c.vae.decode(x / VAE_SCALE).sample
        with timer("postprocess"):
            out = ((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0].cpu().numpy() * 255).astype(np.uint8)
            out = cv2.resize(out, (W, H))
            if not np.all(mask == 1):
                out = np.where(mask[:, :, None].astype(bool), out, image)
            _empty_cache(dev)
    timings = timer.finish()
    return EditResult(image=Image.fromarray(out), latent=x, timings=timings)
