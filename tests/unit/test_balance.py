"""Sampling across ranks: cost-balanced steps, weighted mixtures, and a position that stays exact."""

import numpy as np
import pytest

from zerovl.data.loader import BatchStream
from zerovl.data.plan import EpochPlan, mixture_counts
from zerovl.data.sampler import ResumableBatchSampler, deal_by_cost


def skewed_costs(n, seed=0):
    """Multimodal-like tokens per sample: a quarter text-only, the rest 1, 2 or 4 images of 256 tokens."""
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.5, 0.8, n), 16, 1024).astype(int)
    images = rng.choice([0, 1, 2, 4], size=n, p=[0.25, 0.6, 0.1, 0.05]) * 256
    return np.minimum(text + images, 2048).tolist()


def samplers(n, world, batch, steps, costs, seed=7, balance=True):
    plan = EpochPlan([n], seed=seed, lengths=costs)
    return [ResumableBatchSampler(n, batch, r, world, seed=seed, plan=plan,
                                  balance_steps=steps if balance else 0) for r in range(world)]


def step_loads(ranks, steps, costs):
    """Per optimizer step, each rank's total cost."""
    per_rank = [[sum(costs[i] for i in b) for b in s] for s in ranks]
    micro = len(per_rank[0])
    return np.array([[sum(r[k:k + steps]) for r in per_rank] for k in range(0, micro - micro % steps, steps)])


def test_deal_by_cost_keeps_counts_equal_and_loads_close():
    costs = [900, 20, 30, 400, 410, 25, 380, 15]
    groups = deal_by_cost(list(range(8)), costs, 2)
    assert sorted(len(g) for g in groups) == [4, 4]
    loads = [sum(costs[i] for i in g) for g in groups]
    assert max(loads) / np.mean(loads) < 1.15


def test_balanced_steps_are_within_ten_percent_and_consume_the_same_window():
    n, world, batch, steps = 4096, 8, 4, 2
    costs = skewed_costs(n)
    balanced = [list(s) for s in samplers(n, world, batch, steps, costs)]
    plain = [list(s) for s in samplers(n, world, batch, steps, costs, balance=False)]
    ratio_balanced = (lambda m: m.max(1) / m.mean(1))(step_loads(balanced, steps, costs))
    ratio_plain = (lambda m: m.max(1) / m.mean(1))(step_loads(plain, steps, costs))
    assert ratio_balanced.mean() < 1.10 and np.percentile(ratio_balanced, 95) < 1.10
    assert ratio_plain.mean() > 1.2  # the skew is real
    order = samplers(n, world, batch, steps, costs)[0].epoch_order()
    window = world * batch * steps
    for k in range(0, n // window):  # every optimizer step takes exactly its window of the order
        taken = [i for r in balanced for b in r[k * steps:(k + 1) * steps] for i in b]
        assert sorted(taken) == sorted(order[k * window:(k + 1) * window])


def test_balanced_resume_matches_the_uninterrupted_run_and_survives_a_world_size_change():
    n, batch, steps = 210, 3, 2  # the last window is partial; even n: no wrap-around padding to differ
    costs = skewed_costs(n, 1)
    full = [list(s) for s in samplers(n, 2, batch, steps, costs)]
    done_steps = 5
    consumed = done_steps * steps * batch * 2
    resumed = samplers(n, 2, batch, steps, costs)
    for s in resumed:
        s.set_position(0, consumed)
    assert [list(s) for s in resumed] == [r[done_steps * steps:] for r in full]
    on_three = samplers(n, 3, batch, steps, costs)
    for s in on_three:
        s.set_position(0, consumed)
    before = {i for r in full for b in r[: done_steps * steps] for i in b}
    after = [i for s in on_three for b in s for i in b]
    assert before | set(after) == set(range(n)) and not before & set(after)


def test_stream_keeps_balance_windows_on_step_boundaries_across_epochs():
    """An epoch that ends mid-step: the next epoch's first window is shortened so checkpoints (taken at
    step boundaries) still hold an exact position."""
    n, batch, steps = 10, 1, 4  # 5 micro-batches per epoch on 2 ranks: the 2nd step spans epochs
    costs = skewed_costs(n, 2)

    class Identity(list):
        def __getitem__(self, i):
            return i

    def stream(rank, world=2):
        s = samplers(n, world, batch, steps, costs)[rank]
        return BatchStream(Identity(), s, lambda items: items, micro_batches_per_step=steps)

    a, b = stream(0), stream(1)
    taken = [(a.next(), b.next()) for _ in range(8)]  # 2 optimizer steps
    state = a.state_dict()
    assert state == {"epoch": 1, "consumed": 6}  # step 2 ended 3 micro-steps into epoch 1
    taken += [(a.next(), b.next()) for _ in range(4)]
    epoch1 = a.sampler.plan.units(1)
    assert sorted(i for pair in taken[5:8] for x in pair for i in x) == sorted(epoch1[:6])
    ra, rb = stream(0), stream(1)
    for s in (ra, rb):
        s.load_state_dict(state)
    assert [(ra.next(), rb.next()) for _ in range(4)] == taken[8:12]


def test_mixture_weights_set_the_share_and_rotate_through_small_datasets():
    assert mixture_counts([100, 300], [1, 1]) == [200, 200]
    assert mixture_counts([10, 10, 10], [1, 1, 1]) == [10, 10, 10]
    assert sum(mixture_counts([7, 11, 13], [0.2, 0.5, 0.3])) == 31
    plan = EpochPlan([100, 300], [3, 1], seed=4)
    epoch0, epoch1 = plan.units(0), plan.units(1)
    assert len(epoch0) == 400 and sum(i < 100 for i in epoch0) == 300  # 3:1 of 400
    big0, big1 = {i for i in epoch0 if i >= 100}, {i for i in epoch1 if i >= 100}
    assert len(big0) == 100 and not big0 & big1  # down-weighted: new samples next epoch, none repeated
    small = [i for i in epoch0 if i < 100]
    assert all(small.count(i) == 3 for i in range(100))  # up-weighted: each seen 3 times, evenly
    assert EpochPlan([100, 300], [3, 1], seed=4).units(0) == epoch0


def test_sampler_rejects_empty_and_keeps_legacy_order():
    with pytest.raises(ValueError):
        ResumableBatchSampler(0, 2)
    import torch

    legacy = torch.randperm(21, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    s = ResumableBatchSampler(21, 4, seed=3)
    s.set_position(1)
    assert s.epoch_order() == legacy  # single-dataset runs keep the order older checkpoints assumed
