"""Decoding for the generative recommender: constrained beam search, sampling, teacher-forced scoring.

Scores (one definition per use, stated once here):
* **Ranking score** (``beam_search``, and ``sequence_log_probs(trie=None)``): the model's own joint
  log-probability of an item's code tuple, ``sum_l log_softmax(logits_l)[c_l]`` with the softmax over all K
  tokens of level l. The trie only *prunes* (invalid tokens are set to -inf after the log-softmax, exactly what
  transformers' ``prefix_allowed_tokens_fn`` does); it never changes a valid item's score. With a beam at least
  as wide as the catalogue, beam search therefore returns the exact top-k of exhaustive scoring.
* **Sampling distribution** (``sample``, and ``sequence_log_probs(trie=...)``): the constrained, renormalised
  distribution ``sum_l log_softmax(mask_l(logits_l / T))[c_l]`` where ``mask_l`` keeps the trie children of
  the sampled prefix. It is a proper distribution over the catalogue (every sample is a real item), which is
  what GRPO rollouts need; ``sequence_log_probs`` recomputes it teacher-forced, with gradients, from the
  logits of ``SequenceScorer`` (the one teacher-forced scorer, also GRPO's).

Speed (no Python loop over users or beams, integer tensors, ``torch.inference_mode``):
* Users are sorted by history length and encoded in a few length chunks (``_length_chunks``: fewest padded
  tokens plus a per-chunk cost, ``CHUNK_COST_TOKENS`` per device type), each trimmed to its own longest history;
  the encoder runs once per user. On CUDA a chunk costs far more (its encoder and every decode step's
  cross-attention are separate kernel launches, and decoding there is launch-bound), so batches split less.
* The decoder is an incremental T5 pass over the model's own weights (``_IncrementalDecoder``, equal to
  ``model.decode`` -- the tests compare them): cross-attention keys/values are computed once per user and a
  user's beams attend as that user's queries, so nothing on the encoder side is copied per beam; the
  self-attention cache keeps the BOS position once per user and later positions per beam, re-gathered when beams
  are reordered; the first step runs one row per user (only one live beam). It has no dropout, so decoding
  always runs with the model in eval mode (its mode is restored afterwards).

Deviations from the reference: constrained decoding (the reference is unconstrained, so invalid code tuples
occupy ranks), so every returned candidate is a distinct real item; all-padding history columns at either end
are cut before encoding (T5 positions are relative, so real tokens see the same thing), so results do not depend
on how a batch was padded or composed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from etegrec.rec.model import EncoderOut, GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemTrie


class BeamOutput(NamedTuple):
    """Top candidates per user, best first."""

    items: Tensor  # (B, k) long item ids 1..N, 0 = no candidate (catalogue smaller than k)
    codes: Tensor  # (B, k, C) long, -1 where items == 0
    scores: Tensor  # (B, k) float summed log-probs (ranking score), -inf where items == 0


class SampleOutput(NamedTuple):
    """Constrained ancestral samples, G per user."""

    items: Tensor  # (B, G) long item ids 1..N
    codes: Tensor  # (B, G, C) long
    log_probs: Tensor  # (B, G) float, log-prob under the constrained, renormalised, tempered distribution


def trim_history(history_codes: Tensor) -> Tensor:
    """Drop leading and trailing columns that are padding (-1) in every row: (B, S) -> (B, S').

    Padding comes in whole items, so item-aligned rows stay item-aligned (whatever the tokens per item).
    """
    used = (history_codes >= 0).any(dim=0).nonzero()
    if used.numel() == 0:
        return history_codes[:, :1]
    return history_codes[:, int(used[0]) : int(used[-1]) + 1]


# ------------------------------------------------------------------------------------- incremental decoder
@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# Fixed cost of one more length chunk, in padded history tokens. CPU: the value decoding used before there was a CUDA
# one. CUDA: an estimate, not measured: ~200 more kernel launches per chunk against the padded tokens an H200
# encodes in that time.
CHUNK_COST_TOKENS = {"cpu": 128, "cuda": 4096}


def _length_chunks(lengths: Tensor, token_penalty: int = 128) -> list[int]:
    """Split users sorted by history length into contiguous chunks, each padded to its own longest history.

    Minimises ``sum_chunks(users * longest) + token_penalty * chunks`` (padded tokens plus a per-call cost) by
    dynamic programming; returns the chunk sizes. Cuts fall only where the length changes: moving the users of one
    length at the start of a chunk into the chunk before never adds padding, so the programme runs over the G
    distinct lengths (at most ``max_his_len`` + 1) instead of the n users (O(G^2), not O(n^2), per batch).
    """
    values, counts = torch.unique_consecutive(lengths, return_counts=True)
    longest = values.double().numpy()  # (G,) ascending: a chunk ending with group j is padded to longest[j]
    ends = np.cumsum(counts.numpy())  # (G,) users in groups 0..j
    starts = ends - counts.numpy()  # (G,) users before group j
    groups = longest.shape[0]
    best = np.zeros(groups + 1)  # best[j]: cost of the users of the first j groups
    cut = np.zeros(groups + 1, dtype=np.int64)
    for j in range(1, groups + 1):
        options = best[:j] + (ends[j - 1] - starts[:j]) * longest[j - 1]  # last chunk = groups i..j-1
        cut[j] = int(options.argmin())
        best[j] = options[cut[j]] + token_penalty
    sizes = []
    j = groups
    while j > 0:
        sizes.append(int(ends[j - 1] - starts[cut[j]]))
        j = int(cut[j])
    return sizes[::-1]


class _Encoded(NamedTuple):
    """Encoder states of a batch regrouped by history length (encoder and cross-attention skip most padding)."""

    order: Tensor  # (B,) long: sorted row i is input row order[i]
    chunks: list[EncoderOut]  # consecutive sorted rows, each trimmed to its own padding


def _encode_by_length(model: GenerativeRecommender, history_codes: Tensor) -> _Encoded:
    lengths = (history_codes >= 0).sum(dim=1)  # (B,)
    sorted_lengths, order = lengths.sort(stable=True)
    rows = history_codes[order]  # (B, S) sorted by length
    chunks, start = [], 0
    cost = CHUNK_COST_TOKENS.get(history_codes.device.type, CHUNK_COST_TOKENS["cpu"])
    for size in _length_chunks(sorted_lengths.cpu(), cost):
        chunks.append(model.encode(trim_history(rows[start : start + size])))
        start += size
    return _Encoded(order=order, chunks=chunks)


class _IncrementalDecoder:
    """The model's T5 decoder run one position at a time for R = B*w rows (w beams or samples per user).

    Same maths as ``model.t5.decoder`` in eval mode (pre-norm blocks, unscaled attention, relative position
    bias of block 0 shared by all blocks), but cross-attention keys/values are computed once per user and the
    w rows of a user attend as w queries of one (users, H, w, S) attention, per length chunk. Rows are
    user-major in the sorted order of ``_Encoded``.
    """

    def __init__(self, model: GenerativeRecommender, encoded: _Encoded) -> None:
        decoder = model.t5.decoder
        self.blocks = list(decoder.block)
        self.final_norm = decoder.final_layer_norm
        self.heads, self.d_kv = decoder.config.num_heads, decoder.config.d_kv
        self.batch = encoded.order.numel()
        self.chunk_sizes = [enc.hidden.shape[0] for enc in encoded.chunks]
        self.cross = []  # per chunk: (additive mask (n, 1, 1, S), [(k, v) per block], each (n, H, S, dk))
        for enc in encoded.chunks:
            hidden = enc.hidden  # (n, S, d)
            n, seq = hidden.shape[:2]
            kv = []
            for block in self.blocks:
                attn = block.layer[1].EncDecAttention
                k = attn.k(hidden).view(n, seq, self.heads, self.d_kv).transpose(1, 2)  # (n, H, S, dk)
                v = attn.v(hidden).view(n, seq, self.heads, self.d_kv).transpose(1, 2)
                kv.append((k, v))
            bias = torch.zeros(n, 1, 1, seq, dtype=hidden.dtype, device=hidden.device)
            self.cross.append((bias.masked_fill(~enc.mask[:, None, None, :], torch.finfo(hidden.dtype).min), kv))
        length = model.code_length
        device = encoded.order.device
        self.self_bias = self.blocks[0].layer[0].SelfAttention.compute_bias(length, length, device=device)[0]
        # Self-attention cache per block: position 0 (BOS) once per user, (B, H, dk); later positions per row.
        self.first_kv: list[tuple[Tensor, Tensor]] = []
        self.later_kv: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.blocks]
        self.position = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep rows ``rows`` (R_new,) of the per-row cache, in that order; rows stay in their user's block."""
        self.later_kv = [[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv] for kv in self.later_kv]

    def _self_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, width: int) -> Tensor:
        """One query position over the cached ones; q, k, v (R, H, dk) -> (R, H, dk).

        With at most C keys, elementwise products beat batched (1 x dk) @ (dk x t) matmuls and cache concats.
        """
        if self.position == 0:
            self.first_kv.append((k, v))  # R = B here: one live row per user
            return v  # softmax over a single key
        rows = q.shape[0]
        k0, v0 = self.first_kv[i]  # (B, H, dk)
        self.later_kv[i].append((k, v))
        per_user = q.view(self.batch, width, self.heads, self.d_kv)  # (B, w, H, dk)
        scores = [(per_user * k0.unsqueeze(1)).sum(-1).view(rows, self.heads)]  # (R, H)
        scores += [(q * kp).sum(-1) for kp, _ in self.later_kv[i]]
        probs = torch.softmax(torch.stack(scores, dim=-1) + self.self_bias[:, self.position, : self.position + 1], -1)
        out = (probs[:, :, 0].view(self.batch, width, self.heads, 1) * v0.unsqueeze(1)).view(rows, self.heads, -1)
        for p, (_, vp) in enumerate(self.later_kv[i], start=1):
            out = out + probs[:, :, p : p + 1] * vp
        return out  # (R, H, dk)

    def step(self, x: Tensor) -> Tensor:
        """Decoder output at the next position: inputs (R, d) with R = B*w, rows user-major -> (R, d)."""
        rows = x.shape[0]
        width = rows // self.batch
        h = x
        for i, block in enumerate(self.blocks):
            layer = block.layer[0]
            attn = layer.SelfAttention
            normed = layer.layer_norm(h)
            q = attn.q(normed).view(rows, self.heads, self.d_kv)  # (R, H, dk)
            k = attn.k(normed).view(rows, self.heads, self.d_kv)
            v = attn.v(normed).view(rows, self.heads, self.d_kv)
            h = h + attn.o(self._self_attention(i, q, k, v, width).reshape(rows, self.heads * self.d_kv))

            layer = block.layer[1]
            attn = layer.EncDecAttention
            q = attn.q(layer.layer_norm(h)).view(self.batch, width, self.heads, self.d_kv).transpose(1, 2)
            outs = []
            for (mask, kv), users in zip(self.cross, q.split(self.chunk_sizes)):
                ck, cv = kv[i]
                outs.append(F.scaled_dot_product_attention(users, ck, cv, attn_mask=mask, scale=1.0))  # (n,H,w,dk)
            out = torch.cat(outs) if len(outs) > 1 else outs[0]  # (B, H, w, dk)
            h = h + attn.o(out.transpose(1, 2).reshape(rows, self.heads * self.d_kv))

            h = block.layer[2](h)  # T5LayerFF: norm, FFN, residual
        self.position += 1
        return self.final_norm(h)


