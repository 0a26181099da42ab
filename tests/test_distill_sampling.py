"""The labelled share of the students' crops: constant, or moving over the run (distill.labelled_fraction_end)."""
import pytest
import torch

from distill.sampling import LabelledShareSampler, SamplingError
from training.batches import crop_batches


def _draws(sampler, step, n, seed=0):
    return sampler.draw(torch.Generator().manual_seed(seed), step, n)


def test_the_share_moves_linearly_from_start_to_end_and_stays_there():
    s = LabelledShareSampler(8, 32, start=0.5, end=1.0, steps=400)
    assert [s.share(t) for t in (0, 100, 200, 400, 900)] == [0.5, 0.625, 0.75, 1.0, 1.0]


def test_draws_follow_the_share_of_the_step_they_are_drawn_for():
    s = LabelledShareSampler(8, 32, start=0.5, end=1.0, steps=400)
    first = _draws(s, 0, 4000)
    share0 = sum(i < 8 for i in first) / len(first)
    assert 0.47 < share0 < 0.53, share0  # binomial sd 0.008
    assert set(first) == set(range(40))  # every case drawn, within its group uniformly
    assert all(i < 8 for i in _draws(s, 400, 500))  # end = 1: labelled cases only
    mid = _draws(s, 200, 4000)
    assert 0.72 < sum(i < 8 for i in mid) / len(mid) < 0.78


def test_draws_depend_on_the_generator_alone_not_on_torch_global_rng():
    s = LabelledShareSampler(2, 5, 0.5, 0.9, 10)
    torch.manual_seed(1)
    a = _draws(s, 3, 50, seed=3)
    torch.manual_seed(2)
    assert _draws(s, 3, 50, seed=3) == a
    assert _draws(s, 3, 50, seed=4) != a


@pytest.mark.parametrize("start,end,match", [(0.0, 1.0, "labelled_fraction must"), (1.0, 1.0, "labelled_fraction must"),
                                             (0.5, 1.5, "labelled_fraction_end must"), (0.5, 0.0, "labelled_fraction_end")])
def test_bad_shares_are_refused_by_name(start, end, match):
    with pytest.raises(SamplingError, match=match):
        LabelledShareSampler(8, 32, start, end, 400)


def test_a_moving_share_needs_both_groups():
    with pytest.raises(SamplingError, match="8 \\+ 0"):
        LabelledShareSampler(8, 0, 0.5, 1.0, 400)


def test_crop_batches_draws_through_the_sampler_at_each_batch_step_and_refuses_weights_beside_it():
    data = [{"x": torch.tensor([float(i)])} for i in range(6)]
    sampler = LabelledShareSampler(2, 4, start=0.5, end=1.0, steps=10)
    stream = crop_batches(data, batch_size=2, sampler=sampler).start(seed=0, step=10)  # share 1 from step 10
    seen = torch.cat([next(stream)["x"] for _ in range(20)])
    assert set(seen.flatten().tolist()) <= {0.0, 1.0}
    early = crop_batches(data, batch_size=2, sampler=sampler).start(seed=0, step=0)
    assert set(torch.cat([next(early)["x"] for _ in range(20)]).flatten().tolist()) & {2.0, 3.0, 4.0, 5.0}
    with pytest.raises(ValueError, match="weights or a sampler"):
        crop_batches(data, 2, weights=[1.0] * 6, sampler=sampler)
