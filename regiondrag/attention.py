"""Self-attention K/V capture and replay as diffusers attention processors (ALGORITHM.md §7).

The reference records the outputs of ``attn1.to_k`` / ``attn1.to_v`` with forward hooks while it
inverts the original image, and overwrites them while it samples. We do the same inside an attention
processor installed on every self-attention layer (``attn1``), so no hooks are needed and the replay
path never computes the ``to_k`` / ``to_v`` projections it would throw away.

Layers are indexed by EXECUTION order (down blocks, mid block, up blocks), not by the order of
diffusers' ``attn_processors`` dict (down, up, mid).

The store can hold one ``(keys, values)`` list per UNet call and replay any of them; the engine uses
one slot at a time: :class:`regiondrag.networks.UNetKV` returns each captured call's tensors and takes
them back as inputs to replay, and the pipeline replays forward call ``S-1-i`` at backward call ``i``
(the reference's reverse-and-pop bookkeeping, §7). The processors only read ``store.active``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUP_RANK = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the ``attn1`` modules of ``unet`` in execution order (down -> mid -> up)."""
    names = [n for n, _ in unet.named_modules() if n.endswith(".attn1")]
    # named_modules keeps registration order inside each group; only the groups need reordering.
    return sorted(names, key=lambda n: _GROUP_RANK.get(n.split(".")[0], 3))


class KVStore:
    """Per-UNet-call keys and values of every self-attention layer.

    ``mode`` is ``"off"`` (plain attention), ``"capture"`` or ``"replay"``. In capture mode
    :meth:`new_call` opens a new slot that the processors fill layer by layer; in replay mode
    :meth:`use_call` selects which recorded call the processors read.
    """

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = []
        self.mode = "off"
        self.active = -1

    def clear(self) -> None:
        self.calls.clear()
        self.mode, self.active = "off", -1

    def start_capture(self) -> None:
        self.clear()
        self.mode = "capture"

    def new_call(self) -> None:
        """Open the slot for the next captured UNet call."""
        assert self.mode == "capture"
        self.calls.append([None] * self.num_layers)
        self.active = len(self.calls) - 1

    def use_call(self, index: int) -> None:
        """Replay the keys/values recorded by captured call ``index`` in the next UNet call."""
        if not 0 <= index < len(self.calls):
            raise IndexError(f"no captured call {index}; {len(self.calls)} recorded")
        self.mode, self.active = "replay", index

    def stop(self) -> None:
        self.mode, self.active = "off", -1

    def put(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.calls[self.active][layer] = (key, value)

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.calls[self.active][layer]
        assert kv is not None, f"layer {layer} was not captured in call {self.active}"
        return kv


class KVReplayProcessor:
    """Self-attention processor that records or replays the key/value projections.

    Mathematically identical to diffusers' ``AttnProcessor2_0`` when ``store.mode == "off"``; in
    ``"capture"`` mode it also stores ``to_k(h)`` and ``to_v(h)`` (``1 x N x C``, before the head
    split); in ``"replay"`` mode it uses the stored tensors instead of computing them:
    ``out = softmax(Q_cur K_origᵀ / √d) V_orig`` per head, then ``to_out``.
    """

    def __init__(self, store: KVStore, layer: int, replay_attention_fn=None):
        self.store, self.layer = store, layer
        # Attention over replayed keys/values; on CUDA the runner may pick the Triton kernel per shape.
        self.replay_attention_fn = replay_attention_fn or F.scaled_dot_product_attention

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        assert encoder_hidden_states is None, "KVReplayProcessor is for self-attention (attn1) only"
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, ch, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, hh * ww).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        mode = self.store.mode
        if mode == "replay":
            key, value = self.store.get(self.layer)
        else:
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
            if mode == "capture":
                self.store.put(self.layer, key, value)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(key.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is None and mode == "replay":
            hidden_states = self.replay_attention_fn(query, key, value)
        elif attention_mask is None:
            hidden_states = F.scaled_dot_product_attention(query, key, value)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, ch, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_kv_processors(unet: torch.nn.Module, replay_attention_fn=None) -> KVStore:
    """Install a :class:`KVReplayProcessor` on every ``attn1`` of ``unet``; return their shared store.

    Cross-attention processors (``attn2``, incl. IP-Adapter's) are left as they are.
    """
    names = self_attention_layers(unet)
    if not names:
        raise ValueError("the UNet has no self-attention (attn1) layers to capture")
    store = KVStore(len(names))
    modules = dict(unet.named_modules())
    for i, name in enumerate(names):
        modules[name].set_processor(KVReplayProcessor(store, i, replay_attention_fn))
    return store
