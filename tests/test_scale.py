"""The argument checks of issue 14: a ``bootstrap`` count that cannot give an error bar, and a scale
curve over too few points, raise errors that say what is wrong."""
from __future__ import annotations

import pytest
import torch

import gelora


# ---------------------------------------------------------------------------------------------------
# The table, rows 3 and 4
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bootstrap", [-1, 1, 2.5, True])
def test_bad_bootstrap(bootstrap):
    x = torch.randn(50, 3)
    with pytest.raises(ValueError, match="bootstrap must be 0"):
        gelora.twonn(x, bootstrap=bootstrap)


def test_scale_curve_needs_enough_points():
    with pytest.raises(ValueError, match=r"5 distinct point\(s\); a curve needs at least 20"):
        gelora.id_scale_curve(torch.randn(5, 3))
    with pytest.raises(ValueError, match="max_levels"):
        gelora.id_scale_curve(torch.randn(50, 3), max_levels=0)
    c = gelora.id_scale_curve(torch.randn(5, 3), n_min=3)
    assert c.n == [5] and len(c.id) == 1
