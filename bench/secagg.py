"""Secure-aggregation overhead per round against plaintext summation, at 10 and 50 sites.

The pure protocol (fedlora.secure.secagg), all sites simulated in one process, on a random
contribution the size of SmolLM2-135M's LoRA r=8 adapter on q_proj and v_proj (460,800 values;
the default until the learning study, whose winner o_proj has 276,480) plus the FedAvg weight.
Plaintext: each site casts its contribution to float32 (what it sends), the server sums in
float64. Secure: each site's four stages (keys, shares, masking, unmasking shares) and the
server's (routing, summing, unmasking); with no dropout and with 10% of the sites dropped after
sharing keys (the server then rebuilds their pairwise masks). Two contributions: "64-bit" is n_i
* delta_i under the session's default bound 2^30 (no DP: every value in 64 bits); "32-bit" is a
client-level DP one, delta clipped to norm C = 1 with weight 1, whose delta has the bound C (1 +
2^-20) and goes in 32 bits (the weight in 64). Seconds are the median site and the server; bytes
are payload (tensor data, keys, ciphertexts, the layout, 8 per site id or number) per site and
at the server, both directions; the global adapter, sent down in both modes, is not counted.

Then what a site daemon adds when it signs its keys and the digest of its training content
(fedlora.secure.identity): signing its own, checking every peer's against its [peers] roster,
and the bytes of the signatures (name, OpenSSH public key, signature) up to the server and,
for all sites, down again.

    python bench/secagg.py --sites 10,50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from fedlora.secure.identity import Signer, content_statement, fingerprint, keys_statement
from fedlora.secure.secagg import (
    Layout,
    SecAggClient,
    SecAggServer,
    clipped_range,
    default_threshold,
)
from fedlora.strategies.base import sum_contributions

SIZE = 460_800  # 30 layers x (A 8x576 + B 576x8 on q_proj, A 8x576 + B 192x8 on v_proj)
ID = 8  # bytes per site id on the wire


def timed(fn: Callable, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


CLIP = 1.0
BOUNDS = {"64-bit": None, "32-bit": {"delta": clipped_range(CLIP)}}  # key bounds per mode


def contribution(rng: np.random.Generator, width: str) -> dict[str, np.ndarray]:
    """n_i * delta_i and n_i (64-bit), or a clipped delta and weight 1 (32-bit)."""
    if width == "32-bit":
        delta = rng.normal(0, 1e-3, SIZE)
        return {"delta": delta * min(1.0, CLIP / np.linalg.norm(delta)), "weight": np.ones(1)}
    n_i = float(rng.integers(100, 5000))
    return {"delta": n_i * rng.normal(0, 1e-3, SIZE), "weight": np.array([n_i])}


def layout_bytes(layout: Layout) -> int:
    """The layout as a round's byte count has it: its key names, and 8 bytes per number."""
    config = layout.to_config()
    numbers = sum(len(v) for k, v in config.items() if k != "keys")
    return sum(map(len, config["keys"])) + 8 * numbers


def plaintext(xs: list[dict[str, np.ndarray]]) -> dict[str, float]:
    sent, site_s = [], []
    for x in xs:
        out, s = timed(lambda x: {k: v.astype(np.float32) for k, v in x.items()}, x)
        sent.append(out)
        site_s.append(s)
    _, server_s = timed(sum_contributions, sent)
    up = sum(v.nbytes for v in sent[0].values())
    return {
        "site_s": statistics.median(site_s),
        "server_s": server_s,
        "site_up": up,
        "site_down": 0,
        "server_in": up * len(xs),
        "server_out": 0,
    }


