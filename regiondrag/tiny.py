"""``model="tiny"``: a small random-weight SD-1.5-architecture model, built offline from configs.

The model is written once, with a fixed seed, as a diffusers directory (plus an IP-Adapter directory
laid out like ``h94/IP-Adapter``) under the cache, then loaded by the same code as any local model.
Its tokenizer is a byte-level CLIP BPE with no merges (every character is a token), so nothing is
downloaded. Its output is noise: it exists for smoke runs and tests, never as an edit result.

``model="random-sd15"`` (:func:`random_sd15_pipeline`) is the FULL-SIZE SD-1.5 architecture (+ CLIP
ViT-H/14 and IP-Adapter-Plus) with random weights, built in memory with a fixed seed: it costs what the
real model costs, for benchmarks on machines without the weights. Its output is noise too.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "tiny-v1"
SEED = 0
MARKER = "REGIONDRAG_RANDOM_WEIGHTS"

_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
             norm_num_groups=32)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=16, sample_size=128)
_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
             max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
             bos_token_id=512, eos_token_id=513, pad_token_id=1)
_VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
               patch_size=8, projection_dim=32, hidden_act="gelu")
_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def tiny_model_dir(root: Path | None = None) -> Path:
    """Path of the tiny model, building it on first use (atomically: concurrent callers are safe)."""
    from .models import cache_root

    target = (root or cache_root() / "models") / TINY_VERSION
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        _write_tiny(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and as a word end (``</w>``), plus specials."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return vocab


def _write_tokenizer(out: Path) -> None:
    out.mkdir()
    (out / "vocab.json").write_text(json.dumps(_byte_vocab()))
    (out / "merges.txt").write_text("#version: 0.2\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def _ip_adapter_state(unet, embed_dim: int, gen: torch.Generator, d: int = 32,
                      inner: int = 64) -> dict[str, torch.Tensor]:
    """Random IP-Adapter-Plus weights in the original checkpoint layout (Resampler + to_k_ip/to_v_ip).

    ``d``: the Resampler's width; ``inner``: its attention width (64 per head, as diffusers reads it).
    """
    out_dim, depth, tokens = unet.config.cross_attention_dim, 4, 16

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    sd = {"image_proj.latents": torch.randn(1, tokens, d, generator=gen) / d**0.5,
          "image_proj.proj_in.weight": w(d, embed_dim), "image_proj.proj_in.bias": torch.zeros(d),
          "image_proj.proj_out.weight": w(out_dim, d), "image_proj.proj_out.bias": torch.zeros(out_dim),
          "image_proj.norm_out.weight": torch.ones(out_dim), "image_proj.norm_out.bias": torch.zeros(out_dim)}
    for i in range(depth):
        p = f"image_proj.layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = torch.ones(d), torch.zeros(d)
        sd.update({p + "0.to_q.weight": w(inner, d), p + "0.to_kv.weight": w(2 * inner, d),
                   p + "0.to_out.weight": w(d, inner), p + "1.1.weight": w(4 * d, d), p + "1.3.weight": w(d, 4 * d)})
    # diffusers numbers the cross-attention (attn2) layers 1, 3, 5, ... in attn_processors order.
    cross = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    for j, name in enumerate(cross):
        block = unet.get_submodule(name)
        sd[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = w(block.to_k.out_features, out_dim)
        sd[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = w(block.to_v.out_features, out_dim)
    return sd


def _write_tiny(out: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**_UNET)
        vae = AutoencoderKL(**_VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=514, **_TEXT))
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**_VISION))
        ip_state = _ip_adapter_state(unet, _VISION["hidden_size"], torch.Generator().manual_seed(SEED + 1))
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text.save_pretrained(out / "text_encoder")
    _write_tokenizer(out / "tokenizer")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(_SCHEDULER))
    (out / "feature_extractor").mkdir()
    (out / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "do_convert_rgb": True}))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}))
    models = out / "ip_adapter" / "models"
    models.mkdir(parents=True)
    vision.save_pretrained(models / "image_encoder")
    save_file({k: v.contiguous() for k, v in ip_state.items()}, str(models / "ip-adapter-plus_sd15.safetensors"))
    (out / MARKER).write_text("random weights: smoke tests only, never an edit result\n")


# ----------------------------------------------------------------------------- model="random-sd15"
# The published configs of SD-1.5 (unet/, vae/, text_encoder/ of stable-diffusion-v1-5) and of the
# IP-Adapter-Plus image encoder (h94/IP-Adapter models/image_encoder, CLIP ViT-H/14). The text encoder
# keeps CLIP ViT-L's 49408-token embedding (its cost) but uses the byte-level tokenizer above, so its
# special-token ids are that tokenizer's.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1,
                 flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, center_input_sample=False)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, act_fn="silu")
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                 bos_token_id=512, eos_token_id=513, pad_token_id=1)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
               image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)
IP_PLUS_SD15 = dict(d=768, inner=768)  # Resampler: 768 dims, 12 heads of 64, depth 4, 16 tokens


def random_sd15_modules(seed: int = SEED):
    """``(unet, vae, text_encoder, image_encoder)`` of the full-size architecture, random, float32.

    Built on the current default device: under ``with torch.device("meta")`` nothing is allocated.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return (UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE),
                CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14)))


def random_sd15_pipeline(dtype: torch.dtype = torch.float32, ip_adapter: bool = True):
    """A StableDiffusionPipeline of :func:`random_sd15_modules` in ``dtype`` on the CPU, in memory.

    With ``ip_adapter`` it carries random IP-Adapter-Plus weights in the original layout, loaded by
    diffusers' ``load_ip_adapter`` (scale set by the caller). Nothing is written to disk but the
    byte-level tokenizer's two small files, in a temporary directory.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    unet, vae, text, vision = (m.to(dtype).eval() for m in random_sd15_modules())
    with tempfile.TemporaryDirectory(prefix="regiondrag-tok-") as tmp:
        _write_tokenizer(Path(tmp) / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    size = VIT_H14["image_size"]
    features = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  resample=3, do_center_crop=True, do_normalize=True, image_mean=_CLIP_MEAN,
                                  image_std=_CLIP_STD)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(_SCHEDULER), safety_checker=None,
                                   feature_extractor=features, image_encoder=vision if ip_adapter else None,
                                   requires_safety_checker=False)
    if ip_adapter:
        flat = _ip_adapter_state(unet, VIT_H14["hidden_size"], torch.Generator().manual_seed(SEED + 1),
                                 **IP_PLUS_SD15)
        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            group, name = key.split(".", 1)
            nested[group][name] = value.to(dtype)
        pipe.load_ip_adapter(nested, subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors",
                             image_encoder_folder=None)
    return pipe
