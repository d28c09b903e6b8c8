"""Length-bucketed training batches: coverage, determinism, sharding, less padding on real WordNet, DDP."""
from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from conftest import needs_wordnet
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from lightning_eff.batch import IndexedBatch
from lightning_eff.data.sampling import (
    LengthBucketSampler,
    example_lengths,
    padded_tokens,
)
from lightning_eff.errors import ConfigError

RNG_LENGTHS = np.random.default_rng(0).integers(1, 60, size=1000).tolist()


def _epoch(sampler: LengthBucketSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return sampler.batches()


# ----------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("n, batch_size, multiplier", [(1000, 32, 4), (1000, 64, 100), (7, 3, 1), (64, 64, 2)])
def test_every_index_exactly_once_per_epoch(n, batch_size, multiplier):
    sampler = LengthBucketSampler(RNG_LENGTHS[:n], batch_size, bucket_size_multiplier=multiplier, seed=3)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert list(sampler) == flat and len(sampler) == n
        assert all(len(b) == batch_size for b in batches[:-1]) and 0 < len(batches[-1]) <= batch_size


def test_dataloader_reforms_the_planned_batches():
    """Only the last batch may be short, so DataLoader(batch_size) cuts the index stream into exactly these batches."""
    sampler = LengthBucketSampler(RNG_LENGTHS, 48, bucket_size_multiplier=5, seed=0)
    loader = DataLoader(range(len(RNG_LENGTHS)), batch_size=48, sampler=sampler, collate_fn=list)
    assert [list(b) for b in loader] == sampler.batches()


def test_batches_are_sorted_buckets_with_less_padding_than_random():
    sampler = LengthBucketSampler(RNG_LENGTHS, 32, bucket_size_multiplier=1000, seed=0)  # one chunk: fully sorted
    batches = sampler.batches()
    lens = np.asarray(RNG_LENGTHS)
    spans = sorted((int(lens[b].min()), int(lens[b].max())) for b in batches)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # disjoint length ranges
    perm = np.random.default_rng(0).permutation(len(lens))
    random = padded_tokens(lens, [perm[i : i + 32] for i in range(0, len(perm), 32)])
    assert padded_tokens(lens, batches) < 0.7 * random
    # a multiplier of 1 sorts within a batch only: about the padding of random batching
    one = LengthBucketSampler(RNG_LENGTHS, 32, bucket_size_multiplier=1, seed=0)
    assert padded_tokens(lens, one.batches()) > 0.9 * random


def test_padded_tokens_hand_computed():
    assert padded_tokens([3, 1, 4, 1, 5], [[0, 1], [2, 3, 4]]) == 2 * 3 + 3 * 5
    assert padded_tokens([2], []) == 0


def test_deterministic_given_seed_and_epoch_and_epochs_differ():
    a = LengthBucketSampler(RNG_LENGTHS, 32, bucket_size_multiplier=4, seed=5)
    b = LengthBucketSampler(RNG_LENGTHS, 32, bucket_size_multiplier=4, seed=5)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)  # set_epoch changes the order...
    assert [sorted(x) for x in _epoch(a, 0)] != [sorted(x) for x in _epoch(a, 1)]  # ...and the batch contents
    c = LengthBucketSampler(RNG_LENGTHS, 32, bucket_size_multiplier=4, seed=6)
    assert _epoch(c, 0) != _epoch(a, 0)


