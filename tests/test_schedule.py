import math

import pytest

from peer.schedule import lr_at


def test_warmup_cosine_floor_values():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # first warmup step: lr / warmup
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)  # warmup reaches the peak
    assert lr_at(10, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(5.5e-4)  # half way: the mean of peak and floor
    assert lr_at(35, **kw) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, **kw) == pytest.approx(1e-4)
    assert lr_at(10_000, **kw) == pytest.approx(1e-4)  # floor after the decay


def test_monotone_after_warmup_and_no_warmup():
    values = [lr_at(s, 6e-4, 6e-5, 0, 50) for s in range(60)]
    assert values[0] == pytest.approx(6e-4)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