def check_compatible(model: GenerativeRecommender, trie: ItemTrie) -> None:
    """The trie must be of the model's item codes (same C and K) and on the model's device."""
    if trie.code_length != model.code_length or trie.code_num != model.code_num:
        raise ValueError(
            f"trie (C={trie.code_length}, K={trie.code_num}) does not match the model (C={model.code_length}, "
            f"K={model.code_num}); use the trie of this model's item codes (ItemCodes.trie)"
        )
    if trie.device != model.token_embeddings[0].weight.device:
        raise ValueError(f"trie is on {trie.device} but the model on {model.token_embeddings[0].weight.device}; "
                         "use ItemCodes.trie(device)")


def _bos(model: GenerativeRecommender, rows: int) -> Tensor:
    return model.decoder_inputs(torch.empty(rows, 0, dtype=torch.long, device=model.t5.shared.weight.device))[:, 0]


_Result = TypeVar("_Result", "BeamOutput", "SampleOutput")


def _outside_inference_mode(out: _Result) -> _Result:
    """Copy inference-mode results into normal tensors (usable in autograd, e.g. GRPO's teacher forcing)."""
    return type(out)(*(t.clone() for t in out))


# ------------------------------------------------------------------------------------------- beam search
def beam_search(
    model: GenerativeRecommender, trie: ItemTrie, history_codes: Tensor, num_beams: int = 20, top_k: int = 10
) -> BeamOutput:
    """Constrained beam search: the ``top_k`` best distinct items per user by the ranking score.

    Args:
        model: the recommender (unwrapped; decoded in eval mode, its mode is restored).
        trie: ``ItemTrie`` of the current item-code table, on the model's device.
        history_codes: (B, S) long, -1 = padding.
        num_beams: beam width W (>= top_k).
        top_k: candidates returned per user.
    """
    if not 1 <= top_k <= num_beams:
        raise ValueError(f"need 1 <= top_k <= num_beams, got top_k={top_k}, num_beams={num_beams}")
    check_compatible(model, trie)
    with _eval_mode(model):
        return _outside_inference_mode(_beam_search(model, trie, history_codes, num_beams, top_k))


