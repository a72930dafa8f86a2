"""Factor-averaging error on small matrices computed by hand."""

from __future__ import annotations

import math

import numpy as np

from fedlora.lora_math import factor_averaging_error, split_factors

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"


def adapter(a, b):
    return {A: np.array(a, dtype=float), B: np.array(b, dtype=float)}


def test_split_factors_groups_by_module():
    parts = split_factors(adapter([[1, 0]], [[1], [0]]) | {"x.lora_A.default.weight": np.ones(1)})
    assert set(parts) == {"m"}  # a module without its B is not a pair
    np.testing.assert_array_equal(parts["m"][0], [[1, 0]])


def test_factor_averaging_has_the_hand_computed_gap():
    # B1 A1 = [[1,0],[0,0]], B2 A2 = [[0,0],[0,1]]; equal weights:
    # mean(BA) = diag(.5,.5) (norm sqrt(.5)); mean(B) mean(A) = all .25;
    # gap = [[.25,-.25],[-.25,.25]] (norm .5) -> relative error .5 / sqrt(.5) = 0.70711
    sites = [adapter([[1, 0]], [[1], [0]]), adapter([[0, 1]], [[0], [1]])]
    mean, worst = factor_averaging_error(sites, [10, 10])
    assert math.isclose(mean, 1 / math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(worst, mean)


def test_shared_a_is_exact_whatever_the_weights():
    sites = [adapter([[1, 2]], [[1], [0]]), adapter([[1, 2]], [[3], [1]])]
    mean, worst = factor_averaging_error(sites, [1, 3])
    assert worst < 1e-15 and mean < 1e-15
