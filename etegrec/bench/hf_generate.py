"""The transformers ``generate`` decoding path, for the speed and agreement benchmark only.

Other implementations decode with transformers' ``generate`` (beam search, KV cache) and a
``prefix_allowed_tokens_fn`` that looks allowed tokens up in a Python trie. ``HFConstrainedGenerator`` runs that
path on the recommender's own weights, so ``python -m etegrec.bench speed`` can time it against
``etegrec.rec.generation.beam_search`` and check that both return the same items.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import GenerationConfig, T5ForConditionalGeneration

from etegrec.rec.generation import BeamOutput, check_compatible, trim_history
from etegrec.rec.model import GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemCodes


class _LevelT5(T5ForConditionalGeneration):
    """T5 over a flat vocabulary (0 = BOS, 1 + l*K + k = level-l code k) whose logits at decoder position p keep
    only the level-p block (others -inf), so the log-softmax that ``generate`` applies equals the model's per-level
    log-softmax over K tokens."""

    def forward(self, *args, **kwargs):
        """``T5ForConditionalGeneration.forward`` plus the level mask of each output position."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        out = super().forward(*args, **kwargs)
        positions = torch.arange(past, past + out.logits.shape[1], device=out.logits.device)
        out.logits = out.logits + self.level_bias[positions.clamp(max=self.level_bias.shape[0] - 1)]
        return out


class HFConstrainedGenerator:
    """The decoding path of other implementations, for the speed and agreement benchmark only.

    transformers' ``generate`` (beam search, KV cache, encoder run once and expanded to beams by HF) with
    ``prefix_allowed_tokens_fn`` looking allowed tokens up in a Python dict trie, on a copy of the model's
    T5 whose vocabulary is the flat concatenation ``[BOS, level-0 table, ..., level-(C-1) table]`` (the model's
    own weights, also as the tied output layer). Scores are the ranking score of ``beam_search``
    (``length_penalty=0`` -> plain sums), so both paths should agree up to float ties.

    Args:
        model: the recommender whose weights are copied (build a new generator after they change).
        codes: the item codes (items and allowed prefixes).
    """

    def __init__(self, *, model: GenerativeRecommender, codes: ItemCodes) -> None:
        trie = codes.trie(model.t5.shared.weight.device)
        check_compatible(model, trie)
        k_num, length = trie.code_num, trie.code_length
        vocab = 1 + length * k_num
        config = model.t5.config.__class__.from_dict(model.t5.config.to_dict())
        config.vocab_size = vocab
        config.scale_decoder_outputs = False  # the model's level_logits are plain dot products
        config.use_cache = True
        flat = _LevelT5(config)
        with torch.no_grad():
            table = torch.cat([model.t5.shared.weight[:1]] + [emb.weight for emb in model.token_embeddings])  # (V, d)
            state = {k: v for k, v in model.t5.state_dict().items() if "embed_tokens" not in k and k != "shared.weight"
                     and k != "lm_head.weight"}
            missing, unexpected = flat.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"shared.weight", "lm_head.weight", "encoder.embed_tokens.weight",
                                             "decoder.embed_tokens.weight"}:
                raise ValueError(f"T5 copy mismatch: missing={missing} unexpected={unexpected}")
            flat.shared.weight.copy_(table)
            flat.lm_head.weight = flat.shared.weight
            flat.encoder.embed_tokens = flat.shared
            flat.decoder.embed_tokens = flat.shared
        level_bias = torch.full((length, vocab), -math.inf)
        for level in range(length):
            level_bias[level, 1 + level * k_num : 1 + (level + 1) * k_num] = 0.0
        flat.register_buffer("level_bias", level_bias, persistent=False)
        self.model = flat.to(model.t5.shared.weight.device).eval()
        self.trie = trie
        self.k_num, self.length = k_num, length
        self.history_period = model.history_tokens_per_item  # tokens per history item (C, or L without suffix)
        self.offsets = 1 + torch.arange(length, device=trie.device) * k_num  # (C,) flat id of code 0 per level
        allowed: dict[tuple[int, ...], set[int]] = {}
        for row in (codes.stored().to(trie.device) + self.offsets).tolist():  # (N, C) flat ids
            for level in range(length):
                allowed.setdefault((0, *row[:level]), set()).add(row[level])
        self.allowed = {prefix: sorted(tokens) for prefix, tokens in allowed.items()}  # decoder ids -> next ids

    def _prefix_allowed_tokens(self, batch_id: int, sent: Tensor) -> list[int]:
        key = tuple(sent.tolist())
        if key in self.allowed:
            return self.allowed[key]
        level = len(key) - 1  # a dead beam (catalogue narrower than the beam): any token of its level
        return list(range(1 + level * self.k_num, 1 + (level + 1) * self.k_num))

    @torch.inference_mode()
    def __call__(self, history_codes: Tensor, num_beams: int = 20, top_k: int = 10) -> BeamOutput:
        """Top-``top_k`` items per user via ``generate``: (B, S) history codes -> BeamOutput."""
        if not 1 <= top_k <= num_beams:
            raise ValueError(f"need 1 <= top_k <= num_beams, got top_k={top_k}, num_beams={num_beams}")
        history_codes = trim_history(history_codes)
        levels = torch.arange(history_codes.shape[1], device=history_codes.device) % self.history_period  # (S,)
        input_ids = torch.where(history_codes >= 0, history_codes + self.offsets[levels], 0)  # (B, S) flat ids
        beam = {"length_penalty": 0.0, "early_stopping": False} if num_beams > 1 else {"output_logits": True}
        generation = GenerationConfig(
            num_beams=num_beams, num_return_sequences=top_k, max_new_tokens=self.length, do_sample=False,
            eos_token_id=None, pad_token_id=0, decoder_start_token_id=0, bos_token_id=None,
            return_dict_in_generate=True, output_scores=True, use_cache=True, **beam,
        )
        out = self.model.generate(
            input_ids=input_ids, attention_mask=history_codes >= 0, generation_config=generation,
            prefix_allowed_tokens_fn=self._prefix_allowed_tokens,
        )
        batch = history_codes.shape[0]
        tokens = out.sequences[:, 1 : 1 + self.length]  # (B*k, C) flat ids
        codes = (tokens - self.offsets).view(batch, top_k, self.length)
        items = self.trie.lookup(codes)  # (B, k), 0 for a dead beam's tuple
        if num_beams > 1:
            scores = out.sequences_scores.view(batch, top_k).float()
        else:  # greedy search keeps no sequence score: sum the level log-softmax of the chosen tokens
            logp = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], dim=1)  # (B, C, V)
            scores = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1).view(batch, top_k)
        alive = (items > 0) & (scores > -1e8)
        return BeamOutput(
            items=torch.where(alive, items, 0), codes=codes.masked_fill(~alive.unsqueeze(-1), -1),
            scores=scores.masked_fill(~alive, -math.inf),
        )


def generate_with_hf(
    model: GenerativeRecommender, codes: ItemCodes, history_codes: Tensor, num_beams: int = 20, top_k: int = 10
) -> BeamOutput:
    """One-shot ``HFConstrainedGenerator`` call (benchmark / agreement checks; build the generator once to time it)."""
    return HFConstrainedGenerator(model=model, codes=codes)(history_codes, num_beams=num_beams, top_k=top_k)
