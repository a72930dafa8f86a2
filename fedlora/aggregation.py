"""One round's server-side aggregation, for each `lora.aggregation` mode: pure functions over
the sites' contributions (no transport), shared by the ServerApp and the benchmarks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedlora.lora_math import (
    factor_averaging_error,
    factor_names,
    products,
    refactorize,
    refactorize_stacked,
    split_factors,
)
from fedlora.strategies import ServerOptimizer, sum_contributions
from fedlora.strategies.base import SLOT_WEIGHT, WEIGHT, Arrays, LocalWork, Strategy


def site_adapters(strategy: Strategy, global_arrays: Arrays, contributions: list[Arrays]):
    """Each site's local adapter y_i = x + delta_i, recovered from its own contribution."""
    for contribution in contributions:
        delta = strategy.site_delta(contribution)
        yield {k: global_arrays[k] + delta[k] for k in global_arrays}


def factor_error(
    strategy: Strategy, global_arrays: Arrays, frozen: Arrays, contributions: list[Arrays]
) -> tuple[float, float]:
    """Relative gap between the weighted mean of the sites' B_i·A_i and the product of the
    averaged factors (mean, max over modules). `frozen` holds tensors that do not travel (A
    under freeze-a). Needs individual contributions: plaintext aggregation only.

    With mixed ranks a site's y_i holds the global values beyond its rank (its delta is
    zero-padded), so under zero-padding the reference is the exact mean of the sites' updates;
    rank-partitioned contributions carry per-slot weights, and each slot is compared with the
    partitioned mean of the slot products."""
    sites = [frozen | y for y in site_adapters(strategy, global_arrays, contributions)]
    weights = [
        np.asarray(c[SLOT_WEIGHT], float) if SLOT_WEIGHT in c else float(c[WEIGHT][0])
        for c in contributions
    ]
    return factor_averaging_error(sites, weights)


def aggregate_factors(
    strategy: Strategy,
    server_opt: ServerOptimizer,
    global_arrays: Arrays,
    contributions: list[Arrays],
) -> Arrays:
    """`factors` and `freeze-a`: the strategy's server half on the SUM, then the server step."""
    sums = sum_contributions(contributions)
    return aggregate_sums(strategy, server_opt, global_arrays, sums, len(contributions))


def aggregate_sums(
    strategy: Strategy,
    server_opt: ServerOptimizer,
    global_arrays: Arrays,
    sums: Arrays,
    count: int,
) -> Arrays:
    """The server half on sums however they were made (in the clear, masked, noised)."""
    return server_opt.step(global_arrays, strategy.aggregate(sums, count))


def aggregate_svd(
    strategy: Strategy,
    product_opt: ServerOptimizer,
    global_arrays: Arrays,
    contributions: list[Arrays],
    works: list[LocalWork],
    rank: int,
) -> tuple[Arrays, float, float]:
    """`svd`: run the strategy's own two halves on the sites' product updates (exact averaging
    of what the sites trained), take the server step in product space, then re-factorise each
    module to rank r by truncated SVD. Returns the new adapter and the truncation error (mean,
    max over modules).

    A site of rank r_i ran the leading slice of the global factors, which (the factors coming
    from an SVD) is the best rank-r_i approximation of the global product; its update is
    B_i[:, :r_i]·A_i[:r_i] - B[:, :r_i]·A[:r_i]. Without server momentum the new product is a
    weighted sum of low-rank terms and is re-factorised through a QR of the stacked factors
    (`refactorize_stacked`); with momentum or an adaptive server optimiser the state is a dense
    matrix per module."""
    locals_ = list(site_adapters(strategy, global_arrays, contributions))
    if product_opt.is_plain:
        new_global, errors = _svd_stacked(
            strategy, product_opt.lr, global_arrays, locals_, works, rank
        )
    else:
        new_global, errors = _svd_dense(strategy, product_opt, global_arrays, locals_, works, rank)
    return new_global, float(np.mean(errors)), float(np.max(errors))


def linear_weights(strategy: Strategy, works: list[LocalWork]) -> np.ndarray:
    """The coefficients w_i with which the strategy's update is sum_i w_i delta_i (every
    strategy `svd` runs with is linear in the deltas given the sites' work): its two halves run
    on the one-hot deltas e_i."""
    n = len(works)
    one_hot = np.eye(n)
    contributions = [
        strategy.client_contribution({"probe": one_hot[i]}, replace(work, rank=None), {}, {})[0]
        for i, work in enumerate(works)
    ]
    return np.asarray(strategy.aggregate(sum_contributions(contributions), n)["probe"], float)


def _site_rank(work: LocalWork, rank: int) -> int:
    return rank if work.rank is None else work.rank


def _svd_stacked(
    strategy: Strategy,
    lr: float,
    global_arrays: Arrays,
    locals_: list[Arrays],
    works: list[LocalWork],
    rank: int,
) -> tuple[Arrays, list[float]]:
    """P_new = B·A + lr sum_i w_i (B_i[:, :r_i] A_i[:r_i] - B[:, :r_i] A[:r_i]), as the
    stacked factors [B·diag(c), lr w_i B_i[:, :r_i], ...] and [A; A_i[:r_i]; ...], where slot
    j of the global factors keeps the coefficient c_j = 1 - lr sum_{i: r_i > j} w_i."""
    w = linear_weights(strategy, works)
    x = split_factors(global_arrays)
    sites = [split_factors(y) for y in locals_]
    new_global, errors = dict(global_arrays), []
    for module, (a_name, b_name) in factor_names(global_arrays).items():
        a, b = x[module]
        held = [_site_rank(work, rank) for work in works]
        holders = np.array([[r > j for j in range(rank)] for r in held], dtype=float)
        keep = 1.0 - lr * (w @ holders)
        left = [b * keep]
        right = [a]
        for wi, r, site in zip(w, held, sites, strict=True):
            a_i, b_i = site[module]
            left.append(lr * wi * b_i[:, :r])
            right.append(a_i[:r])
        new_a, new_b, error = refactorize_stacked(np.hstack(left), np.vstack(right), rank)
        new_global[a_name], new_global[b_name] = new_a.astype(np.float32), new_b.astype(np.float32)
        errors.append(error)
    return new_global, errors


def _svd_dense(
    strategy: Strategy,
    product_opt: ServerOptimizer,
    global_arrays: Arrays,
    locals_: list[Arrays],
    works: list[LocalWork],
    rank: int,
) -> tuple[Arrays, list[float]]:
    """The same in dense d x k products (needed for a momentum buffer in product space)."""
    x_products = products(global_arrays)
    in_product_space = []
    for local, work in zip(locals_, works, strict=True):
        r = _site_rank(work, rank)
        start = products(global_arrays, r)
        d_product = {m: p - start[m] for m, p in products(local, r).items()}
        plain = replace(work, rank=None)  # products have no rank slots
        in_product_space.append(strategy.client_contribution(d_product, plain, {}, {})[0])
    update = strategy.aggregate(sum_contributions(in_product_space), len(works))
    new_products = product_opt.step(x_products, update)
    new_global, errors = dict(global_arrays), []
    for module, (a_name, b_name) in factor_names(global_arrays).items():
        a, b, error = refactorize(new_products[module], rank)
        new_global[a_name], new_global[b_name] = a.astype(np.float32), b.astype(np.float32)
        errors.append(error)
    return new_global, errors
