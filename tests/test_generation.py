"""Item trie, constrained beam search, sampling and the transformers comparison path on a tiny real model."""

from __future__ import annotations

import math

import pytest
import torch

from etegrec.bench.hf_generate import HFConstrainedGenerator, generate_with_hf
from etegrec.config import ModelConfig
from etegrec.rec.generation import (
    CHUNK_COST_TOKENS,
    _length_chunks,
    beam_search,
    sample,
    sequence_log_probs,
    trim_history,
)
from etegrec.rec.model import GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemCodes

K, C = 6, 3


def tiny_model(seed: int = 0, history_suffix: bool = True) -> GenerativeRecommender:
    """2+2-layer T5 over K=6, C=3 codes; weights spread out (std 0.4) so scores have no near-ties."""
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      dropout_rate=0.1, code_num=K, code_length=C, history_suffix=history_suffix)
    model = GenerativeRecommender(cfg=cfg, semantic_dim=8, latent_dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    return model.eval()


def catalogue(n: int, seed: int = 0) -> torch.Tensor:
    """n distinct random code tuples (N, C)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.unique(torch.randint(0, K, (4 * n, C), generator=gen), dim=0)
    return codes[torch.randperm(codes.shape[0], generator=gen)[:n]]


def histories(item_codes: torch.Tensor, lengths: list[int], seed: int = 1) -> torch.Tensor:
    """Right-padded code histories (B, max_len*W) of random items with the given lengths (in items), W tokens
    per item (the columns of ``item_codes``)."""
    gen = torch.Generator().manual_seed(seed)
    width = item_codes.shape[1]
    out = torch.full((len(lengths), max(lengths) * width), -1, dtype=torch.long)
    for row, length in enumerate(lengths):
        items = torch.randint(0, item_codes.shape[0], (length,), generator=gen)
        out[row, : length * width] = item_codes[items].reshape(-1)
    return out


def test_masks_given_as_views_give_the_same_states_as_transformers_2d_masks() -> None:
    # The model hands transformers (B, 1, 1, S) masks (no host sync); its own 2D-mask path must agree exactly.
    model = tiny_model()
    for lengths in ([3, 1, 2], [2, 2, 2]):  # with padding, and with none (transformers then drops the mask)
        history = histories(catalogue(10), lengths)
        mask = history >= 0
        enc = model.encode(history)
        reference = model.t5.encoder(inputs_embeds=model._embed_codes(history, C), attention_mask=mask)
        assert torch.equal(enc.hidden, reference.last_hidden_state)
        prefix = catalogue(10)[: len(lengths), :2]
        dec = model.t5.decoder(inputs_embeds=model.decoder_inputs(prefix), encoder_hidden_states=enc.hidden,
                               encoder_attention_mask=mask)
        assert torch.equal(model.decode(enc, prefix).hidden, dec.last_hidden_state)


# -------------------------------------------------------------------------------------------------- trie
def test_trie_tables_by_hand() -> None:
    codes = torch.tensor([[0, 1], [0, 2], [2, 0]])  # items 1, 2, 3; K = 3
    trie = ItemCodes(codes, 3).trie()
    # level 0: prefixes (0) -> id 0, (2) -> id 1 (sorted by token); token 1 invalid
    assert trie.children[0].tolist() == [[0, -1, 1]]
    # level 1: after (0): tokens 1, 2 -> items 1, 2; after (2): token 0 -> item 3
    assert trie.children[1].tolist() == [[-1, 1, 2], [3, -1, -1]]
    assert trie.next_states(1, torch.tensor([1])).ge(0).tolist() == [[True, False, False]]
    assert trie.lookup(torch.tensor([[0, 1], [2, 0], [1, 0], [0, 0], [-1, 0], [0, 3]])).tolist() == [1, 3, 0, 0, 0, 0]
    assert trie.prefix_states(torch.tensor([[2, 0], [1, 0]])).tolist() == [[0, 1], [0, -1]]
    assert (trie.code_length, trie.n_items) == (2, 3)
    moved = trie.to("cpu")
    assert moved.lookup(torch.tensor([[0, 2]])).tolist() == [2]


def test_trie_masks_match_a_python_trie() -> None:
    codes = catalogue(40)
    trie = ItemCodes(codes, K).trie()
    rows = [tuple(r) for r in codes.tolist()]
    for level in range(C):
        prefixes = sorted({r[:level] for r in rows})
        for prefix in prefixes:
            state = trie.prefix_states(torch.tensor([list(prefix) + [0] * (C - level)]))[0, level]
            allowed = {r[level] for r in rows if r[:level] == prefix}
            mask = trie.next_states(level, state) >= 0
            assert set(mask.nonzero().flatten().tolist()) == allowed
    assert trie.lookup(codes).tolist() == list(range(1, 41))


def test_trie_rejects_duplicates_and_out_of_range_codes() -> None:
    with pytest.raises(ValueError, match="add_suffix"):
        ItemCodes(torch.tensor([[0, 1], [0, 1]]), code_num=3)
    with pytest.raises(ValueError, match="code_num"):
        ItemCodes(torch.tensor([[0, 3]]), code_num=3)


# ------------------------------------------------------------------------------------------ beam search
def test_history_chunking() -> None:
    assert _length_chunks(torch.tensor([4, 4, 4]), token_penalty=10) == [3]
    # 10 short + 2 long: one chunk costs 12*150+p, two chunks 10*3 + 2*150 + 2p
    assert _length_chunks(torch.tensor([3] * 10 + [150] * 2), token_penalty=10) == [10, 2]
    codes = torch.tensor([[-1, 5, 6, -1], [-1, 7, -1, -1]])
    assert trim_history(codes).tolist() == [[5, 6], [7, -1]]


def test_history_chunking_over_distinct_lengths_is_as_cheap_as_over_every_user() -> None:
    # the programme over the distinct lengths reaches the optimum of the one over every cut between users
    def cost(lengths: list[int], sizes: list[int], penalty: int) -> int:
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        return sum(size * lengths[end - 1] for size, end in zip(sizes, ends)) + penalty * len(sizes)

    def every_cut_optimum(lengths: list[int], penalty: int) -> int:
        best = [0] + [math.inf] * len(lengths)
        for j in range(1, len(lengths) + 1):
            best[j] = min(best[i] + (j - i) * lengths[j - 1] for i in range(j)) + penalty
        return best[-1]

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).sort().values
        penalty = [0, 3, 10, 128][trial % 4]
        sizes = _length_chunks(lengths, penalty)
        assert sum(sizes) == len(lengths) and min(sizes) > 0
        assert cost(lengths.tolist(), sizes, penalty) == every_cut_optimum(lengths.tolist(), penalty)


def test_beam_search_returns_valid_distinct_items() -> None:
    model, codes = tiny_model(), catalogue(60)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [1, 3, 2, 40, 5, 1, 38])  # very different lengths: several encoder chunks
    out = beam_search(model, trie, hist, num_beams=8, top_k=5)
    assert out.items.shape == (7, 5) and out.codes.shape == (7, 5, C)
    assert (out.items >= 1).all() and (out.items <= 60).all()
    assert all(len(set(row)) == 5 for row in out.items.tolist())
    assert torch.equal(trie.lookup(out.codes), out.items)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    # scores are the model's own (HF decoder) log-probs of the returned tuples
    exact = sequence_log_probs(model, None, hist, out.codes)
    torch.testing.assert_close(out.scores, exact, atol=1e-5, rtol=0)


def test_wide_beam_equals_exhaustive_scoring() -> None:
    model, codes = tiny_model(1), catalogue(30, seed=3)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [2, 7, 1, 25, 4])
    out = beam_search(model, trie, hist, num_beams=30, top_k=30)
    every = codes.unsqueeze(0).expand(5, -1, -1)  # (B, N, C)
    scores = sequence_log_probs(model, None, hist, every)  # (B, N): sum of per-level log-softmax over K
    best = scores.topk(30, dim=1)
    assert torch.equal(out.items, best.indices + 1)
    torch.testing.assert_close(out.scores, best.values, atol=1e-5, rtol=0)
    # a narrower beam keeps only valid items and can only score lower or equal at every rank
    narrow = beam_search(model, trie, hist, num_beams=10, top_k=10)
    assert (narrow.scores <= best.values[:, :10] + 1e-5).all()


def test_catalogue_smaller_than_top_k_pads_with_zero() -> None:
    model, codes = tiny_model(), catalogue(3)
    trie = ItemCodes(codes, K).trie()
    out = beam_search(model, trie, histories(codes, [2, 1]), num_beams=6, top_k=5)
    assert sorted(out.items[0, :3].tolist()) == [1, 2, 3]
    assert out.items[:, 3:].eq(0).all() and out.codes[:, 3:].eq(-1).all()
    assert torch.isinf(out.scores[:, 3:]).all() and torch.isfinite(out.scores[:, :3]).all()


def test_results_do_not_depend_on_the_batch() -> None:
    model, codes = tiny_model(2), catalogue(50)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [3, 30, 1, 6, 12])
    together = beam_search(model, trie, hist, num_beams=10, top_k=10)
    for row in range(5):
        alone = beam_search(model, trie, trim_history(hist[row : row + 1]), num_beams=10, top_k=10)
        assert torch.equal(alone.items[0], together.items[row])
        torch.testing.assert_close(alone.scores[0], together.scores[row], atol=1e-5, rtol=0)


def test_cuda_length_chunking_gives_the_same_top_10(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fewer, larger chunks CUDA uses, run on the CPU, against the CPU's chunking: same candidates, same order.
    from etegrec.rec import generation

    model, codes = tiny_model(), catalogue(120)
    trie = ItemCodes(codes, K).trie()
    history = histories(codes, [1 + (7 * i) % 40 for i in range(64)])  # 1 to 40 items
    lengths = ((history >= 0).sum(1)).sort().values
    cpu_chunks = _length_chunks(lengths, CHUNK_COST_TOKENS["cpu"])
    assert len(cpu_chunks) > len(_length_chunks(lengths, CHUNK_COST_TOKENS["cuda"]))
    today = beam_search(model, trie, history, num_beams=20, top_k=10)
    monkeypatch.setitem(generation.CHUNK_COST_TOKENS, "cpu", CHUNK_COST_TOKENS["cuda"])
    fewer = beam_search(model, trie, history, num_beams=20, top_k=10)
    assert torch.equal(fewer.items, today.items) and torch.allclose(fewer.scores, today.scores, atol=1e-5)


def test_decoding_restores_the_model_mode_and_checks_arguments() -> None:
    model, codes = tiny_model(), catalogue(20)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [2, 3])
    model.train()
    first = beam_search(model, trie, hist, num_beams=4, top_k=4)
    assert model.training  # mode restored; decoding itself ran without dropout:
    assert torch.equal(first.items, beam_search(model, trie, hist, num_beams=4, top_k=4).items)
    with pytest.raises(ValueError, match="top_k"):
        beam_search(model, trie, hist, num_beams=3, top_k=5)
    with pytest.raises(ValueError, match="does not match the model"):
        beam_search(model, ItemCodes(codes, K + 1).trie(), hist)


# --------------------------------------------------------------------------------------------- sampling
def test_samples_are_items_with_matching_log_probs() -> None:
    model, codes = tiny_model(), catalogue(40)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [4, 1, 20])
    out = sample(model, trie, hist, num_samples=6, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert out.items.shape == (3, 6) and out.codes.shape == (3, 6, C)
    assert (out.items >= 1).all() and torch.equal(trie.lookup(out.codes), out.items)
    again = sequence_log_probs(model, trie, hist, out.codes, temperature=0.7)  # (B, G), teacher-forced HF path
    torch.testing.assert_close(out.log_probs, again, atol=1e-5, rtol=0)
    per_row = sequence_log_probs(model, trie, hist[:1], out.codes[0, :1].reshape(1, C), temperature=0.7)
    torch.testing.assert_close(per_row, again[:1, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_distribution_matches_sequence_log_probs(temperature: float) -> None:
    model, codes = tiny_model(4), catalogue(8, seed=5)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [3])
    probs = sequence_log_probs(model, trie, hist, codes.unsqueeze(0), temperature=temperature).detach().exp()[0]  # (N,)
    assert math.isclose(float(probs.sum()), 1.0, abs_tol=1e-5)  # a distribution over the catalogue
    draws = 6000
    out = sample(model, trie, hist, num_samples=draws, temperature=temperature,
                 generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(out.items[0] - 1, minlength=8).double() / draws
    # binomial std <= sqrt(0.25 / 6000) = 0.0065; allow ~4.5 std
    assert (freq - probs.double()).abs().max() < 0.03, (freq, probs)


def test_sequence_log_probs_has_gradients_and_checks_items() -> None:
    model, codes = tiny_model(), catalogue(20)
    trie = ItemCodes(codes, K).trie()
    hist = histories(codes, [3, 2])
    logp = sequence_log_probs(model, trie, hist, codes[:2])
    logp.sum().backward()
    assert model.token_embeddings[0].weight.grad is not None
    known = {tuple(row) for row in codes.tolist()}
    missing = next(t for t in ((a, b, c) for a in range(K) for b in range(K) for c in range(K)) if t not in known)
    with pytest.raises(ValueError, match="not items"):
        sequence_log_probs(model, trie, hist, torch.tensor([list(missing), codes[0].tolist()]))


# ----------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("history_suffix", [True, False])
def test_transformers_generate_path_agrees_with_beam_search(history_suffix: bool) -> None:
    model, codes = tiny_model(3, history_suffix), catalogue(60, seed=7)
    trie = ItemCodes(codes, K).trie()
    hist = histories(ItemCodes(codes, K).history_table(history_suffix)[1:], [2, 9, 1, 4])
    ours = beam_search(model, trie, hist, num_beams=8, top_k=5)
    theirs = HFConstrainedGenerator(model=model, codes=ItemCodes(codes, K))(hist, num_beams=8, top_k=5)
    assert torch.equal(theirs.items, ours.items)
    torch.testing.assert_close(theirs.scores, ours.scores, atol=1e-4, rtol=0)
    assert torch.equal(generate_with_hf(model, ItemCodes(codes, K), hist[:1], num_beams=8, top_k=5).items, ours.items[:1])
    greedy = generate_with_hf(model, ItemCodes(codes, K), hist, num_beams=1, top_k=1)  # transformers' greedy search
    ours = beam_search(model, trie, hist, num_beams=1, top_k=1)
    assert torch.equal(greedy.items, ours.items)
    torch.testing.assert_close(greedy.scores, ours.scores, atol=1e-4, rtol=0)
