"""LeNet-5 on scikit-learn's digits: seeded, quick, and at least 97% held out."""

from __future__ import annotations

import numpy as np
import pytest

from export.train_lenet import digits_32, split, train


def test_digits_are_upsampled_to_32x32() -> None:
    x, y = digits_32()
    assert x.shape == (1797, 1, 32, 32) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) == set(range(10))
    xtr, xte, ytr, yte = split()
    assert len(xte) == 360 and len(xtr) == 1437


@pytest.mark.slow
def test_training_is_seeded() -> None:
    """Two short runs give the same weights (the full run's >= 97% is checked on the built card)."""
    m1, acc1, _, _ = train(epochs=3)
    m2, acc2, _, _ = train(epochs=3)
    assert acc1 == acc2
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    assert acc1 > 0.5  # three epochs already learn most digits
