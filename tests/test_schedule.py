"""The learning-rate schedule: the reference's steps, scaled; cosine."""

import pytest

from byot.training.train import lr_at


@pytest.mark.parametrize("epoch,expected", [(0, 0.1), (74, 0.1), (75, 0.01), (129, 0.01), (130, 1e-3),
                                            (179, 1e-3), (180, 1e-4), (199, 1e-4)])
def test_reference_steps_at_200_epochs(epoch, expected):
    assert lr_at(epoch, 0.1, 200, "step") == pytest.approx(expected)


def test_steps_scale_with_epochs():
    # 20 epochs: milestones 7.5 -> 8, 13, 18
    lrs = [lr_at(e, 1.0, 20, "step") for e in range(20)]
    assert lrs[:8] == [1.0] * 8 and lrs[8] == pytest.approx(0.1) and lrs[13] == pytest.approx(0.01)
    assert lrs[18] == pytest.approx(1e-3)
    assert lr_at(0, 0.1, 1, "step") == 0.1  # a 1-epoch run starts at the base rate


def test_cosine():
    assert lr_at(0, 0.2, 10, "cosine") == pytest.approx(0.2)
    assert lr_at(5, 0.2, 10, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 0.2, 10, "cosine") < 0.01


def _journal_code_rates(base: float, epochs: int) -> list[float]:
    """The journal code's loop, written out: at the start of epoch e in [E // 3, 2E // 3, E - 10], lr /= 10."""
    lr, rates = base, []
    for epoch in range(epochs):
        if epoch in [epochs // 3, epochs * 2 // 3, epochs - 10]:
            lr /= 10
        rates.append(lr)
    return rates


@pytest.mark.parametrize("epochs", [11, 12, 20, 29, 30, 31, 40, 100, 250])
def test_the_journal_schedule_is_its_code_from_11_epochs_on(epochs):
    want = _journal_code_rates(0.1, epochs)
    assert [lr_at(e, 0.1, epochs, "journal") for e in range(epochs)] == pytest.approx(want)


def test_a_short_journal_schedule_starts_at_the_base_rate_and_divides_once_per_milestone():
    # 10 epochs: the code's E - 10 = 0 would start at 0.01; byot keeps 3 and 6 only
    assert [lr_at(e, 1.0, 10, "journal") for e in range(10)] == pytest.approx([1.0] * 3 + [0.1] * 3 + [0.01] * 4)
    assert lr_at(0, 0.1, 2, "journal") == 0.1
    # warm-up first, then the schedule over the epochs left (250 - 5: milestones 81, 163, 235 after them)
    assert lr_at(0, 0.1, 250, "journal", warmup=5) == pytest.approx(0.1 / 6)
    assert lr_at(5 + 81, 0.1, 250, "journal", warmup=5) == pytest.approx(0.01)
