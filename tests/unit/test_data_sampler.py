"""EpochBatchSampler: each index once per epoch, seeded order per epoch, exact resume from state_dict."""

import itertools

import pytest

from acestep_ft.data import EpochBatchSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


@pytest.mark.parametrize("n, bs, drop_last", [(10, 3, False), (10, 3, True), (8, 4, False), (5, 7, False)])
def test_every_index_once_per_epoch(n, bs, drop_last):
    s = EpochBatchSampler(n, bs, seed=3, shuffle=True, drop_last=drop_last)
    per_epoch = s.batches_per_epoch
    for epoch in range(3):
        batches = take(s, per_epoch)
        assert s.epoch == epoch
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        if drop_last:
            assert all(len(b) == bs for b in batches) and len(flat) == (n // bs) * bs
        else:
            assert sorted(flat) == list(range(n))


def test_order_differs_per_epoch_and_depends_only_on_seed():
    a = EpochBatchSampler(32, 4, seed=7, shuffle=True)
    b = EpochBatchSampler(32, 4, seed=7, shuffle=True)
    c = EpochBatchSampler(32, 4, seed=8, shuffle=True)
    ea, eb, ec = take(a, 16), take(b, 16), take(c, 16)
    assert ea == eb
    assert ea[:8] != ea[8:]  # epoch 0 vs epoch 1
    assert ea != ec
    assert list(itertools.chain(*take(EpochBatchSampler(6, 4, seed=7, shuffle=False), 2))) == list(range(6))


def test_iterator_protocol_is_infinite_and_matches_next_batch():
    a = EpochBatchSampler(5, 2, seed=1, shuffle=True)
    b = EpochBatchSampler(5, 2, seed=1, shuffle=True)
    assert list(itertools.islice(iter(a), 10)) == take(b, 10)
    assert a.epoch == 3


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 9])
def test_resume_from_state_dict_reproduces_remaining_batches(stop_after):
    full = take(EpochBatchSampler(10, 3, seed=11, shuffle=True), 14)
    first = EpochBatchSampler(10, 3, seed=11, shuffle=True)
    seen = take(first, stop_after)
    state = dict(first.state_dict())
    assert set(state) == {"epoch", "position"}
    resumed = EpochBatchSampler(10, 3, seed=11, shuffle=True)
    resumed.load_state_dict(state)
    assert seen + take(resumed, 14 - stop_after) == full


def test_invalid_arguments_and_states_are_errors():
    with pytest.raises(ValueError, match="drop_last"):
        EpochBatchSampler(3, 4, seed=0, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="num_samples"):
        EpochBatchSampler(0, 4, seed=0, shuffle=True)
    s = EpochBatchSampler(10, 3, seed=0, shuffle=True)
    with pytest.raises(ValueError, match="batch size"):
        s.load_state_dict({"epoch": 0, "position": 9})


@pytest.mark.parametrize("n, world, drop_last", [(10, 3, False), (10, 3, True), (2, 4, False), (12, 4, False)])
def test_ranks_get_disjoint_equal_shards_covering_the_epoch(n, world, drop_last):
    samplers = [EpochBatchSampler(n, 2, seed=5, shuffle=True, drop_last=drop_last, rank=r, world_size=world)
                for r in range(world)]
    counts = {s.batches_per_epoch for s in samplers}
    assert len(counts) == 1  # every process runs the same number of steps
    for _ in range(2):  # two epochs
        shards = [[i for b in take(s, s.batches_per_epoch) for i in b] for s in samplers]
        assert len({len(x) for x in shards}) == 1
        flat = [i for x in shards for i in x]
        if drop_last:
            assert len(flat) == len(set(flat)) == world * samplers[0].batches_per_epoch * 2
        else:
            assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    assert len({s.epoch for s in samplers}) == 1