@torch.inference_mode()
def _beam_search(
    model: GenerativeRecommender, trie: ItemTrie, history_codes: Tensor, num_beams: int, top_k: int
) -> BeamOutput:
    k_num, length = trie.code_num, trie.code_length
    encoded = _encode_by_length(model, history_codes)
    decoder = _IncrementalDecoder(model, encoded)
    batch = history_codes.shape[0]
    device = history_codes.device
    x = _bos(model, batch)  # (B, d): one live beam per user at the first step
    states = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, w) prefix ids
    scores = torch.zeros(batch, 1, device=device)  # (B, w)
    codes = torch.empty(batch, 1, 0, dtype=torch.long, device=device)  # (B, w, l)
    for level in range(length):
        width = states.shape[1]
        logp = torch.log_softmax(model.level_logits(decoder.step(x), level).float(), dim=-1)  # (B*w, K)
        nxt = trie.next_states(level, states.view(-1))  # (B*w, K)
        logp = logp.masked_fill(nxt < 0, -math.inf)
        cand = (scores.unsqueeze(-1) + logp.view(batch, width, k_num)).view(batch, width * k_num)
        scores, idx = cand.topk(min(num_beams, width * k_num), dim=1)  # (B, w') sorted
        src, token = idx // k_num, idx % k_num  # (B, w')
        states = nxt.view(batch, width * k_num).gather(1, idx).long()  # (B, w') child ids / item ids
        codes = torch.cat([codes.gather(1, src.unsqueeze(-1).expand(-1, -1, level)), token.unsqueeze(-1)], -1)
        if level < length - 1:
            decoder.reorder((torch.arange(batch, device=device).unsqueeze(1) * width + src).view(-1))
            x = model.token_embeddings[level](token.view(-1))  # (B*w', d)
    back = torch.empty_like(encoded.order)
    back[encoded.order] = torch.arange(batch, device=device)  # input row -> sorted row
    scores = scores[back, :top_k]  # (B, k)
    alive = torch.isfinite(scores)
    return BeamOutput(
        items=torch.where(alive, states[back, :top_k], 0),
        codes=codes[back, :top_k].masked_fill(~alive.unsqueeze(-1), -1),
        scores=scores,
    )


