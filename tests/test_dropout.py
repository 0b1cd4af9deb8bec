"""The cheap CPU dropout (``fast_cpu_dropout``): its mask law, and a model that trains the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from etegrec.config import ModelConfig
from etegrec.rec.dropout import CheapMaskDropout, keep_mask, t5_attention
from etegrec.rec.model import GenerativeRecommender

K, C = 6, 3


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_mask_keeps_each_element_with_the_stated_probability(p: float) -> None:
    torch.manual_seed(0)
    n_words = 1 << 18
    mask, keep = keep_mask(torch.Size([n_words, 4]), p, torch.device("cpu"))  # column j = int16 slice j of a word
    assert keep == pytest.approx(1 - p, abs=1 / 65536)
    sd = (keep * (1 - keep) / n_words) ** 0.5
    for column in mask.float().mean(dim=0).tolist():  # every 16-bit slice of the 64-bit words is unbiased
        assert abs(column - keep) < 5 * sd
    both = (mask[:, 0] & mask[:, 3]).float().mean().item()  # slices of one word are independent
    assert abs(both - keep * keep) < 5 * sd
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([n_words, 4]), p, torch.device("cpu"))[0], mask)  # seeded


def test_cheap_dropout_is_inverted_dropout_and_identity_in_eval() -> None:
    torch.manual_seed(0)
    x = torch.rand(512, 512) + 1.0
    drop = CheapMaskDropout(0.25)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert torch.allclose(y[kept], x[kept] / 0.75)  # kept entries scaled by 1 / keep
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CheapMaskDropout(0.0).train()(x), x)


def _model(fast: bool, dropout_rate: float) -> GenerativeRecommender:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      dropout_rate=dropout_rate, code_num=K, code_length=C, fast_cpu_dropout=fast)
    return GenerativeRecommender(cfg=cfg, semantic_dim=8, latent_dim=4)


def test_every_dropout_is_swapped_and_the_checkpoint_is_unchanged() -> None:
    fast, native = _model(True, 0.1), _model(False, 0.1)
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert any(isinstance(m, CheapMaskDropout) for m in fast.modules())
    assert fast.state_dict().keys() == native.state_dict().keys()


def test_training_forward_and_gradients_match_torch_dropout_and_sdpa() -> None:
    # At a drop probability that rounds to 0 of 65,536 the cheap path drops nothing (torch's drops with p 1e-9):
    # the attention maths (padding mask, causal decoder, relative bias) must then equal SDPA's in training mode.
    fast, native = _model(True, 1e-9), _model(False, 1e-9)
    native.load_state_dict(fast.state_dict())
    history = torch.tensor([[1, 2, 0, 3, 4, 0, -1, -1, -1], [5, 1, 0, -1, -1, -1, -1, -1, -1]])  # (2, 9), padded
    target = torch.tensor([[2, 3, 0], [4, 4, 1]])  # (2, C)
    outs = []
    for model in (fast, native):
        model.train()
        out = model(history, target)
        out.loss_rec.backward()
        outs.append((out.logits, [p.grad for p in model.parameters()]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    for g_fast, g_native in zip(outs[0][1], outs[1][1]):
        assert (g_fast is None) == (g_native is None)
        if g_fast is not None:
            assert torch.allclose(g_fast, g_native, atol=1e-5)


def test_training_with_cheap_dropout_changes_outputs_and_keeps_the_decoder_causal() -> None:
    model = _model(True, 0.3).train()
    history = torch.tensor([[1, 2, 0, 3, 4, 0]])
    torch.manual_seed(1)
    a = model(history, torch.tensor([[2, 3, 0]])).logits  # (1, C, K)
    torch.manual_seed(1)
    b = model(history, torch.tensor([[2, 5, 1]])).logits  # later target codes differ, same dropout draws
    assert torch.allclose(a[:, :2], b[:, :2])  # positions 0, 1 see target codes < 1 only: same logits
    torch.manual_seed(2)
    assert not torch.allclose(model(history, torch.tensor([[2, 3, 0]])).logits, a)  # dropout acts


def test_attention_dropout_has_the_law_of_sdpa_dropout() -> None:
    # Same query, keys, padding mask and relative bias drawn N times: the cheap path's attention outputs must have
    # the mean and spread of SDPA's own dropout (torch's mask), element by element, within 5 standard errors.
    g = torch.Generator().manual_seed(0)
    n, heads, t, s, d = 20_000, 2, 3, 5, 4
    q, k, v = (torch.randn(1, heads, m, d, generator=g).expand(n, -1, -1, -1) for m in (t, s, s))
    bias = torch.randn(1, heads, t, s, generator=g)
    keys = torch.ones(n, 1, 1, s, dtype=torch.bool)
    keys[..., -2:] = False  # two padded keys
    module = nn.Module()
    module.is_causal = False
    def draws(attention) -> torch.Tensor:  # (n, t, H, d)
        torch.manual_seed(3)
        return attention(module, q, k, v, keys, scaling=1.0, dropout=0.3, position_bias=bias)[0]

    cheap, native = draws(t5_attention), draws(sdpa_attention_forward)
    se = native.std(dim=0) / n**0.5
    assert (cheap.mean(dim=0) - native.mean(dim=0)).abs().le(5 * se * 2**0.5).all()
    assert (cheap.std(dim=0) / native.std(dim=0) - 1).abs().max() < 0.05
    assert not torch.equal(cheap[0], cheap[1])  # the draws differ row to row
