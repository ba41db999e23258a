"""The cross-attention computation of diffusers' AttnProcessor, with two hooks.

MACE needs the attention probabilities of attn2 layers (the LoRA loss, attention masks,
evaluation) and, when training, keys and values from per-concept LoRAs. Processors here
share this one forward pass and differ only in ``key_value`` and ``on_probs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def cross_attention_forward(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    key_value: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    on_probs: Callable[[torch.Tensor, int], None],
) -> torch.Tensor:
    """attn2 forward: key_value(context) -> (keys, values); on_probs(probs, batch) sees the
    (batch * heads, pixels, tokens) attention probabilities before they are applied."""
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    key, value = key_value(encoder_hidden_states)
    query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
    probs = attn.get_attention_scores(query, key, None)
    on_probs(probs, batch)
    out = attn.batch_to_head_dim(torch.bmm(probs, value))
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class ProcessorSwap:
    """Context manager: give every attn2 layer of a UNet one processor, restore on exit."""

    def __init__(self, unet, processor_for: Callable[[str], object]):
        self.unet, self.processor_for = unet, processor_for
        self.previous: dict[str, object] = {}

    def install(self) -> None:
        """Give each attn2 layer the processor ``processor_for(name)`` (None: leave it)."""
        for name, module in self.unet.named_modules():
            if name.endswith("attn2"):
                processor = self.processor_for(name)
                if processor is not None:
                    self.previous[name] = module.processor
                    module.set_processor(processor)

    def restore(self) -> None:
        """Put the previous processors back."""
        modules = dict(self.unet.named_modules())
        for name, processor in self.previous.items():
            modules[name].set_processor(processor)
        self.previous.clear()

    def __enter__(self) -> ProcessorSwap:
        self.install()
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


class AttentionMapRecorder:
    """attn2 processor that also sums the concept tokens' attention maps, per sample."""

    def __init__(self, positions: torch.Tensor, cond_offset: int, side: int):
        self.positions = positions  # (B, 77) bool for the conditional half of the batch
        self.cond_offset = cond_offset  # index where the conditional samples start
        self.side = side
        self.maps = torch.zeros(positions.shape[0], side, side)

    def _record(self, probs: torch.Tensor, batch: int) -> None:
        pixels = probs.shape[1]
        probs = probs.view(batch, -1, pixels, probs.shape[-1])
        p = probs.narrow(0, self.cond_offset, batch - self.cond_offset).mean(1)  # (B, pixels, 77)
        picked = (p * self.positions[:, None, :].to(p.device, p.dtype)).sum(-1)
        side = int(round(math.sqrt(pixels)))
        grid = picked.view(-1, 1, side, side).float()
        self.maps += F.interpolate(grid, size=(self.side, self.side), mode="bilinear", align_corners=False).squeeze(1).cpu()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return cross_attention_forward(attn, hidden_states, encoder_hidden_states,
                                       lambda ctx: (attn.to_k(ctx), attn.to_v(ctx)), self._record)
