"""LengthBucketSampler (and its unbucketed alias EpochBatchSampler): each index once per epoch, seeded order per
epoch, length buckets, frame budget, worst case first, rank dealing, exact resume, refusal of another setup."""

import itertools
import random

import pytest

from acestep_ft.data import EpochBatchSampler
from acestep_ft.data.sampler import LengthBucketSampler


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def flat(batches):
    return [i for b in batches for i in b]


def clip_lengths(n, lo_s=10, hi_s=240, seed=0):
    """Latent lengths (25 frames/s) of n clips uniformly between lo_s and hi_s seconds."""
    rng = random.Random(seed)
    return [rng.randint(lo_s * 25, hi_s * 25) for _ in range(n)]


LENGTHS = clip_lengths(300)
SETUPS = {  # name -> LengthBucketSampler kwargs (besides lengths / seed / shuffle)
    "plain": dict(batch_size=4, bucket_frames=0),
    "buckets": dict(batch_size=4, bucket_frames=250),
    "budget": dict(batch_size=8, bucket_frames=0, max_frames_per_batch=20_000),
    "buckets+budget": dict(batch_size=8, bucket_frames=250, max_frames_per_batch=20_000),
    "buckets+budget+worst": dict(batch_size=8, bucket_frames=250, max_frames_per_batch=20_000, worst_case_first=True),
}


