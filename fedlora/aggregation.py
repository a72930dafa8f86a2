"""One round's server-side aggregation, for each `lora.aggregation` mode: pure functions over
the sites' contributions (no transport), shared by the ServerApp and the benchmarks."""

from __future__ import annotations

import numpy as np

from fedlora.lora_math import factor_averaging_error, factor_names, products, refactorize
from fedlora.strategies import ServerOptimizer, sum_contributions
from fedlora.strategies.base import WEIGHT, Arrays, LocalWork, Strategy


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
    under freeze-a). Needs individual contributions: plaintext aggregation only."""
    sites = [frozen | y for y in site_adapters(strategy, global_arrays, contributions)]
    weights = [float(c[WEIGHT][0]) for c in contributions]
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
    """`svd`: run the strategy's own two halves on the sites' product updates B_i·A_i - B·A
    (exact averaging of what the sites trained), take the server step in product space, then
    re-factorise each module to rank r by truncated SVD. Returns the new adapter and the
    truncation error (mean, max over modules)."""
    x_products = products(global_arrays)
    in_product_space = []
    for local, work in zip(
        site_adapters(strategy, global_arrays, contributions), works, strict=True
    ):
        d_product = {m: p - x_products[m] for m, p in products(local).items()}
        in_product_space.append(strategy.client_contribution(d_product, work, {}, {})[0])
    update = strategy.aggregate(sum_contributions(in_product_space), len(works))
    new_products = product_opt.step(x_products, update)
    new_global, errors = dict(global_arrays), []
    for module, (a_name, b_name) in factor_names(global_arrays).items():
        a, b, error = refactorize(new_products[module], rank)
        new_global[a_name], new_global[b_name] = a.astype(np.float32), b.astype(np.float32)
        errors.append(error)
    return new_global, float(np.mean(errors)), float(np.max(errors))
