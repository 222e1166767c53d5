"""Checks shared by the streaming tests (h5ad, ARCHS4 and parquet sources)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from bulkfm.train.data import MaskedTokenDataset, StepBatchSampler, collate


def assert_two_ranks_match_in_memory(got: Any, ref: Any) -> None:
    """Streamed data ``got`` on 2 ranks x 2 loader workers yields the in-memory batches
    of ``ref`` (no workers), and the two ranks split one epoch disjointly."""
    epoch = ref.n_train - ref.n_train % 4  # whole steps of 2 ranks x micro batch 2
    keys: list[tuple[int, int]] = []
    for rank in (0, 1):

        def batches(data: Any, workers: int, rank: int = rank) -> list[dict[str, torch.Tensor]]:
            dataset = MaskedTokenDataset(
                data.tokens, data.train_idx, n_bins=64, mask_token_id=64, seed=1
            )
            sampler = StepBatchSampler(
                data.n_train, seed=1, micro_batch_size=2, world_size=2, rank=rank,
                stop_sample=epoch,
            )  # fmt: skip
            loader = DataLoader(
                dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers
            )
            return list(loader)

        streamed, in_memory = batches(got, workers=2), batches(ref, workers=0)
        assert len(streamed) == len(in_memory) == epoch // 4
        for a, b in zip(streamed, in_memory, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
            assert torch.equal(a["labels"], b["labels"])
        sampler = StepBatchSampler(
            got.n_train, seed=1, micro_batch_size=2, world_size=2, rank=rank, stop_sample=epoch
        )
        keys += [k for batch in sampler for k in batch]
    # the two ranks split one epoch disjointly: every sample of it once
    assert len(keys) == len(set(keys)) == epoch
    assert {e for e, _ in keys} == {0}
