"""Batches, code lookup and the recommender's invariants (etegrec/rec/data.py, model.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from etegrec.artifacts import SplitData
from etegrec.config import ModelConfig
from etegrec.rec.data import (
    BucketBatchSampler,
    CodeCollator,
    DeviceBatches,
    SequenceDataset,
    eval_loader,
    train_loader,
)
from etegrec.rec.model import GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemCodes

CODES = torch.tensor([[0, 1, 0], [2, 3, 0], [2, 3, 1], [1, 0, 0]])  # items 1..4, C = 3, K = 4


def split(histories: list[list[int]], targets: list[int]) -> SplitData:
    return SplitData(
        history=[np.asarray(h, dtype=np.int64) for h in histories],
        target=np.asarray(targets, dtype=np.int64),
        users=[str(i) for i in range(len(targets))],
    )


def test_dataset_keeps_the_last_items_and_pads_to_the_batch_maximum() -> None:
    ds = SequenceDataset(split([[1], [1, 2, 3, 4], [2, 3]], [2, 1, 4]), max_his_len=3)
    assert ds.history.tolist() == [[1, 0, 0], [2, 3, 4], [2, 3, 0]]  # oldest item dropped, right padding
    assert ds.lengths.tolist() == [1, 3, 2]
    batch = ds.__getitems__([0, 2])
    assert batch.history.tolist() == [[1, 0], [2, 3]]  # width 2 = longest history in this batch, not 3
    assert batch.target.tolist() == [2, 4]


def test_collator_maps_items_to_current_codes() -> None:
    ds = SequenceDataset(split([[1], [2, 4]], [3, 1]), max_his_len=5)
    table = ItemCodes(CODES, code_num=4)
    collate, no_suffix = CodeCollator(table, history_suffix=True), CodeCollator(table, history_suffix=False)
    b = collate(ds.__getitems__([0, 1]))
    assert b.history_codes.tolist() == [[0, 1, 0, -1, -1, -1], [2, 3, 0, 1, 0, 0]]  # (B, T*C), pad item -> -1s
    assert b.target_codes.tolist() == [[2, 3, 1], [0, 1, 0]]
    assert b.target.tolist() == [3, 1]
    short = no_suffix(ds.__getitems__([0, 1]))  # histories without the suffix: (B, T*L); targets keep all C
    assert short.history_codes.tolist() == [[0, 1, -1, -1], [2, 3, 1, 0]]
    assert short.target_codes.tolist() == b.target_codes.tolist()
    table.update(CODES.flip(0))  # a tokenizer epoch changed every ID: the next batch sees the new table
    assert collate(ds.__getitems__([1])).target_codes.tolist() == [[1, 0, 0]]
    assert no_suffix(ds.__getitems__([1])).history_codes.tolist() == [[2, 3, 0, 1]]
    with pytest.raises(ValueError, match="shape"):
        table.update(CODES[:2])


@pytest.mark.parametrize("suffix, width", [(True, 3), (False, 2)])
def test_batches_gathered_on_the_device_equal_the_collated_ones(suffix: bool, width: int) -> None:
    # DeviceBatches (the CUDA path) run on the CPU against the DataLoader path, epoch by epoch, after a code update
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 9, (40,), generator=gen)
    histories = [torch.randint(1, 5, (int(n),), generator=gen).tolist() for n in lengths]
    ds = SequenceDataset(split(histories, torch.randint(1, 5, (40,), generator=gen).tolist()), max_his_len=6)
    table = ItemCodes(CODES, code_num=4)
    collated = train_loader(ds, table, 8, history_suffix=suffix, seed=5, window=2)
    assert collated.batch_sampler.tokens_per_item == width  # the token budget counts history tokens per item
    sampler = BucketBatchSampler(ds.lengths, 8, seed=5, window=2, tokens_per_item=width)
    on_device = DeviceBatches(ds, table, sampler, torch.device("cpu"), history_suffix=suffix)
    assert len(on_device) == len(collated) == 5
    for epoch in (0, 1):
        if epoch == 1:
            table.update(CODES.flip(0))
        for loader in (collated, on_device):
            loader.batch_sampler.set_epoch(epoch)
        pairs = list(zip(collated, on_device, strict=True))
        assert all(torch.equal(a, b) for x, y in pairs for a, b in zip(x, y, strict=True))
    assert pairs[0][1].target_codes.tolist() == CODES.flip(0)[pairs[0][1].target - 1].tolist()
    assert all(b.history_codes.shape[1] % width == 0 for _, b in pairs)


def test_bucket_sampler_shards_deterministically_and_groups_lengths() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 51, (1000,), generator=gen)
    shards = [BucketBatchSampler(lengths, 32, seed=3, window=8, num_replicas=2, rank=r) for r in (0, 1)]
    batches = [list(s) for s in shards]
    assert len(batches[0]) == len(batches[1]) == len(shards[0]) == 16  # ceil(ceil(1000 / 32) / 2)
    seen = [i for shard in batches for b in shard for i in b]
    assert set(seen) == set(range(1000))  # every record; 32 batches for 2 ranks -> no repeats needed here
    assert len(seen) == 1000
    assert batches[0] == list(BucketBatchSampler(lengths, 32, seed=3, window=8, num_replicas=2, rank=0))
    shards[0].set_epoch(1)
    assert list(shards[0]) != batches[0]
    # Length bucketing: padded tokens far below those of unsorted batches of the same size.
    padded = sum(len(b) * int(lengths[b].max()) for shard in batches for b in shard)
    unsorted = sum(len(b) * int(lengths[b].max()) for b in torch.randperm(1000, generator=gen).split(32))
    assert padded < 0.7 * unsorted


def test_bucket_sampler_token_budget_shrinks_long_batches_only() -> None:
    lengths = torch.tensor([1] * 60 + [50] * 10)
    sampler = BucketBatchSampler(lengths, 20, seed=0, window=100, max_tokens=400, tokens_per_item=4)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(70))
    for b in batches:  # 20 one-item histories = 80 tokens fit; a 50-item history alone is 200 tokens: 2 per batch
        assert len(b) == (20 if int(lengths[b].max()) == 1 else 2)


def test_bucket_sampler_pads_to_equal_steps_per_process() -> None:
    shards = [
        list(BucketBatchSampler(torch.ones(5, dtype=torch.long), 2, seed=0, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 2  # 3 batches -> 4, the first repeated
    assert {i for shard in shards for b in shard for i in b} == set(range(5))


def test_eval_loader_visits_every_record_once_in_length_order() -> None:
    ds = SequenceDataset(split([[1, 2, 3], [4], [2, 3]], [1, 2, 3]), max_his_len=5)
    batches = list(eval_loader(ds, ItemCodes(CODES, code_num=4), batch_size=2, history_suffix=True))
    assert [b.target.tolist() for b in batches] == [[2, 3], [1]]  # lengths 1, 2 then 3
    assert batches[0].history_codes.shape == (2, 6)
    short = next(iter(eval_loader(ds, ItemCodes(CODES, code_num=4), batch_size=2, history_suffix=False)))
    assert short.history_codes.shape == (2, 4) and short.target_codes.shape == (2, 3)  # T*L history, C target


def tiny_model(history_suffix: bool = True) -> GenerativeRecommender:
    torch.manual_seed(0)
    cfg = ModelConfig(encoder_layers=2, decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8, code_num=4,
                      code_length=3, history_suffix=history_suffix)
    return GenerativeRecommender(cfg=cfg, semantic_dim=12, latent_dim=6).eval()


@pytest.fixture()
def model() -> GenerativeRecommender:
    return tiny_model()


def test_without_the_suffix_the_encoder_reads_level_codes_with_period_l() -> None:
    model = tiny_model(history_suffix=False)
    assert model.history_tokens_per_item == 2
    ds = SequenceDataset(split([[1, 3, 2], [4]], [2, 1]), max_his_len=5)
    batch = CodeCollator(ItemCodes(CODES, code_num=4), history_suffix=False)(ds.__getitems__([0, 1]))
    history = batch.history_codes  # (2, 3*L): items 1, 3, 2 and item 4 + padding
    assert history.tolist() == [[0, 1, 2, 3, 2, 3], [1, 0, -1, -1, -1, -1]]
    seen = {}
    model.t5.encoder.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    enc = model.encode(history)
    assert enc.hidden.shape == (2, 6, 16)  # L tokens per history item
    embedded = seen["inputs_embeds"]  # (2, 6, 16)
    for p in range(6):
        assert torch.equal(embedded[0, p], model.token_embeddings[p % 2].weight[history[0, p]])  # level p % L
    assert torch.equal(embedded[1, :2], torch.stack([model.token_embeddings[0].weight[1],
                                                      model.token_embeddings[1].weight[0]]))
    assert not embedded[1, 2:].any()  # padding
    out = model(history, batch.target_codes)  # the decoder still emits all C levels
    assert out.logits.shape == (2, 3, 4) and torch.isfinite(out.loss_rec)


def test_decoder_inputs_are_bos_then_tied_level_embeddings(model) -> None:
    prefix = torch.tensor([[3, 1]])
    x = model.decoder_inputs(prefix)  # (1, 3, 16)
    assert torch.equal(x[0, 0], model.t5.shared.weight[0])
    assert torch.equal(x[0, 1], model.token_embeddings[0].weight[3])
    assert torch.equal(x[0, 2], model.token_embeddings[1].weight[1])


def test_forward_logits_use_the_level_tables(model) -> None:
    history = torch.tensor([[0, 1, 0, 2, 3, 0], [1, 0, 0, -1, -1, -1]])
    target = torch.tensor([[2, 3, 1], [0, 1, 0]])
    out = model(history, target)
    assert out.logits.shape == (2, 3, 4) and out.dec_hidden.shape == (2, 3, 16)
    for level in range(3):
        assert torch.allclose(out.logits[:, level], model.level_logits(out.dec_hidden[:, level], level), atol=1e-6)
    manual = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 4), target.reshape(-1))
    assert out.loss_rec.item() == pytest.approx(manual.item())


def test_padding_does_not_change_encoder_states_or_latents(model) -> None:
    history = torch.tensor([[0, 1, 0, 2, 3, 0]])
    padded = torch.cat([history, torch.full((1, 6), -1)], dim=1)  # two extra padding items
    enc, enc_pad = model.encode(history), model.encode(padded)
    assert torch.allclose(enc.hidden, enc_pad.hidden[:, :6], atol=1e-5)
    assert torch.allclose(model.sequence_latent(enc), model.sequence_latent(enc_pad), atol=1e-5)
    target = torch.tensor([[2, 3, 1]])
    assert torch.allclose(model(history, target).logits, model(padded, target).logits, atol=1e-5)


def test_cached_decoding_equals_full_decoding(model) -> None:
    history = torch.tensor([[0, 1, 0, 2, 3, 0], [1, 0, 0, -1, -1, -1]])
    prefix = torch.tensor([[2, 3], [0, 1]])
    enc = model.encode(history)
    full = model.decode(enc, prefix).hidden  # (2, 3, 16)
    step = model.decode(enc, prefix[:, :0], use_cache=True)
    states = [step.hidden]
    for t in (1, 2):
        step = model.decode(enc, prefix[:, :t], past_key_values=step.past_key_values, use_cache=True)
        assert step.hidden.shape == (2, 1, 16)
        states.append(step.hidden)
    assert torch.allclose(torch.cat(states, dim=1), full, atol=1e-5)