# ----------------------------------------------------------------------------------------------- sampling
def sample(
    model: GenerativeRecommender,
    trie: ItemTrie,
    history_codes: Tensor,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Constrained ancestral sampling (with replacement) of ``num_samples`` items per user, in eval mode.

    Each level draws from ``softmax(mask(logits / temperature))`` over the trie children of the prefix, so every
    sample is a real item; ``log_probs`` are under that distribution (= ``sequence_log_probs(..., trie)``).

    Args:
        history_codes: (B, S) long, -1 = padding.
        num_samples: G >= 1.
        temperature: > 0.
        generator: optional torch.Generator for reproducible draws.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check_compatible(model, trie)
    with _eval_mode(model):
        return _outside_inference_mode(_sample(model, trie, history_codes, num_samples, temperature, generator))


@torch.inference_mode()
def _sample(
    model: GenerativeRecommender,
    trie: ItemTrie,
    history_codes: Tensor,
    num_samples: int,
    temperature: float,
    generator: torch.Generator | None,
) -> SampleOutput:
    encoded = _encode_by_length(model, history_codes)
    decoder = _IncrementalDecoder(model, encoded)
    batch, device = history_codes.shape[0], history_codes.device
    x = _bos(model, batch)  # (B, d)
    states = torch.zeros(batch, dtype=torch.long, device=device)  # (R,) R = B, then B*G
    log_probs = torch.zeros(batch * num_samples, device=device)
    tokens = []
    for level in range(trie.code_length):
        logits = model.level_logits(decoder.step(x), level).float() / temperature  # (R, K)
        nxt = trie.next_states(level, states)  # (R, K)
        logp = torch.log_softmax(logits.masked_fill(nxt < 0, -math.inf), dim=-1)  # (R, K)
        if level == 0:  # one row per user so far: expand logits, children and cache to G rows per user
            rows = torch.arange(batch, device=device).repeat_interleave(num_samples)  # (B*G,)
            logp, nxt = logp[rows], nxt[rows]
            decoder.reorder(rows)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B*G,)
        log_probs += logp.gather(1, token.unsqueeze(1)).squeeze(1)
        states = nxt.gather(1, token.unsqueeze(1)).squeeze(1).long()  # prefix ids, item ids at the end
        tokens.append(token)
        x = model.token_embeddings[level](token)  # (B*G, d)
    back = torch.empty_like(encoded.order)
    back[encoded.order] = torch.arange(batch, device=device)  # input row -> sorted row
    codes = torch.stack(tokens, dim=-1).view(batch, num_samples, trie.code_length)[back]
    return SampleOutput(
        items=states.view(batch, num_samples)[back], codes=codes, log_probs=log_probs.view(batch, num_samples)[back]
    )


