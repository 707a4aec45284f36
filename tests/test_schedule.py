"""The learning-rate schedule: the reference's steps, scaled; cosine."""

import pytest

from byot.engine.train import lr_at


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
