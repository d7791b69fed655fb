import math

import pytest

from zerovl.engine.schedule import lr_factor, set_lr


def test_linear_warmup_then_cosine_to_min():
    total, warm, floor = 100, 10, 0.1
    factors = [lr_factor(s, total, warm, "cosine", floor) for s in range(total)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warmup
    mid = 10 + (total - warm - 1) / 2
    assert lr_factor(int(mid), total, warm, "cosine", floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / (total - warm - 1))))


def test_linear_and_constant():
    assert lr_factor(0, 11, 0, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(5, 11, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 11, 0, "linear", 0.0) == pytest.approx(0.0)
    assert lr_factor(3, 11, 2, "constant", 0.0) == 1.0
    assert lr_factor(0, 11, 2, "constant", 0.0) == 0.5


def test_schedule_is_a_pure_function_of_the_step():
    # a resumed run recomputes exactly the same LR
    assert [lr_factor(s, 50, 5, "cosine", 0.01) for s in range(50)] == \
           [lr_factor(s, 50, 5, "cosine", 0.01) for s in range(50)]


def test_set_lr_scales_each_group_base_lr():
    class Opt:
        param_groups = [{"lr": 0.0, "base_lr": 1e-3}, {"lr": 0.0, "base_lr": 1e-4}]

    opt = Opt()
    assert set_lr(opt, 0.5) == pytest.approx(5e-4)
    assert opt.param_groups[1]["lr"] == pytest.approx(5e-5)