class SequenceScorer(nn.Module):
    """Teacher-forced next-token logits of given code tuples, G per history, the encoder run once per history.

    A module rather than a function so that GRPO can wrap it in DDP: its forward then runs through the wrapper
    and gradients are all-reduced across processes.

    Args:
        model: the recommender (its parameters are this module's parameters).
    """

    def __init__(self, *, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, history_codes: Tensor, codes: Tensor) -> Tensor:
        """Logits at every level, temperature 1, in the model's current mode.

        Args:
            history_codes: (B, S) long, -1 = padding.
            codes: (B, G, C) long.
        Returns:
            (B*G, C, K) float, rows user-major.
        """
        batch, group, length = codes.shape
        enc = self.model.encode(trim_history(history_codes))  # hidden (B, S', d)
        enc = EncoderOut(hidden=enc.hidden.repeat_interleave(group, 0), mask=enc.mask.repeat_interleave(group, 0))
        flat = codes.reshape(batch * group, length)  # (B*G, C)
        hidden = self.model.decode(enc, flat[:, :-1]).hidden  # (B*G, C, d)
        tables = torch.stack([emb.weight for emb in self.model.token_embeddings])  # (C, K, d)
        return torch.einsum("ncd,ckd->nck", hidden, tables).float()  # (B*G, C, K)


def sequence_log_probs(
    model: GenerativeRecommender,
    trie: ItemTrie | None,
    history_codes: Tensor,
    codes: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Teacher-forced log-probability of given code tuples, with gradients, in the model's current mode.

    Args:
        trie: the item trie -> log-prob under the constrained, renormalised, tempered distribution that
            ``sample`` draws from (codes must be real items); None -> the ranking score of ``beam_search``
            (per-level log-softmax over all K tokens, ``temperature`` applied to the logits).
        history_codes: (B, S) long, -1 = padding; encoded once per row even when G > 1.
        codes: (B, C) or (B, G, C) long.
    Returns:
        (B,) or (B, G) summed log-probs.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    squeeze = codes.dim() == 2
    grouped = codes.unsqueeze(1) if squeeze else codes  # (B, G, C)
    batch, group, length = grouped.shape
    if length != model.code_length:
        raise ValueError(f"codes must have C={model.code_length} tokens per item, got shape {tuple(codes.shape)}")
    flat = grouped.reshape(batch * group, length)  # (B*G, C)
    logits = SequenceScorer(model=model)(history_codes, grouped) / temperature  # (B*G, C, K)
    if trie is not None:
        check_compatible(model, trie)
        if bool((trie.lookup(flat) == 0).any()):
            raise ValueError("codes contain tuples that are not items of the trie; constrained log-probs need items")
        logits = logits.masked_fill(~trie.allowed_tokens(flat), -math.inf)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, flat.unsqueeze(-1)).squeeze(-1).sum(-1)  # (B*G,)
    return logp.view(batch) if squeeze else logp.view(batch, group)