# ---------------------------------------------------------------- the unbucketed path (former EpochBatchSampler)
@pytest.mark.parametrize("n, bs, drop_last", [(10, 3, False), (10, 3, True), (8, 4, False), (5, 7, False)])
def test_every_index_once_per_epoch(n, bs, drop_last):
    s = EpochBatchSampler(n, bs, seed=3, shuffle=True, drop_last=drop_last)
    per_epoch = s.batches_per_epoch
    for epoch in range(3):
        batches = take(s, per_epoch)
        assert s.epoch == epoch
        f = flat(batches)
        assert len(f) == len(set(f))
        if drop_last:
            assert all(len(b) == bs for b in batches) and len(f) == (n // bs) * bs
        else:
            assert sorted(f) == list(range(n))


def test_order_differs_per_epoch_and_depends_only_on_seed():
    a = EpochBatchSampler(32, 4, seed=7, shuffle=True)
    b = EpochBatchSampler(32, 4, seed=7, shuffle=True)
    c = EpochBatchSampler(32, 4, seed=8, shuffle=True)
    ea, eb, ec = take(a, 16), take(b, 16), take(c, 16)
    assert ea == eb
    assert ea[:8] != ea[8:]  # epoch 0 vs epoch 1
    assert ea != ec
    assert list(itertools.chain(*take(EpochBatchSampler(6, 4, seed=7, shuffle=False), 2))) == list(range(6))


def test_alias_equals_unbucketed_length_sampler_and_their_states_interchange():
    old = EpochBatchSampler(30, 4, seed=5, shuffle=True)
    new = LengthBucketSampler(LENGTHS[:30], 4, seed=5, shuffle=True, bucket_frames=0)
    assert take(old, 20) == take(new, 20)
    fresh = LengthBucketSampler(LENGTHS[:30], 4, seed=5, shuffle=True, bucket_frames=0)
    fresh.load_state_dict(old.state_dict())
    assert take(fresh, 5) == take(old, 5)


def test_iterator_protocol_is_infinite_and_matches_next_batch():
    a = EpochBatchSampler(5, 2, seed=1, shuffle=True)
    b = EpochBatchSampler(5, 2, seed=1, shuffle=True)
    assert list(itertools.islice(iter(a), 10)) == take(b, 10)
    assert a.epoch == 3


def test_invalid_arguments_and_states_are_errors():
    with pytest.raises(ValueError, match="drop_last"):
        EpochBatchSampler(3, 4, seed=0, shuffle=True, drop_last=True)
    with pytest.raises(ValueError, match="num_samples"):
        EpochBatchSampler(0, 4, seed=0, shuffle=True)
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler([5, 6], 1, seed=0, shuffle=True, rank=2, world_size=2)
    s = EpochBatchSampler(10, 3, seed=0, shuffle=True)
    with pytest.raises(ValueError, match="batch size"):
        s.load_state_dict({"epoch": 0, "position": 9})
    with pytest.raises(ValueError, match="missing"):
        s.load_state_dict({"epoch": 0})


# ---------------------------------------------------------------- every setup
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_index_once_per_epoch_single_rank(setup, drop_last):
    s = LengthBucketSampler(LENGTHS, seed=1, shuffle=True, drop_last=drop_last, **SETUPS[setup])
    for epoch in range(3):
        batches = take(s, s.batches_per_epoch)
        assert s.epoch == epoch and len(batches) == s.batches_per_epoch
        f = flat(batches)
        assert len(f) == len(set(f))
        if not drop_last:
            assert sorted(f) == list(range(len(LENGTHS)))
        else:  # only the short last batch of each bucket is dropped
            assert len(LENGTHS) - len(f) < s.num_buckets * s.batch_size


@pytest.mark.parametrize("setup", SETUPS)
def test_batches_are_a_function_of_seed_and_epoch(setup):
    kw = SETUPS[setup]
    a = LengthBucketSampler(LENGTHS, seed=3, shuffle=True, **kw)
    b = LengthBucketSampler(LENGTHS, seed=3, shuffle=True, **kw)
    c = LengthBucketSampler(LENGTHS, seed=4, shuffle=True, **kw)
    n = a.batches_per_epoch
    ea, eb = take(a, 3 * n), take(b, 3 * n)
    assert ea == eb
    assert ea[:n] == a.epoch_batches(0) and ea[2 * n :] == a.epoch_batches(2)
    assert ea[:n] != ea[n : 2 * n] != ea[2 * n :]
    assert ea[:n] != take(c, n)
    # batch composition changes too, not only the order
    assert sorted(map(sorted, ea[:n])) != sorted(map(sorted, ea[n : 2 * n]))


def test_buckets_hold_one_length_range_and_batch_order_is_mixed():
    bf = 250
    s = LengthBucketSampler(LENGTHS, 4, seed=0, shuffle=True, bucket_frames=bf)
    batches = s.epoch_batches(0)
    keys = [{LENGTHS[i] // bf for i in b} for b in batches]
    assert all(len(k) == 1 for k in keys)
    order = [k.pop() for k in keys]
    assert order != sorted(order) and order != sorted(order, reverse=True)
    # not short -> long: the first half of the epoch has long and short buckets alike
    half = order[: len(order) // 2]
    assert min(half) <= 3 and max(half) >= 20
    # shuffle=False: buckets in ascending order, indices in ascending order inside each
    ordered = LengthBucketSampler(LENGTHS, 4, seed=0, shuffle=False, bucket_frames=bf).epoch_batches(0)
    ordered_keys = [LENGTHS[b[0]] // bf for b in ordered]
    assert ordered_keys == sorted(ordered_keys) and all(b == sorted(b) for b in ordered)


@pytest.mark.parametrize("bucket_frames", [0, 250])
def test_frame_budget_is_respected_except_single_oversize_clips(bucket_frames):
    budget = 12_000
    lengths = LENGTHS + [15_000, 13_000]  # two clips longer than the budget alone
    s = LengthBucketSampler(lengths, 16, seed=2, shuffle=True, bucket_frames=bucket_frames,
                            max_frames_per_batch=budget)
    assert sorted(s.oversize_indices) == [len(LENGTHS), len(LENGTHS) + 1]
    for epoch in range(2):
        batches = s.epoch_batches(epoch)
        assert sorted(flat(batches)) == list(range(len(lengths)))  # oversize clips are still trained
        for b in batches:
            padded = len(b) * max(lengths[i] for i in b)
            assert len(b) <= 16
            assert padded <= budget or (len(b) == 1 and b[0] in s.oversize_indices)
    assert s.padding_stats()["oversize_samples"] == 2
    # short clips make bigger batches under the same budget
    short = LengthBucketSampler([300] * 64, 16, seed=0, shuffle=True, max_frames_per_batch=budget)
    assert {len(b) for b in short.epoch_batches(0)} == {16}
    assert LengthBucketSampler([6000] * 8, 16, seed=0, shuffle=True, max_frames_per_batch=budget).batches_per_epoch == 4


def test_bucketing_cuts_padding_on_a_wide_length_distribution():
    """10-240 s clips, batch 4: random batches pad ~36% of their frames; 10 s buckets ~2% (measured 2.3%)."""
    lengths = clip_lengths(2000, seed=1)
    naive = LengthBucketSampler(lengths, 4, seed=0, shuffle=True, bucket_frames=0).padding_stats()
    bucketed = LengthBucketSampler(lengths, 4, seed=0, shuffle=True, bucket_frames=250).padding_stats()
    assert naive["pad_fraction"] == pytest.approx(naive["naive_pad_fraction"])  # unbucketed == the baseline
    assert naive["naive_pad_fraction"] > 0.30
    assert bucketed["pad_fraction"] < 0.035
    assert bucketed["real_frames"] == sum(lengths) and bucketed["samples"] == len(lengths)
    fine = LengthBucketSampler(lengths, 4, seed=0, shuffle=True, bucket_frames=125).padding_stats()
    assert fine["pad_fraction"] < bucketed["pad_fraction"]
    budgeted = LengthBucketSampler(lengths, 8, seed=0, shuffle=True, bucket_frames=250,
                                   max_frames_per_batch=24_000).padding_stats()
    assert budgeted["pad_fraction"] < 0.04 and budgeted["max_batch_frames"] <= 24_000


@pytest.mark.parametrize("world_size", [1, 3])
def test_worst_case_first_in_epoch_zero_only(world_size):
    kw = dict(batch_size=8, bucket_frames=250, max_frames_per_batch=30_000, world_size=world_size)
    ranks = [LengthBucketSampler(LENGTHS, seed=6, shuffle=True, worst_case_first=True, rank=r, **kw)
             for r in range(world_size)]
    plain = LengthBucketSampler(LENGTHS, seed=6, shuffle=True, **kw)
    padded = lambda b: len(b) * max(LENGTHS[i] for i in b)  # noqa: E731
    worst = max(padded(b) for b in plain.global_batches(0))
    firsts = [s.next_batch() for s in ranks]
    assert padded(firsts[0]) == worst
    top = sorted((padded(b) for b in plain.global_batches(0)), reverse=True)[:world_size]
    assert [padded(b) for b in firsts] == top  # every process starts with one of the worst
    assert padded(plain.global_batches(0)[0]) < worst  # not there by chance
    assert sorted(map(sorted, ranks[0].global_batches(0))) == sorted(map(sorted, plain.global_batches(0)))
    assert ranks[0].global_batches(1) == plain.global_batches(1)


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stop_after", [0, 1, 7, "end", "end+1"])
def test_resume_mid_epoch_and_across_the_epoch_boundary(setup, stop_after):
    make = lambda: LengthBucketSampler(LENGTHS, seed=11, shuffle=True, **SETUPS[setup])  # noqa: E731
    n = make().batches_per_epoch
    stop = {"end": n, "end+1": n + 1}.get(stop_after, stop_after)
    total = 2 * n + 3
    full = take(make(), total)
    first = make()
    seen = take(first, stop)
    state = dict(first.state_dict())
    assert {"epoch", "position", "signature"} <= set(state)
    resumed = make()
    resumed.load_state_dict(state)
    assert seen + take(resumed, total - stop) == full
    assert resumed.epoch == 2


def test_a_state_of_another_batch_setup_is_refused_naming_what_differs():
    s = LengthBucketSampler(LENGTHS, 4, seed=0, shuffle=True, bucket_frames=250)
    take(s, 3)
    state = s.state_dict()
    cases = {
        "batch_size": dict(batch_size=8, bucket_frames=250),
        "bucket_frames": dict(batch_size=4, bucket_frames=500),
        "max_frames_per_batch": dict(batch_size=4, bucket_frames=250, max_frames_per_batch=20_000),
        "world_size": dict(batch_size=4, bucket_frames=250, world_size=2),
        "seed": dict(batch_size=4, bucket_frames=250, seed=1),
    }
    for what, kw in cases.items():
        kw = {"seed": 0, **kw}
        other = LengthBucketSampler(LENGTHS, shuffle=True, **kw)
        with pytest.raises(ValueError, match=what):
            other.load_state_dict(state)
    cropped = LengthBucketSampler([min(t, 3000) for t in LENGTHS], 4, seed=0, shuffle=True, bucket_frames=250)
    with pytest.raises(ValueError, match="lengths_hash"):
        cropped.load_state_dict(state)
    fewer = LengthBucketSampler(LENGTHS[:-1], 4, seed=0, shuffle=True, bucket_frames=250)
    with pytest.raises(ValueError, match="num_samples"):
        fewer.load_state_dict(state)
    # a state without signature (older checkpoints) still loads when its position fits
    same = LengthBucketSampler(LENGTHS, 4, seed=0, shuffle=True, bucket_frames=250)
    same.load_state_dict({"epoch": 0, "position": 3})
    assert same.next_batch() == s.next_batch()


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("world_size, n", [(2, 300), (3, 300), (4, 37), (8, 5)])
def test_ranks_get_disjoint_batches_and_equal_counts(setup, world_size, n):
    lengths = LENGTHS[:n]
    ranks = [LengthBucketSampler(lengths, seed=5, shuffle=True, rank=r, world_size=world_size, **SETUPS[setup])
             for r in range(world_size)]
    assert len({s.batches_per_epoch for s in ranks}) == 1  # every process runs the same number of steps
    g = ranks[0].num_global_batches
    repeats = ranks[0].batches_per_epoch * world_size - g
    assert 0 <= repeats and (repeats < world_size or g < world_size)
    for epoch in range(2):
        per_rank = [take(s, s.batches_per_epoch) for s in ranks]
        glob = ranks[0].global_batches(epoch)
        assert all(s.global_batches(epoch) == glob for s in ranks)  # same global list everywhere
        dealt = [b for step in zip(*per_rank) for b in step]  # global order: step-major, rank-minor
        assert dealt[:g] == glob[: len(dealt)]
        assert dealt[g:] == (glob * world_size)[: len(dealt) - g]  # the wrap repeats batches from the start
        originals = flat(dealt[:g])
        assert sorted(originals) == list(range(n))  # disjoint apart from the repeats, and complete
    assert len({s.epoch for s in ranks}) == 1


@pytest.mark.parametrize("setup", ["plain", "buckets+budget"])
def test_ranks_with_drop_last_are_disjoint(setup):
    world = 3
    ranks = [LengthBucketSampler(LENGTHS, seed=5, shuffle=True, rank=r, world_size=world, drop_last=True,
                                 **SETUPS[setup]) for r in range(world)]
    per_rank = [flat(s.epoch_batches(0)) for s in ranks]
    everything = [i for x in per_rank for i in x]
    assert len(everything) == len(set(everything))
    assert ranks[0].batches_per_epoch == ranks[0].num_global_batches // world


def test_padding_stats_fields_and_per_rank_scope():
    s = LengthBucketSampler(LENGTHS, 4, seed=0, shuffle=True, bucket_frames=250, rank=1, world_size=2)
    st = s.padding_stats(epoch=1)
    mine = s.epoch_batches(1)
    assert st["batches"] == len(mine) == s.batches_per_epoch
    assert st["real_frames"] == sum(LENGTHS[i] for i in flat(mine))
    assert st["padded_frames"] >= st["real_frames"]
    assert st["pad_fraction"] == pytest.approx(1 - st["real_frames"] / st["padded_frames"])
    assert st["naive_real_frames"] == sum(LENGTHS) and st["naive_batches"] == 75
    assert 0 <= st["pad_fraction"] < st["naive_pad_fraction"] < 1
