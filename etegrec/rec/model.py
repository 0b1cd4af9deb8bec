"""The generative recommender: a T5 encoder-decoder over item-code tokens (paper §3.2).

The encoder reads the history as code tokens (item ``i`` contributes ``history_tokens_per_item`` tokens: its
``code_length`` tokens, or with ``history_suffix: false`` its level codes alone; the ``l``-th one from the
level-``l`` table), the decoder emits the target item's code tuple one level at a time after a BOS
embedding. Each level has one ``Embedding(code_num, d_model)`` table that is at once the encoder input table,
the decoder input table and the level's output classifier (tied, as in the reference).

Deviations from the reference code (``model.py``), all without changing the function computed:
* Code tokens are embedded with one gather from the concatenated level tables instead of a Python loop over
  levels; padding positions get a zero vector instead of ``shared[0]`` (they are masked out of attention and
  of the pooling, so their value never matters).
* The two alignment adapters live here (as in the reference) but are exposed as ``sequence_latent`` (z_E for
  SIA) and ``preference_latent`` (h_D for PSA) so the trainer runs only what a phase needs. They are single
  ``Linear`` layers as in the reference; the paper calls them "MLP".
* Attention masks go to transformers as (B, 1, 1, S) views, which it uses as they are: from a 2D mask it would
  first test ``mask.all()`` to skip an all-true mask, a host synchronisation per call on a GPU. Same values.
* The frozen semantic table of the reference is not part of this module: the tokenizer's input vectors live
  in the trainer as a plain tensor, so they are frozen by construction and absent from the state dict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import T5Config, T5ForConditionalGeneration

from etegrec.config import ModelConfig
from etegrec.rec.dropout import ATTENTION, use_cheap_cpu_dropout
from etegrec.rec.losses import rec_loss
from etegrec.tokenizer.item_codes import history_width


class EncoderOut(NamedTuple):
    """Encoder states of a batch of histories."""

    hidden: Tensor  # (B, S, d) last hidden state (after final norm)
    mask: Tensor  # (B, S) bool, True = real code token


class DecoderOut(NamedTuple):
    """Decoder states; ``past_key_values`` is the HF cache when ``use_cache`` was set, else None."""

    hidden: Tensor  # (B, t+1, d), or only the new positions when a cache was passed in
    past_key_values: object


class RecOutput(NamedTuple):
    """Teacher-forced forward pass over the full target code tuple."""

    logits: Tensor  # (B, C, K): position j scores level-j codes
    loss_rec: Tensor  # scalar cross-entropy over all B*C target tokens
    enc: EncoderOut
    dec_hidden: Tensor  # (B, C, d)


def t5_config(cfg: ModelConfig) -> T5Config:
    """The T5Config of the recommender: a one-row vocabulary whose row 0 is the BOS embedding (code tokens are
    embedded by the level tables, so T5 needs no vocabulary of its own)."""
    config = T5Config(
        vocab_size=1,
        d_model=cfg.d_model,
        d_kv=cfg.d_kv,
        d_ff=cfg.d_ff,
        num_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.num_heads,
        dropout_rate=cfg.dropout_rate,
        feed_forward_proj=cfg.feed_forward_proj,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    # SDPA takes T5's relative position bias as an additive mask; same maths as eager, faster on CPU and GPU.
    # fast_cpu_dropout: the same, except in training on CPU (etegrec.rec.dropout).
    config._attn_implementation = ATTENTION if cfg.fast_cpu_dropout else "sdpa"
    return config


class GenerativeRecommender(nn.Module):
    """T5 over item-code tokens with tied per-level token tables and the two alignment adapters.

    Args:
        cfg: the ``model`` config section (T5 sizes, ``code_num`` K, ``code_length`` C, ``history_suffix``).
        semantic_dim: d_s, the tokenizer's input dimension (PSA compares h_D with the reconstruction in it).
        latent_dim: the tokenizer's latent dimension ``e_dim`` (SIA quantizes z_E with its codebooks).
    """

    def __init__(self, *, cfg: ModelConfig, semantic_dim: int, latent_dim: int) -> None:
        super().__init__()
        if semantic_dim < 1 or latent_dim < 1:
            raise ValueError(f"semantic_dim={semantic_dim} and latent_dim={latent_dim} must be positive")
        self.code_length = cfg.code_length
        self.code_num = cfg.code_num
        self.history_suffix = cfg.history_suffix
        self.history_tokens_per_item = history_width(cfg.code_length, cfg.history_suffix)  # C, or L without suffix
        self.d_model = cfg.d_model
        self.t5 = T5ForConditionalGeneration(t5_config(cfg))
        if cfg.fast_cpu_dropout:
            use_cheap_cpu_dropout(self.t5)
        self.token_embeddings = nn.ModuleList(nn.Embedding(cfg.code_num, cfg.d_model) for _ in range(cfg.code_length))
        self.enc_adapter = nn.Linear(cfg.d_model, latent_dim)  # z_E = enc_adapter(mean-pooled encoder states)
        self.dec_adapter = nn.Linear(cfg.d_model, semantic_dim)  # h_D = dec_adapter(first decoder state)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Reference init: every Linear/Embedding (T5 internals included) ~ N(0, 0.02), biases 0; norms stay 1.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- embeddings
    def _token_table(self) -> Tensor:
        """All level tables stacked: (C*K, d); row l*K + k is level l, code k."""
        return torch.cat([emb.weight for emb in self.token_embeddings], dim=0)

    def _embed_codes(self, codes: Tensor, period: int) -> Tensor:
        """Embed codes whose position p is level ``p % period``; -1 gives a zero vector.

        Args:
            codes: (B, S) long.
            period: tokens per item (<= C).
        Returns:
            (B, S, d).
        """
        levels = torch.arange(codes.shape[1], device=codes.device) % period  # (S,)
        flat = codes.clamp(min=0) + levels * self.code_num  # (B, S) rows of the stacked table
        emb = F.embedding(flat, self._token_table())  # (B, S, d)
        return emb * (codes >= 0).unsqueeze(-1).to(emb.dtype)

    def decoder_inputs(self, prefix_codes: Tensor) -> Tensor:
        """Teacher-forcing decoder inputs ``[BOS, emb_0(c_0), ..., emb_{t-1}(c_{t-1})]``.

        Args:
            prefix_codes: (B, t) long, 0 <= t < C.
        Returns:
            (B, t+1, d).
        """
        bos = self.t5.shared.weight[0].expand(prefix_codes.shape[0], 1, self.d_model)  # (B, 1, d)
        return torch.cat([bos, self._embed_codes(prefix_codes, self.code_length)], dim=1)

    # ------------------------------------------------------------------ encoder
    def encode(self, history_codes: Tensor) -> EncoderOut:
        """Run the encoder over the flattened history codes.

        Args:
            history_codes: (B, S) long, S = T * ``history_tokens_per_item``, item-aligned, -1 = padding.
        """
        mask = history_codes >= 0  # (B, S)
        embedded = self._embed_codes(history_codes, self.history_tokens_per_item)  # (B, S, d)
        out = self.t5.encoder(inputs_embeds=embedded, attention_mask=mask[:, None, None, :])
        return EncoderOut(hidden=out.last_hidden_state, mask=mask)

    # ------------------------------------------------------------------ decoder
    def decode(
        self, enc: EncoderOut, prefix_codes: Tensor, past_key_values: object = None, use_cache: bool = False
    ) -> DecoderOut:
        """Decoder states for BOS plus a code prefix.

        Args:
            enc: encoder output for the same B rows.
            prefix_codes: (B, t) long, the codes decoded so far.
            past_key_values: an HF ``EncoderDecoderCache`` holding the first positions; only the positions not
                in it are run and returned.
            use_cache: return the (updated) cache for incremental decoding.
        Returns:
            DecoderOut with hidden (B, t+1-past, d).
        """
        inputs = self.decoder_inputs(prefix_codes)  # (B, t+1, d)
        if past_key_values is not None:
            inputs = inputs[:, past_key_values.get_seq_length() :]
        out = self.t5.decoder(
            inputs_embeds=inputs,
            encoder_hidden_states=enc.hidden,
            encoder_attention_mask=enc.mask[:, None, None, :],  # (B, 1, 1, S): used as it is
            cache=past_key_values,
            use_cache=use_cache,
        )
        return DecoderOut(hidden=out.last_hidden_state, past_key_values=out.cache if use_cache else None)

    def level_logits(self, hidden: Tensor, level: int) -> Tensor:
        """Scores of the level-``level`` codes with the tied table: (..., d) -> (..., K)."""
        return hidden @ self.token_embeddings[level].weight.t()

    # ---------------------------------------------------------------- alignment
    def sequence_latent(self, enc: EncoderOut) -> Tensor:
        """z_E: adapter of the masked mean of the encoder states, (B, e) (SIA's sequence side)."""
        mask = enc.mask.unsqueeze(-1).to(enc.hidden.dtype)  # (B, S, 1)
        pooled = (enc.hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, d)
        return self.enc_adapter(pooled)

    def preference_latent(self, dec_hidden: Tensor) -> Tensor:
        """h_D: adapter of the decoder state at BOS (the one predicting level 0), (B, d_s) (PSA)."""
        return self.dec_adapter(dec_hidden[:, 0])

    # ------------------------------------------------------------------ forward
    def forward(self, history_codes: Tensor, target_codes: Tensor) -> RecOutput:
        """Teacher-forced pass: logits for every level of the target and the recommendation loss.

        Args:
            history_codes: (B, S) long, item-aligned as ``encode`` reads it, -1 = padding.
            target_codes: (B, C) long.
        """
        enc = self.encode(history_codes)
        dec_hidden = self.decode(enc, target_codes[:, :-1]).hidden  # (B, C, d)
        tables = torch.stack([emb.weight for emb in self.token_embeddings])  # (C, K, d)
        logits = torch.einsum("bcd,ckd->bck", dec_hidden, tables)  # (B, C, K)
        return RecOutput(logits=logits, loss_rec=rec_loss(logits, target_codes), enc=enc, dec_hidden=dec_hidden)