def secure(
    xs: list[dict[str, np.ndarray]], dropped: int, bounds: dict[str, float] | None
) -> dict[str, float]:
    n = len(xs)
    t = default_threshold(n)
    site_s = dict.fromkeys(range(n), 0.0)
    up = dict.fromkeys(range(n), 0)
    down = dict.fromkeys(range(n), 0)
    server = SecAggServer(threshold=t)
    server_s = 0.0
    clients = {}
    for i in range(n):
        (clients[i], keys), s = timed(
            lambda i: (c := SecAggClient.create(1, i, t, key_bounds=bounds), c.public_keys()), i
        )
        site_s[i] += s
        up[i] += ID + sum(map(len, keys))
    peers, s = timed(server.receive_keys, {i: c.public_keys() for i, c in clients.items()})
    server_s += s
    broadcast = sum(ID + len(c) + len(k) for c, k in peers.values())
    sent = {}
    for i in range(n):
        sent[i], s = timed(clients[i].share_keys, peers)
        site_s[i] += s
        down[i] += broadcast
        up[i] += sum(ID + len(c) for c in sent[i].values())
    routed, s = timed(server.route_shares, sent)
    server_s += s
    gone = set(range(n - dropped, n))  # trained, then lost before sending
    masked = {}
    for i in routed:
        down[i] += sum(ID + len(c) for c in routed[i].values())
        if i in gone:
            continue
        (layout, masked[i]), s = timed(clients[i].mask_input, xs[i], routed[i])
        site_s[i] += s
        up[i] += masked[i].nbytes + layout_bytes(layout)
    (survivors, lost), s = timed(server.receive_masked, masked, layout)
    server_s += s
    responses = {}
    for i in survivors:
        down[i] += ID * n
        responses[i], s = timed(clients[i].unmask, survivors, lost)
        site_s[i] += s
        up[i] += sum(ID + len(v) for part in responses[i] for v in part.values())
    total, s = timed(server.unmask, responses)
    server_s += s
    expected = layout.pack({k: sum(xs[i][k] for i in survivors) for k in ("delta", "weight")})
    abs_sum = sum(np.abs(layout.pack(xs[i])) for i in survivors)
    error = np.abs(total - expected)
    assert np.all(error <= layout.error_bound(len(survivors), abs_sum)), "secure sum is off"
    return {
        "site_s": statistics.median(site_s[i] for i in survivors),
        "server_s": server_s,
        "site_up": statistics.median(up[i] for i in survivors),
        "site_down": statistics.median(down[i] for i in survivors),
        "server_in": sum(up.values()),
        "server_out": sum(down.values()),
    }


def signatures(n: int) -> dict[str, float]:
    """One session's signing and roster checks at one site among n (P-384, as `fedlora certs`
    makes the keys): its keys (checked before sharing) and the digest of its training content
    (checked before unmasking); and the bytes the signatures add, up (key and masked-input
    replies) and down (share and unmask messages, every site's)."""
    import os

    from cryptography.hazmat.primitives.asymmetric import ec

    signers = [Signer(f"site-{i:03d}", ec.generate_private_key(ec.SECP384R1())) for i in range(n)]
    keys = [SecAggClient.create(1, i, default_threshold(n)).public_keys() for i in range(n)]
    digest = os.urandom(32)
    statements = [
        stmt
        for i, s in enumerate(signers)
        for stmt in (
            keys_statement("federation-1", 1, i, s.name, *keys[i]),
            content_statement("federation-1", 1, i, s.name, digest),
        )
    ]
    owners = [s for s in signers for _ in range(2)]
    proofs, sign_s = timed(lambda: [s.prove(st) for s, st in zip(owners, statements, strict=True)])
    roster = {s.name: fingerprint(s.public_key()) for s in signers}
    checked, check_s = timed(
        lambda: [p.holds(roster[p.name], st) for p, st in zip(proofs, statements, strict=True)]
    )
    assert all(checked)
    extra = statistics.mean(len(p.name) + len(p.public_key) + len(p.signature) for p in proofs)
    return {
        "sign_s": sign_s / n,
        "check_s": check_s / n * (n - 1),
        "up": 2 * extra,
        "down": 2 * extra * n,
    }


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,50")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        "| sites | mode | site s | server s | site up | site down (extra) | server in | "
        "server out (extra) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",")):
        rows = {}
        for width, bounds in BOUNDS.items():
            xs = [contribution(rng, width) for _ in range(n)]
            if not rows:
                rows["plaintext"] = plaintext(xs)
            rows[f"secure, {width}"] = secure(xs, 0, bounds)
            rows[f"secure, {width}, {n // 10} dropped"] = secure(xs, n // 10, bounds)
        for mode, r in rows.items():
            print(
                f"| {n} | {mode} | {r['site_s']:.3f} | {r['server_s']:.3f} | "
                f"{human(r['site_up'])} | {human(r['site_down'])} | {human(r['server_in'])} | "
                f"{human(r['server_out'])} |"
            )
    print(
        "\n| sites | site signs, s | site checks its peers, s | key message up | share stage down |"
    )
    print("|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",")):
        r = signatures(n)
        print(
            f"| {n} | {r['sign_s']:.4f} | {r['check_s']:.4f} | +{human(r['up'])} | "
            f"+{human(r['down'])} |"
        )


if __name__ == "__main__":
    main()
