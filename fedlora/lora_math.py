"""LoRA factor arithmetic the server needs: grouping tensors by module and measuring how far
averaging A and B separately lands from averaging the sites' updates B_i·A_i.

Averaging factors gives mean(B_i)·mean(A_i), which is not mean(B_i·A_i): the gap grows with
heterogeneity. fedlora reports it every round instead of assuming it away.
"""

from __future__ import annotations

import numpy as np

Arrays = dict[str, np.ndarray]


def split_factors(adapter: Arrays) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module prefix -> (A, B) from peft tensor names (`...lora_A.default.weight`)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in adapter.items():
        for factor in ("lora_A", "lora_B"):
            marker = f".{factor}."
            if marker in name:
                modules.setdefault(name.split(marker)[0], {})[factor] = np.asarray(value, float)
    return {m: (f["lora_A"], f["lora_B"]) for m, f in modules.items() if len(f) == 2}


def factor_averaging_error(
    site_adapters: list[Arrays], weights: list[float] | list[np.ndarray]
) -> tuple[float, float]:
    """Relative error ||sum p_i B_i A_i - (sum p_i B_i)(sum p_i A_i)||_F / ||sum p_i B_i A_i||_F
    per module, p_i = n_i / sum n (the data-size weights every strategy uses); returns the mean
    and the max over modules. Exactly 0 when every site shares A (`lora.aggregation = freeze-a`).

    A weight may be a vector of one weight per rank slot (rank-partitioned averaging): then
    p_ij = w_ij / sum_i w_ij per slot j, and since B·A = sum_j B[:, j] A[j, :] the reference is
    sum_j sum_i p_ij B_i[:, j] A_i[j, :] against sum_j (sum_i p_ij B_i[:, j])(sum_i p_ij A_i[j, :]):
    the gap that averaging factors adds to what partitioned averaging of products would give."""
    per_site = [split_factors(a) for a in site_adapters]
    errors = []
    for module in per_site[0]:
        rank = per_site[0][module][0].shape[0]
        w = np.array([np.broadcast_to(np.asarray(wi, float), (rank,)) for wi in weights])
        total = w.sum(axis=0)
        p = np.divide(w, total, out=np.zeros_like(w), where=total > 0)  # sites x slots
        mean_product = sum(
            (s[module][1] * pi) @ s[module][0] for pi, s in zip(p, per_site, strict=True)
        )
        mean_a = sum(pi[:, None] * s[module][0] for pi, s in zip(p, per_site, strict=True))
        mean_b = sum(s[module][1] * pi for pi, s in zip(p, per_site, strict=True))
        norm = np.linalg.norm(mean_product)
        gap = np.linalg.norm(mean_product - mean_b @ mean_a)
        errors.append(float(gap / norm) if norm > 0 else 0.0)
    if not errors:
        return 0.0, 0.0
    return float(np.mean(errors)), float(np.max(errors))


def products(adapter: Arrays, rank: int | None = None) -> Arrays:
    """module -> B·A (the update LoRA adds to the frozen weight, before the alpha/r scale); with
    `rank`, of the leading slice B[:, :rank]·A[:rank] (what a site of that rank runs)."""
    return {m: b[:, :rank] @ a[:rank] for m, (a, b) in split_factors(adapter).items()}


def _best_factors(
    u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Rank-r factors from an SVD: B = U_r S_r^1/2, A = S_r^1/2 V_r^T, zero-padded to rank r;
    and the relative truncation error sqrt(sum of the dropped s^2 / sum of all s^2)."""
    root = np.sqrt(s[:rank])
    b = u[:, :rank] * root
    a = root[:, None] * vt[:rank]
    total = float(np.sqrt(np.sum(s**2)))
    error = float(np.sqrt(np.sum(s[rank:] ** 2)) / total) if total > 0 else 0.0
    if a.shape[0] < rank:  # a product of lower rank than r: pad with zero factors
        a = np.vstack([a, np.zeros((rank - a.shape[0], a.shape[1]))])
        b = np.hstack([b, np.zeros((b.shape[0], rank - b.shape[1]))])
    return a, b, error


def refactorize(product: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Best rank-r factors of `product` (Eckart-Young): B = U_r S_r^1/2, A = S_r^1/2 V_r^T.
    Returns (A, B, relative truncation error ||P - B A||_F / ||P||_F)."""
    u, s, vt = np.linalg.svd(product, full_matrices=False)
    return _best_factors(u, s, vt, rank)


def refactorize_stacked(
    left: np.ndarray, right: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """`refactorize(left @ right, rank)` without the d x k product when it is low rank: a mean
    of K/r sites' products is left (d x K) @ right (K x k) with K small, so QR both sides
    (left = Q_l R_l, right^T = Q_r R_r) and take the SVD of the K x K core R_l R_r^T: P's
    singular values are the core's, its singular vectors Q_l U_c and Q_r V_c. O((d + k) K^2)
    instead of O(d k min(d, k)); when K >= min(d, k) the dense product is the cheaper one."""
    d, k = left.shape[0], right.shape[1]
    if left.shape[1] >= min(d, k):
        return refactorize(left @ right, rank)
    q_l, r_l = np.linalg.qr(left)
    q_r, r_r = np.linalg.qr(right.T)
    u_c, s, vt_c = np.linalg.svd(r_l @ r_r.T)
    return _best_factors(q_l @ u_c, s, vt_c @ q_r.T, rank)


def factor_names(adapter: Arrays) -> dict[str, tuple[str, str]]:
    """module -> (name of its A tensor, name of its B tensor)."""
    names: dict[str, dict[str, str]] = {}
    for name in adapter:
        for factor in ("lora_A", "lora_B"):
            if f".{factor}." in name:
                names.setdefault(name.split(f".{factor}.")[0], {})[factor] = name
    return {m: (n["lora_A"], n["lora_B"]) for m, n in names.items() if len(n) == 2}
