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


def test_refactorize_is_the_truncated_svd():
    from fedlora.lora_math import refactorize

    # P = diag(3, 2, 1) rotated; rank 2 keeps 3 and 2: error = 1 / sqrt(9 + 4 + 1)
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q2, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    p = q1 @ np.diag([3.0, 2.0, 1.0]) @ q2.T
    a, b, err = refactorize(p, 2)
    assert a.shape == (2, 3) and b.shape == (3, 2)
    assert math.isclose(err, 1 / math.sqrt(14), rel_tol=1e-9)
    expected = q1[:, :2] @ np.diag([3.0, 2.0]) @ q2[:, :2].T
    np.testing.assert_allclose(b @ a, expected, atol=1e-12)
    # full rank: exact
    a, b, err = refactorize(p, 3)
    np.testing.assert_allclose(b @ a, p, atol=1e-12)
    assert err < 1e-12
