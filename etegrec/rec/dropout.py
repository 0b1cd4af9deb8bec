"""Cheaper dropout for training on CPU (``fast_cpu_dropout``).

On CPU, torch draws a dropout mask with ``bernoulli_``: one random float per element, about 6.6 ns each on the
dev machine, which made dropout ~20 % of a recommender training step of the ``cpu`` preset (profiled on Beauty).
Here a mask is cut from 64-bit random words instead, 16 bits per element (4 elements per draw), and applied as
one scaled float mask: same expectation and Bernoulli law, with the drop probability rounded to a multiple of
1/65,536 (0.1 -> 0.100006). T5's attention dropout sits inside SDPA, so attention in training on CPU runs the
same maths as transformers' eager T5 attention with this mask. On other devices, in eval mode and at p = 0
everything falls through to torch's dropout and SDPA unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "etegrec_sdpa"  # the T5 attention implementation name registered below
_INT16_VALUES = 1 << 16
_WORD_MIN, _WORD_MAX = -(1 << 63), (1 << 63) - 1


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A Bernoulli keep mask of ``shape`` from the default generator, and its exact keep probability.

    Each element is one int16 slice of a uniform 64-bit word: kept when it is >= the threshold that leaves
    ``round(p * 65536)`` of the 65,536 values below it.
    """
    n = shape.numel()
    dropped_values = round(p * _INT16_VALUES)
    words = torch.randint(_WORD_MIN, _WORD_MAX, ((n + 3) // 4,), dtype=torch.int64, device=device)  # (ceil(n/4),)
    mask = words.view(torch.int16)[:n].view(shape) >= torch.iinfo(torch.int16).min + dropped_values
    return mask, 1.0 - dropped_values / _INT16_VALUES


def scaled_dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout of ``x`` with the cheap mask (training only; callers check)."""
    mask, keep = keep_mask(x.shape, p, x.device)
    if keep == 0.0:
        return x * 0.0
    return x * mask.to(x.dtype).mul_(1.0 / keep)


class CheapMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``keep_mask`` when training on CPU; torch's dropout elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return scaled_dropout(x, self.p)


def t5_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """T5 attention: SDPA, except in training on CPU with dropout, where the weights get ``scaled_dropout``.

    Args:
        query: (B, H, T, d_kv); key, value: (B, H, S, d_kv).
        attention_mask: (B, 1, 1|T, S) bool (True = attend) or additive float; None = all positions, or causal
            when the module is a causal self-attention (as SDPA reads it).
        position_bias: (1|B, H, T, S) additive relative-position bias.
    Returns:
        (B, T, H, d_kv) attention output, and the attention weights (B, H, T, S) when computed here.
    """
    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      position_bias=position_bias, **kwargs)
    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, H, T, S)
    if position_bias is not None:
        scores = scores + position_bias
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is None and is_causal and query.shape[2] > 1:
        t, s = query.shape[2], key.shape[2]
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)  # (T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = scaled_dropout(torch.softmax(scores, dim=-1), dropout)  # (B, H, T, S)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(ATTENTION, t5_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks built exactly as for "sdpa"


def use_cheap_cpu_dropout(model: nn.Module) -> None:
    """Swap every ``nn.Dropout`` of ``model`` for ``CheapMaskDropout`` (same ``p``; no state, so checkpoints are
    unchanged). T5 attention takes the cheap mask through ``ATTENTION`` in its config."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, CheapMaskDropout(child.p))
