"""LongShortCollator: the l_extra sequence is the same on every rank whatever its examples; the window offsets
cover every position an example allows."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

pytest.importorskip("transformers")
from lsa_kernels.integrations.trainer import LongShortCollator  # noqa: E402


def test_every_rank_draws_the_same_l_extra_whatever_its_example_lengths():
    """Two ranks (two collators with one seed) whose examples differ in length — rank 0 long documents (a random
    offset is drawn per example), rank 1 examples of exactly max_length (one short of a random draw for the
    longest windows), with a smaller last batch — draw the same l_extra at every step."""
    l_train, steps = 16, 60
    rank0, rank1 = LongShortCollator(l_train, seed=42), LongShortCollator(l_train, seed=42)
    assert rank1.max_length == 25
    seq0, seq1 = [], []
    for step in range(steps):
        seq0.append(rank0([torch.arange(200), torch.arange(300, 500)])["l_extra"])
        batch1 = [torch.arange(25)] * (1 if step == steps - 1 else 2)
        seq1.append(rank1(batch1)["l_extra"])
    assert seq0 == seq1
    assert len(set(seq0)) > 4  # and it is a real draw, not a constant


def test_l_extra_sequence_is_the_seeds_and_steps_per_draw_holds_it():
    """The sequence depends only on the seed (not on random_offset or the examples), and steps_per_draw
    repeats each draw that many calls."""
    a = LongShortCollator(8, seed=7, steps_per_draw=3)
    b = LongShortCollator(8, seed=7, steps_per_draw=3, random_offset=False)
    sa = [a([torch.arange(50)])["l_extra"] for _ in range(12)]
    sb = [b([torch.arange(13)])["l_extra"] for _ in range(12)]
    assert sa == sb
    assert all(sa[i] == sa[i - i % 3] for i in range(12))
    assert sa != [LongShortCollator(8, seed=8, steps_per_draw=3)([torch.arange(13)])["l_extra"] for _ in range(12)]


def test_window_offsets_cover_every_start_including_the_last():
    """An example one token longer than the window has two windows (offsets 0 and 1): both are drawn, and so
    is every offset of a longer example; each window is the example's contiguous slice."""
    c = LongShortCollator(4, seed=0)  # l_extra in {1, 2}: windows of 6 or 7 tokens, max_length 7
    ex = torch.arange(100, 107)
    longer = torch.arange(200, 212)
    starts = defaultdict(set)
    for _ in range(200):
        out = c([ex, longer])
        L = out["input_ids"].shape[1]
        s0 = int(out["input_ids"][0, 0]) - 100
        s1 = int(out["input_ids"][1, 0]) - 200
        assert torch.equal(out["input_ids"][0], ex[s0: s0 + L])
        assert torch.equal(out["input_ids"][1], longer[s1: s1 + L])
        starts[("ex", L)].add(s0)
        starts[("longer", L)].add(s1)
    assert starts[("ex", 6)] == {0, 1}
    assert starts[("ex", 7)] == {0}
    assert starts[("longer", 6)] == set(range(12 - 6 + 1))
    assert starts[("longer", 7)] == set(range(12 - 7 + 1))


def test_random_offset_false_takes_each_examples_start():
    c = LongShortCollator(4, seed=0, random_offset=False)
    out = c([torch.arange(10, 30), torch.arange(50, 60)])
    L = out["input_ids"].shape[1]
    assert torch.equal(out["input_ids"], torch.stack([torch.arange(10, 10 + L), torch.arange(50, 50 + L)]))


def test_smallest_l_train_is_two():
    """l_train = 2 (the smallest with a short view: l_extra is always 1, windows of 4 tokens); 1 is refused."""
    c = LongShortCollator(2, seed=1)
    assert c.max_length == 4
    for _ in range(3):
        out = c([torch.arange(4), torch.arange(10, 20)])
        assert out["l_extra"] == 1 and out["input_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="l_train: expected an int >= 2, got 1"):
        LongShortCollator(1)