def test_empty_dataset_yields_nothing():
    sampler = LengthBucketSampler([], 8)
    assert list(sampler) == [] and len(sampler) == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[1, -2], batch_size=2), "non-negative integers"),
    (dict(lengths=[1.5, 2.0], batch_size=2), "non-negative integers"),
    (dict(lengths=[1, 2], batch_size=0), "batch_size=0"),
    (dict(lengths=[1, 2], batch_size=2, bucket_size_multiplier=0), "bucket_size_multiplier=0"),
    (dict(lengths=[1, 2], batch_size=2, num_replicas=2, rank=2), "rank=2 must be below num_replicas=2"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LengthBucketSampler(**kwargs)


# ----------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n, world, drop_last", [(1000, 2, False), (998, 3, False), (998, 3, True), (5, 4, False)])
def test_ranks_share_each_global_batch_and_cover_the_data(n, world, drop_last):
    lens = RNG_LENGTHS[:n]
    ranks = [LengthBucketSampler(lens, 16, bucket_size_multiplier=3, seed=1, num_replicas=world, rank=r, drop_last=drop_last)
             for r in range(world)]
    plans = [_epoch(s, 2) for s in ranks]
    assert len({len(s) for s in ranks}) == 1 and len({len(p) for p in plans}) == 1  # same step count on every rank
    counts = Counter(i for p in plans for b in p for i in b)
    total = ranks[0].total_size
    assert sum(counts.values()) == total
    if drop_last:
        assert max(counts.values()) == 1 and len(counts) == total
    else:  # every index, plus total - n repeats of the first ones (DistributedSampler's padding)
        assert set(counts) == set(range(n)) and sum(c - 1 for c in counts.values()) == total - n
    for step in range(len(plans[0])):
        together = [i for p in plans for i in p[step]]
        assert sorted(together) == sorted(ranks[0].global_batches()[step].tolist())


# ----------------------------------------------------------------------------------- datamodule
@needs_wordnet
def test_datamodule_option_train_only_and_index_batches():
    from lightning_eff.data import WordNetSupersenseDataModule

    with pytest.raises(ConfigError, match="data.bucket_by_length='yes'"):
        WordNetSupersenseDataModule(bucket_by_length="yes")
    dm = WordNetSupersenseDataModule(limit_train=300, limit_val=50, limit_test=20, batch_size=32, bucket_by_length=True, seed=4)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, LengthBucketSampler) and train.sampler.seed == 4
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)
    assert isinstance(WordNetSupersenseDataModule(limit_train=300, batch_size=32).train_dataloader().sampler, RandomSampler)
    texts = dm.texts("train")
    batches = list(train)
    assert sorted(t for b in batches for t in b["text"]) == sorted(texts)
    assert example_lengths(dm.datasets["train"]) == [len(t.split()) for t in texts]  # raw: word counts
    dm.return_index = True  # the offline-distillation path keeps working with buckets
    indexed = list(dm.train_dataloader())
    assert isinstance(indexed[0], IndexedBatch)
    assert [b.index.tolist() for b in indexed] == train.sampler.batches()
    assert [b.batch["text"] for b in indexed] == [[texts[i] for i in b.index.tolist()] for b in indexed]


@needs_wordnet
@pytest.mark.parametrize("tokenizer", ["raw", "wordpiece"])
def test_bucketing_cuts_padding_on_wordnet(tokenizer, tmp_path):
    """Real glosses, the datamodule's own loaders: padded positions per epoch drop by > 2x."""
    from lightning_eff.data import WordNetSupersenseDataModule

    kw = dict(tokenizer=tokenizer, vocab_size=2000, limit_train=4000, limit_val=16, limit_test=16, batch_size=64,
              cache_dir=str(tmp_path))
    plain, bucketed = WordNetSupersenseDataModule(**kw), WordNetSupersenseDataModule(**kw, bucket_by_length=True)
    bucketed.setup()
    lens = example_lengths(bucketed.datasets["train"])
    if tokenizer == "wordpiece":
        torch.manual_seed(0)
        random = sum(b["input_ids"].numel() for b in plain.train_dataloader())
        ours = sum(b["input_ids"].numel() for b in bucketed.train_dataloader())
        assert ours == padded_tokens(lens, bucketed.train_dataloader().sampler.batches())
    else:
        perm = np.random.default_rng(0).permutation(len(lens))
        random = padded_tokens(lens, [perm[i : i + 64] for i in range(0, len(perm), 64)])
        ours = padded_tokens(lens, bucketed.train_dataloader().sampler.batches())
    assert ours < 0.5 * random
    assert ours >= sum(lens)


# ----------------------------------------------------------------------------------- DDP
class _RecordBatches(L.LightningModule):
    """Writes each rank's batch indices per epoch; the loss is a zero-valued function of one weight."""

    def __init__(self, folder: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.folder, self.seen = folder, {}

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, IndexedBatch)
        self.seen.setdefault(self.current_epoch, []).append(batch.index.tolist())
        return (self.w * 0.0).sum()

    def on_train_end(self):
        torch.save(self.seen, f"{self.folder}/rank{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.heavy
@needs_wordnet
@pytest.mark.ddp
def test_lightning_ddp_keeps_the_buckets_and_sets_the_epoch(tmp_path):
    """Under 2-process DDP Lightning must not wrap (and re-shuffle) the sampler: each rank sees exactly its planned batches."""
    from lightning_eff.data import WordNetSupersenseDataModule

    torch.set_num_threads(1)
    dm = WordNetSupersenseDataModule(limit_train=200, limit_val=16, limit_test=16, batch_size=16, bucket_by_length=True, seed=2)
    dm.return_index = True
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(_RecordBatches(str(tmp_path)), datamodule=dm)
    dm.setup()
    lens = example_lengths(dm.datasets["train"])
    for rank in range(2):
        seen = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        plan = LengthBucketSampler(lens, 16, seed=2, num_replicas=2, rank=rank)
        for epoch in range(2):
            assert seen[epoch] == _epoch(plan, epoch), (rank, epoch)
