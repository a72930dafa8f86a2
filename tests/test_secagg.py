"""Secure aggregation: the fixed-point code, the SecAgg protocol with dropouts (pure, in
process), and the Flower stages in a real simulation against the plaintext contributions."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlora.apps import records as R
from fedlora.apps import secure as secure_app
from fedlora.apps.client import make_client_app
from fedlora.apps.contribution import secure_stats, site_id, train_contribution
from fedlora.apps.discovery import discover_sites
from fedlora.apps.secure import UNMASK, record_bytes, secure_sum
from fedlora.errors import FedloraError
from fedlora.privacy.site_policy import SitePolicy
from fedlora.secure.secagg import (
    DEFAULT_VALUE_BOUND,
    FixedPoint,
    Layout,
    SecAggClient,
    SecAggError,
    SecAggServer,
    ValueOutOfRange,
    clipped_range,
    combine_secret,
    encode_contribution,
    split_secret,
)
from fedlora.strategies.base import sum_contributions

# --- fixed point ---------------------------------------------------------------------------


def test_scale_from_sites_and_bound_by_hand():
    # f = 62 - ceil(log2(N * B)): 10 * 2^30 -> 34 bits -> f = 28; 100 * 2^30 -> 37 -> 25
    assert FixedPoint.for_sites(10).frac_bits == 28
    assert FixedPoint.for_sites(100).frac_bits == 25
    assert FixedPoint.for_sites(1, 1.0).frac_bits == 62
    fixed = FixedPoint.for_sites(10)
    assert fixed.step == 2.0**-28
    encoded = fixed.encode(np.array([1.5, -1.0, 0.0]))
    assert encoded.dtype == np.uint64
    assert encoded.tolist() == [3 * 2**27, 2**64 - 2**28, 0]
    with pytest.raises(SecAggError, match="lower the value bound"):
        FixedPoint.for_sites(10**6, 2.0**45)


def test_width_from_sites_and_bound_at_the_boundary():
    # 32 bits when f_32 = 30 - ceil(log2(N B)) >= 24, i.e. N B <= 64; else f_64 = 62 - ...
    def fmt(n, bound):
        fixed = FixedPoint.choose(n, bound)
        return fixed.width, fixed.frac_bits

    above_8 = math.nextafter(8.0, math.inf)
    assert fmt(8, 8.0) == (32, 24)  # N B = 64 = 2^6: just fits
    assert fmt(8, above_8) == (64, 55)  # N B = 64 (1 + 2^-52): 7 bits, 23 < 24 left
    assert fmt(9, 8.0) == (64, 55)  # 72: 7 bits
    assert fmt(64, 1.0) == (32, 24) and fmt(65, 1.0) == (64, 55)
    assert fmt(10, 1.0) == (32, 26)  # 10 -> 4 bits
    assert fmt(10, DEFAULT_VALUE_BOUND) == (64, 28)  # 10 * 2^30 -> 34 bits: as before
    assert fmt(1, 2.0**-40) == (32, 70)  # a tiny bound: fine steps, no cap needed
    # the clip range of client-level DP: C (1 + 2^-20) [+ 10 sigma with distributed noise]
    assert clipped_range(1.0) == 1.0 + 2.0**-20
    assert clipped_range(0.5, 0.25) == 0.5 + 2.0**-21 + 2.5
    assert fmt(10, clipped_range(1.0)) == (32, 26)  # the default federation under client DP
    assert fmt(63, clipped_range(1.0)) == (32, 24)
    assert fmt(64, clipped_range(1.0)) == (64, 55)  # 64 (1 + 2^-20) > 2^6
    # distributed noise, 10 sites, t = 7, sigma = 1: 1 + 10 / sqrt(7) = 4.78; N B = 47.8 -> 6
    assert fmt(10, clipped_range(1.0, 1 / math.sqrt(7))) == (32, 24)
    assert fmt(14, clipped_range(1.0, 1 / math.sqrt(7))) == (64, 55)  # 66.9 -> 7
    with pytest.raises(SecAggError, match="at least 24"):
        FixedPoint.for_sites(9, 8.0, width=32)
    with pytest.raises(SecAggError, match="positive"):
        clipped_range(0.0)


def test_sum_at_the_boundary_is_exact_in_each_width():
    """N values of +B or -B decode exactly: at N B = 64 (32 bits, f = 24), just above it (64
    bits, f = 55) and at 8 * 2^30 (64 bits, f = 29)."""
    above_8 = math.nextafter(8.0, 9.0)
    for n, bound, width, frac_bits in [
        (8, 8.0, 32, 24),
        (8, above_8, 64, 55),
        (8, DEFAULT_VALUE_BOUND, 64, 29),
    ]:
        fixed = FixedPoint.choose(n, bound)
        assert (fixed.width, fixed.frac_bits) == (width, frac_bits)
        for signs in ([1] * n, [-1] * n, [1] * (n - 1) + [-1]):
            total = np.zeros(1, dtype=fixed.encode(np.zeros(1)).dtype)
            for sign in signs:
                total += fixed.encode(np.array([sign * bound]))  # wraps modulo 2^w
            assert fixed.decode(total)[0] == sum(signs) * bound  # exact
    # by hand: 8 values of 8 at f = 24 are 8 * 2^27 = 2^30 as int32, and 8 of 2^30 at f = 29
    # are 2^62 as int64; one more fractional bit makes either 2^(w-1), one past the largest
    # w-bit integer: it wraps to -2^(w-1). The guard bit in f = (w - 2) - ... is needed.
    assert FixedPoint.choose(8, 8.0).encode(np.array([8.0, -8.0])).tolist() == [
        2**27,
        2**32 - 2**27,
    ]
    for n, bound, width, frac_bits in [(8, 8.0, 32, 25), (8, DEFAULT_VALUE_BOUND, 64, 30)]:
        finer = FixedPoint(n, bound, frac_bits, width)
        total = np.zeros(1, dtype=finer.encode(np.zeros(1)).dtype)
        for _ in range(n):
            total += finer.encode(np.array([bound]))
        assert finer.decode(total)[0] == -n * bound


def test_a_protocol_sum_at_the_boundary_is_exact():
    """Eight sites at the bound of a 32-bit key (8, f = 24) and of a 64-bit one (2^30, f = 29):
    masks, lanes and words add without a carry crossing a lane, and the sum is exact."""
    n = 8
    xs = {
        i: {"delta/x": np.array([8.0, -8.0, 8.0 * (-1) ** i]), "weight": np.array([2.0**30])}
        for i in range(n)
    }
    total, _, _, _, layout = run_protocol(n, 5, xs=xs, key_bounds={"delta/": 8.0})
    assert layout.formats == ((32, 24), (64, 29))
    assert total.tolist() == [64.0, -64.0, 0.0, 2.0**33]


def fsum_columns(vectors: list[np.ndarray]) -> np.ndarray:
    """The correctly rounded sum per element (math.fsum): the reference."""
    return np.array([math.fsum(col) for col in np.stack(vectors).T])


@pytest.mark.parametrize("n", [3, 10])
def test_decoded_sum_within_stated_bound(n):
    rng = np.random.default_rng(n)
    fixed = FixedPoint.for_sites(n)
    xs = [rng.uniform(-1, 1, 20_000) * 10.0 ** rng.integers(-3, 4, 20_000) for _ in range(n)]
    total = np.zeros(20_000, dtype=np.uint64)
    for x in xs:
        total += fixed.encode(x)  # uint64 arithmetic wraps modulo 2^64
    error = np.abs(fixed.decode(total) - fsum_columns(xs))
    bound = fixed.error_bound(n, np.sum(np.abs(xs), axis=0))
    assert np.all(error <= bound)
    # the bound is not vacuous: rounding errors of n values come close to it somewhere
    assert error.max() > 0.25 * n * fixed.step / 2


def test_extreme_values_do_not_wrap():
    n = 7
    fixed = FixedPoint.for_sites(n)
    for sign in (1.0, -1.0):
        total = np.zeros(1, dtype=np.uint64)
        for _ in range(n):
            total += fixed.encode(np.array([sign * DEFAULT_VALUE_BOUND]))
        assert fixed.decode(total)[0] == sign * n * DEFAULT_VALUE_BOUND


def test_key_bounds_come_from_the_client_level_clip(tiny_cfg):
    """Only client-level DP bounds the data-carrying vectors: C (1 + 2^-20), plus 10 sigma_site
    with distributed noise (sigma_site = sigma C / sqrt(t)); weights and statistics keep the
    session's bound, and without that clip every key does."""
    clip = 0.5 * (1 + 2.0**-20)
    bounds = secure_app.key_bounds
    assert bounds(tiny_cfg(), 2) == {}
    assert bounds(tiny_cfg(privacy={"level": "sample"}), 2) == {}
    client = {"level": "client", "max_grad_norm": 0.5, "noise_multiplier": 2.0}
    assert bounds(tiny_cfg(privacy=client), 2) == {"delta/": clip}
    scaffold = tiny_cfg(privacy=client, strategy={"name": "scaffold"})
    assert bounds(scaffold, 2) == {"delta/": clip, "dc/": clip}
    distributed = tiny_cfg(
        privacy=client | {"client_noise": "distributed"}, secure={"enabled": True}
    )
    assert bounds(distributed, 4) == {"delta/": clip + 10 * 2.0 * 0.5 / 2}  # t = 4: sqrt 2


def test_a_32_bit_value_travels_in_4_bytes():
    """Masked inputs are 64-bit words; 32-bit values fill them two at a time. Measured on the
    message a site sends (record_bytes, as the round's byte counts) and on Flower's Array."""
    from flwr.app import Array

    xs = {i: {"delta/a": np.linspace(-1, 1, 1001), "weight": np.array([1.0])} for i in range(3)}
    sizes = {}
    for name, bounds in (("64-bit", None), ("32-bit", {"delta/": 1.0})):
        server = SecAggServer(threshold=2)
        clients = {i: SecAggClient.create(1, i, 2, key_bounds=bounds) for i in range(3)}
        peers = server.receive_keys({i: c.public_keys() for i, c in clients.items()})
        routed = server.route_shares({i: c.share_keys(peers) for i, c in clients.items()})
        layout, y = clients[0].mask_input(xs[0], routed[0])
        message = RecordDict({R.SECAGG_MASKED: ArrayRecord({R.SECAGG_MASKED: Array(y)})})
        sizes[name] = (layout, y, record_bytes(message), len(Array(y).data))
    layout, y, wire, data = sizes["32-bit"]
    assert layout.formats == ((32, 28), (64, 30))  # 30 - ceil(log2 3), 62 - ceil(log2 3 2^30)
    assert y.dtype == np.uint64 and y.shape == (1 + 501,)  # 1 word, then 1001 lanes + 1 pad
    assert wire == 1001 * 4 + 4 + 8  # the weight in 8 bytes, half a word of padding
    assert sizes["64-bit"][2] == 1002 * 8
    assert sizes["64-bit"][3] - data == 1001 * 4 - 4  # Flower's bytes: the same difference


def test_out_of_range_and_non_finite_values_are_refused():
    fixed = FixedPoint.for_sites(3, value_bound=100.0)
    fixed.encode(np.array([100.0, -100.0]))  # the bound itself is fine
    for bad in (100.5, -1e9, np.inf, np.nan):
        with pytest.raises(ValueOutOfRange, match="raise the value bound"):
            fixed.encode(np.array([0.0, bad]))
    contribution = {"delta/b": np.zeros((2, 2)), "weight": np.array([1200.0])}
    with pytest.raises(ValueOutOfRange, match="'weight'"):
        encode_contribution(fixed, contribution)


def test_layout_packs_in_key_order_and_round_trips():
    arrays = {
        "weight": np.array([3.0]),
        "delta/a": np.arange(6.0).reshape(2, 3),
        "z": np.array(7.0),
    }
    layout = Layout.of(arrays)
    assert layout.keys == ("delta/a", "weight", "z")
    assert layout.pack(arrays).tolist() == [0, 1, 2, 3, 4, 5, 3, 7]
    assert [layout.key_at(i) for i in (0, 5, 6, 7)] == ["delta/a", "delta/a", "weight", "z"]
    again = Layout.from_config(ConfigRecord(layout.to_config()))
    assert again == layout
    back = again.unpack(layout.pack(arrays))
    assert all(np.array_equal(back[k], v) and back[k].shape == v.shape for k, v in arrays.items())
    with pytest.raises(SecAggError, match="missing"):
        layout.pack({"weight": np.array([3.0])})
    with pytest.raises(SecAggError, match="shape"):
        layout.pack(arrays | {"weight": np.array([3.0, 4.0])})


# --- Shamir sharing ----------------------------------------------------------------------


def share(x: int, y: int) -> bytes:
    return x.to_bytes(4, "big") + y.to_bytes(66, "big")


def test_shamir_by_hand_and_at_random():
    # f(x) = 7 + 3x: shares (1, 10), (2, 13), (3, 16); any two give f(0) = 7
    for pair in ([share(1, 10), share(2, 13)], [share(3, 16), share(1, 10)]):
        assert combine_secret(pair, size=1) == bytes([7])
    secret = bytes(range(32))
    shares = split_secret(secret, 4, 7)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pick = [shares[i] for i in rng.choice(7, size=4, replace=False)]
        assert combine_secret(pick) == secret
    with pytest.raises(SecAggError, match="do not combine"):
        combine_secret(shares[:3])  # t - 1 shares: a random field element, not a 32-byte key
    with pytest.raises(SecAggError, match="same index"):
        combine_secret([shares[0], shares[0], shares[1], shares[2]])
    with pytest.raises(SecAggError, match="cannot split"):
        split_secret(secret, 8, 7)


# --- the protocol, in process -------------------------------------------------------------


def contributions(
    n: int, rng: np.random.Generator, clipped: bool = False
) -> dict[int, dict[str, np.ndarray]]:
    """FedAvg-like contributions: n_i * delta_i (n_i in the thousands) and n_i; `clipped`: as
    under client-level DP, weight 1 and the deltas clipped jointly to L2 norm 1."""
    out = {}
    for i in range(n):
        n_i = 1.0 if clipped else float(rng.integers(100, 5000))
        a, b = rng.normal(0, 1e-2, (8, 16)), rng.normal(0, 1e-2, (16, 8))
        if clipped:
            norm = math.hypot(np.linalg.norm(a), np.linalg.norm(b))
            a, b = a / max(1.0, norm), b / max(1.0, norm)
        out[i] = {"delta/a": n_i * a, "delta/b": n_i * b, "weight": np.array([n_i])}
    return out


def run_protocol(
    n: int,
    t: int,
    *,
    silent_at_keys: tuple[int, ...] = (),
    silent_at_share: tuple[int, ...] = (),
    silent_at_mask: tuple[int, ...] = (),
    silent_at_unmask: tuple[int, ...] = (),
    seed: int = 0,
    xs: dict[int, dict[str, np.ndarray]] | None = None,
    key_bounds: dict[str, float] | None = None,
):
    """All four stages; a site listed for a stage sends nothing from that stage on. Client state
    goes through to_state / ConfigRecord / from_state between stages, as in Flower. Returns
    the sum, the reference sum, the stated error bound, the survivors and the layout."""
    rng = np.random.default_rng(seed)
    xs = xs or contributions(n, rng, clipped=bool(key_bounds))
    server = SecAggServer(threshold=t)
    clients = {
        i: SecAggClient.create(session=1, site=i, threshold=t, key_bounds=key_bounds)
        for i in range(n)
    }

    def reload(i: int) -> SecAggClient:
        clients[i] = SecAggClient.from_state(ConfigRecord(clients[i].to_state()))
        return clients[i]

    keys = {i: reload(i).public_keys() for i in clients if i not in silent_at_keys}
    peers = server.receive_keys(keys)
    sent = {i: reload(i).share_keys(peers) for i in peers if i not in silent_at_share}
    routed = server.route_shares(sent)
    masked, layouts = {}, set()
    for i in routed:
        if i not in silent_at_mask:
            layout, masked[i] = reload(i).mask_input(xs[i], routed[i])
            layouts.add(layout)
    (layout,) = layouts
    survivors, dropped = server.receive_masked(masked, layout)
    responses = {
        i: reload(i).unmask(survivors, dropped) for i in survivors if i not in silent_at_unmask
    }
    total = server.unmask(responses)
    expected = fsum_columns([layout.pack(xs[i]) for i in survivors])
    abs_sum = np.sum([np.abs(layout.pack(xs[i])) for i in survivors], axis=0)
    return total, expected, layout.error_bound(len(survivors), abs_sum), survivors, layout


CLIP = {"delta/": clipped_range(1.0)}


@pytest.mark.parametrize("n", [3, 10])
@pytest.mark.parametrize("bounds", [None, CLIP, {"delta/a": clipped_range(1.0)}])
def test_unmasked_sum_equals_plain_sum(n, bounds):
    """All in 64 bits; clipped deltas in 32 bits (weights in 64); one tensor in 32 bits."""
    total, expected, bound, survivors, layout = run_protocol(n, n // 2 + 1, key_bounds=bounds)
    assert survivors == list(range(n))
    assert np.all(np.abs(total - expected) <= bound)
    widths = dict(zip(layout.keys, (w for w, _ in layout.formats), strict=True))
    assert widths["weight"] == 64
    assert widths["delta/a"] == (32 if bounds else 64)
    assert widths["delta/b"] == (32 if bounds is CLIP else 64)
    # the bound is not vacuous in 32 bits either: n rounding errors come close to it somewhere
    step = math.ldexp(1.0, -layout.formats[0][1])
    assert np.abs(total - expected)[:128].max() > 0.25 * n * step / 2


@pytest.mark.parametrize(
    "drops, in_sum",
    [
        ({"silent_at_keys": (2,)}, [0, 1, 3, 4, 5, 6, 7, 8, 9]),
        ({"silent_at_share": (4,), "silent_at_mask": (7,)}, [0, 1, 2, 3, 5, 6, 8, 9]),
        ({"silent_at_mask": (1, 8)}, [0, 2, 3, 4, 5, 6, 7, 9]),  # pairwise masks to remove
        ({"silent_at_unmask": (0, 5)}, list(range(10))),  # masked, then gone: still summed
        ({"silent_at_mask": (3,), "silent_at_unmask": (6, 9)}, [0, 1, 2, 4, 5, 6, 7, 8, 9]),
    ],
)
@pytest.mark.parametrize("bounds", [None, CLIP])
def test_dropouts_down_to_threshold(drops, in_sum, bounds):
    total, expected, bound, survivors, _ = run_protocol(10, 6, key_bounds=bounds, **drops)
    assert survivors == in_sum
    assert np.all(np.abs(total - expected) <= bound)


@pytest.mark.parametrize(
    "drops, stage",
    [
        ({"silent_at_keys": (0, 1, 2)}, "advertised keys"),
        ({"silent_at_share": (0, 1, 2)}, "shared keys"),
        ({"silent_at_mask": (2, 3, 4)}, "sent masked inputs"),
        ({"silent_at_mask": (3,), "silent_at_unmask": (0, 1)}, "sent unmasking shares"),
    ],
)
def test_below_threshold_is_an_error(drops, stage):
    with pytest.raises(SecAggError, match=f"only 2 sites {stage}.*threshold of 3"):
        run_protocol(5, 3, **drops)


@pytest.mark.parametrize("bound", [DEFAULT_VALUE_BOUND, 5.0])
def test_masked_input_reveals_nothing_of_the_update(bound):
    """In 64 bits (the default bound) and in 32-bit lanes (bound 5: 3 x 5 -> f = 26)."""
    n, size = 3, 100_000
    fixed = FixedPoint.choose(n, bound)
    assert fixed.width == (64 if bound == DEFAULT_VALUE_BOUND else 32)
    server = SecAggServer(threshold=2, value_bound=bound)
    clients = {i: SecAggClient.create(1, i, 2, value_bound=bound) for i in range(n)}
    peers = server.receive_keys({i: c.public_keys() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(peers) for i, c in clients.items()})
    x = {"v": np.linspace(-5, 5, size)}  # a very structured update
    _, y = clients[0].mask_input(x, routed[0])
    values = y if fixed.width == 64 else y.view(np.uint32)[:size]
    seen = fixed.decode(values)  # what the server would read as site 0's values
    assert abs(np.corrcoef(seen, x["v"])[0, 1]) < 0.02
    # uniform over the ring: only about 2^(f+1) B / 2^w of them fall in the value range
    in_range = np.mean(np.abs(seen) <= fixed.value_bound)
    assert in_range < 4 * 2.0 ** (fixed.frac_bits + 1) * fixed.value_bound / 2.0**fixed.width
    top = (values >> values.dtype.type(fixed.width - 8)).astype(np.int64)
    top_byte = np.bincount(top, minlength=256)
    chi2 = np.sum((top_byte - size / 256) ** 2 / (size / 256))
    assert chi2 < 400  # 255 degrees of freedom: about 255 +- 23 for uniform bytes


def test_sites_refuse_what_would_expose_them():
    server = SecAggServer(threshold=2)
    clients = {i: SecAggClient.create(session=1, site=i, threshold=2) for i in range(4)}
    peers = server.receive_keys({i: c.public_keys() for i, c in clients.items() if i < 3})
    # threshold 2 of 4 sites would let a lying server rebuild both secrets of one site
    with pytest.raises(SecAggError, match="must exceed half"):
        clients[3].share_keys(peers | {3: clients[3].public_keys()})
    with pytest.raises(SecAggError, match="own keys"):
        clients[3].share_keys(peers)
    routed = server.route_shares({i: clients[i].share_keys(peers) for i in range(3)})
    _, y = clients[0].mask_input({"v": np.zeros(4)}, routed[0])
    with pytest.raises(SecAggError, match="do not split"):
        clients[0].unmask([0, 1], [1, 2])  # site 1 both alive and dropped
    with pytest.raises(SecAggError, match="out of order"):
        clients[1].unmask([0, 1, 2], [])  # never sent a masked input
    clients[0].unmask([0, 1, 2], [])
    with pytest.raises(SecAggError, match="out of order"):
        clients[0].unmask([0, 1], [2])  # a second request for the other kind of share


def test_a_site_confirms_one_survivor_set_and_unmasks_for_it_alone():
    """The confirm stage (module doc: a server that tells sites different drop lists): a site
    confirms one set, within the sites it heard from, with itself and t of them, and then
    reveals shares for that set only; and it takes part only in a session whose cohort, told
    with the keys, is within a majority threshold and holds every key it is sent."""
    cohort = [0, 1, 2, 3]
    with pytest.raises(SecAggError, match="must exceed half"):
        SecAggClient.create(1, 0, 2, cohort=cohort)  # 2t = |U0|: two sets of t could confirm
    with pytest.raises(SecAggError, match="asked into a session of sites"):
        SecAggClient.create(1, 5, 3, cohort=cohort)
    server = SecAggServer(threshold=3)
    clients = {i: SecAggClient.create(1, i, 3, cohort=cohort) for i in range(4)}
    stranger = SecAggClient.create(1, 7, 3, cohort=[5, 6, 7])
    keys = {i: c.public_keys() for i, c in clients.items()}
    with pytest.raises(SecAggError, match=r"keys of sites \[7\], outside"):
        clients[0].share_keys(keys | {7: stranger.public_keys()})
    peers = server.receive_keys(keys)
    routed = server.route_shares({i: c.share_keys(peers) for i, c in clients.items()})
    heard = {j: routed[0][j] for j in (1, 2)}  # the server kept site 3's shares from site 0
    clients[0].mask_input({"v": np.zeros(4)}, heard)
    with pytest.raises(SecAggError, match="not among the sites that shared keys with it"):
        clients[0].confirm([0, 1, 3])
    with pytest.raises(SecAggError, match="with it"):
        clients[0].confirm([1, 2, 3])
    with pytest.raises(SecAggError, match="2 survivors, threshold is 3"):
        clients[0].confirm([0, 1])
    clients[0].confirm([0, 1, 2])
    with pytest.raises(SecAggError, match="out of order"):
        clients[0].confirm([0, 1])  # one set per session
    with pytest.raises(SecAggError, match=r"but it confirmed \[0, 1, 2\]"):
        clients[0].unmask([0, 2], [1])
    state = SecAggClient.from_state(clients[0].to_state())
    assert state.confirmed == [0, 1, 2] and state.cohort == cohort
    b, s = state.unmask([0, 1, 2], [])
    assert sorted(b) == [0, 1, 2] and not s


def unmaskable_sums(threshold: int, heard: dict, answers: dict) -> list[set[int]]:
    """A model of what a server learns at the unmasking, whatever it told each site: the sets
    of inputs whose sum it can take out of the masked inputs. `heard[j]`: the sites j heard
    from at the share stage (j too; j pairs its masks with them and holds their shares);
    `answers[k]`: the (alive, dropped) lists site k answered for (self-mask shares of the
    first, mask keys of the second), or None. The server knows b_j (s_j) when t sites holding
    j's shares gave it; an input is usable when b_j is known, and its mask paired with k comes
    off when s_j or s_k is known, or cancels against k's when both paired and both are used."""
    n = len(heard)

    def given(j: int, part: int) -> bool:  # t holders of j's shares gave this kind
        holders = [k for k, a in answers.items() if a and j in a[part] and j in heard[k]]
        return len(holders) >= threshold

    b = {j for j in range(n) if given(j, 0)}
    s = {j for j in range(n) if given(j, 1)}
    assert not b & s, "both secrets of one site"
    block = {j: {j} for j in b}
    dead: set[int] = set()
    for j, k in itertools.permutations(range(n), 2):
        if j in s or k in s or k not in heard[j]:
            continue  # no mask j added for k, or one that comes off
        if j in b and k in b and j in heard[k]:
            merged = block[j] | block[k]
            for i in merged:
                block[i] = merged
        else:
            dead.add(j)  # j's mask for k cancels against nothing the server can use
    sums = {frozenset(blk) for j, blk in block.items()}
    return [set(blk) for blk in sums if not blk & dead]


def drop_list_attempt(n: int, t: int, rng: random.Random, follow_rules: bool) -> tuple:
    """A server's try at one site X, in the shape of the drop-list attack: X hears from t - 1
    partners only, the others mostly from everyone; at the unmasking each other site is told
    X survived and some of X's partners dropped. Sites that follow the rules say who dropped
    only for a survivor set t of them confirmed (within what each heard from), else that
    every site they heard from survived. Returns (heard, answers)."""
    x, others = rng.randrange(n), list(range(n))
    others.remove(x)
    partners = set(rng.sample(others, t - 1))
    heard = {
        j: set(range(n)) if rng.random() < 0.7 else {j, *rng.sample(range(n), t)} for j in others
    }
    heard[x] = {x} | partners
    confirmed = {x} | set(rng.sample(others, rng.randrange(t - 1, n - 1)))
    confirmers = [k for k in confirmed if confirmed <= heard[k]]
    answers: dict[int, tuple[set[int], set[int]] | None] = {x: None}
    for k in others:
        if not follow_rules:
            dropped = {j for j in partners - {k} if j in heard[k] and rng.random() < 0.7}
            alive = heard[k] - dropped
            answers[k] = (alive, dropped) if len(alive) >= t else (heard[k], set())
        elif len(confirmers) >= t and k in confirmers and rng.random() < 0.8:
            answers[k] = (confirmed, heard[k] - confirmed)
        else:
            answers[k] = (heard[k], set()) if rng.random() < 0.9 else None
    return heard, answers


def test_no_server_unmasks_a_sum_of_fewer_than_t_sites_under_the_sites_rules():
    """The argument of fedlora.secure.secagg's module doc, checked on a model of the shares:
    told that no site dropped, a site reveals self-mask shares only, and it reveals the mask
    keys of sites that dropped only for a survivor set t sites confirmed. Whatever the server
    relays and tells each site (every case at 4 sites; attempts shaped like the drop-list
    attack at 5 and 7), it unmasks one sum at most, of at least t inputs. Without the rule the
    same attempts unmask a site alone, as the attack of tests/test_drop_lists.py does."""
    heard = {0: {0, 1, 2}} | {j: {0, 1, 2, 3, 4} for j in range(1, 5)}
    told = {1: {2}, 2: {1}, 3: {1, 2}, 4: {1, 2}}
    attack = {0: None} | {k: (heard[k] - d, d) for k, d in told.items()}
    assert unmaskable_sums(3, heard, attack) == [{0}]

    def sets(n, t):
        return [set(c) for r in range(t, n + 1) for c in itertools.combinations(range(n), r)]

    def safe(t, heard, answers) -> bool:
        sums = unmaskable_sums(t, heard, answers)
        return len(sums) <= 1 and all(len(found) >= t for found in sums)

    n, t = 4, 3  # every case: what each site heard from, the confirmed set, each site's answer
    for views in itertools.product(*[[v for v in sets(n, t) if j in v] for j in range(n)]):
        heard = dict(enumerate(views))
        for confirmed in [*sets(n, t), set()]:
            confirmers = [k for k in confirmed if confirmed <= heard[k]]
            if confirmed and len(confirmers) < t:
                continue
            options = [
                [None, (heard[k], set())]
                + ([(confirmed, heard[k] - confirmed)] if k in confirmers else [])
                for k in range(n)
            ]
            for answers in itertools.product(*options):
                assert safe(t, heard, dict(enumerate(answers))), (heard, answers)
    rng = random.Random(0)
    for n, t in [(5, 3), (7, 4)]:
        for _ in range(1000):
            heard, answers = drop_list_attempt(n, t, rng, follow_rules=True)
            assert safe(t, heard, answers), (heard, answers)
        broken = sum(
            not safe(t, *drop_list_attempt(n, t, rng, follow_rules=False)) for _ in range(1000)
        )
        assert broken > 0, f"the attempts at {n} sites never unmask a site without the rule"


def test_wrong_session_shares_are_rejected():
    server = SecAggServer(threshold=2)
    clients = {i: SecAggClient.create(session=1, site=i, threshold=2) for i in range(3)}
    peers = server.receive_keys({i: c.public_keys() for i, c in clients.items()})
    routed = server.route_shares({i: c.share_keys(peers) for i, c in clients.items()})
    swapped = {1: routed[2][1]}  # site 1's ciphertext for site 2, handed to site 0
    with pytest.raises(SecAggError, match="do not decrypt"):
        clients[0].mask_input({"v": np.zeros(4)}, swapped)


# --- the Flower stages in a real simulation -------------------------------------------------

SITES, THRESHOLD = 5, 3
FAIL_TRAIN, FAIL_UNMASK = 4, 1  # site 4 fails while training, site 1 after sending its input
PLAIN = "plain64"  # a test-only handler: the float64 contribution in the clear, for reference


def failing_client_app(cfg) -> ClientApp:
    """fedlora's ClientApp (make_client_app routes the secagg messages), with site 4 failing in
    training and site 1 at unmasking, plus a plaintext handler for the reference sums."""
    inner = make_client_app(cfg)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    @app.query(R.SECAGG_ACTION)
    def secagg_query(msg: Message, context: Context) -> Message:
        if msg.content[R.SECAGG][R.SECAGG_STAGE] == UNMASK and site_id(context) == FAIL_UNMASK:
            raise RuntimeError("site lost its connection")
        return inner(msg, context)

    @app.train(R.SECAGG_ACTION)
    def secagg_train(msg: Message, context: Context) -> Message:
        if site_id(context) == FAIL_TRAIN:
            raise RuntimeError("site ran out of memory")
        return inner(msg, context)

    @app.train(PLAIN)
    def plain(msg: Message, context: Context) -> Message:
        contribution, metrics, release = train_contribution(cfg, msg.content, context, SitePolicy())
        release()
        contribution |= secure_stats(dict(metrics))  # what a secure site adds to its input
        return Message(RecordDict({R.CONTRIBUTION: R.to_record(contribution)}), reply_to=msg)

    return app


class RecordingGrid:
    """The server's view: every reply it pulls, kept for the test."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.replies = grid, []

    def push_messages(self, msgs):
        return self.grid.push_messages(msgs)

    def pull_messages(self, ids):
        replies = list(self.grid.pull_messages(ids))
        self.replies.extend(replies)
        return replies


def train_content(global_arrays, round_: int) -> RecordDict:
    return RecordDict(
        {
            R.GLOBAL_ADAPTER: R.to_record(global_arrays),
            R.BROADCAST: ArrayRecord(),
            R.ROUND_CONFIG: ConfigRecord({R.ROUND: round_}),
        }
    )


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, tiny_cfg_at):
    from flwr.simulation import run_simulation

    from fedlora.adapter import adapter_arrays
    from fedlora.runtime import build_runtime
    from fedlora.simulate import backend_config, quiet_engines

    quiet_engines()
    cfg = tiny_cfg_at(
        tmp_path_factory.mktemp("secagg"),
        strategy={"name": "fednova"},
        federation={"clients": SITES},
        train={"optimizer": "sgd", "lr": 0.5, "local_steps_spread": 0.5, "momentum": 0.9},
    )
    global_arrays = adapter_arrays(build_runtime(cfg, log=lambda _: None).model)
    out: dict = {"progress": []}
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = discover_sites(grid, SITES)
        plain = [
            Message(
                train_content(global_arrays, 1), dst_node_id=nodes[s], message_type=f"train.{PLAIN}"
            )
            for s in sorted(nodes)
        ]
        out["plain"] = {
            int(r.metadata.src_node_id): R.from_record(r.content[R.CONTRIBUTION])
            for r in grid.send_and_receive(plain)
        }
        out["node_site"] = {n: s for s, n in nodes.items()}
        recording = RecordingGrid(grid)
        content = train_content(global_arrays, 1)
        out["result"] = secure_sum(recording, nodes, content, THRESHOLD, out["progress"].append)
        out["replies"] = recording.replies
        try:  # sites 0, 1, 4 with t = 2: 4 fails training, 1 unmasking -> 1 share per secret
            subset = {s: nodes[s] for s in (0, 1, FAIL_TRAIN)}
            secure_sum(grid, subset, train_content(global_arrays, 2), 2, lambda _: None)
        except FedloraError as err:
            out["error"] = str(err)

    run_simulation(
        server_app=app,
        client_app=failing_client_app(cfg),
        num_supernodes=SITES,
        backend_config=backend_config(cfg),
    )
    out["plain"] = {out["node_site"][n]: c for n, c in out["plain"].items()}
    return out


def test_secure_sum_matches_plaintext_sum_with_dropouts(simulated):
    result = simulated["result"]
    in_sum = [s for s in range(SITES) if s != FAIL_TRAIN]
    assert result.sites == in_sum  # site 1 dropped after masking: its input still counts
    assert sorted(result.metrics) == in_sum
    assert all(int(result.metrics[s][R.SITE_ID]) == s for s in in_sum)
    expected = sum_contributions([simulated["plain"][s] for s in in_sum])
    assert set(result.sums) == set(expected) >= {"weight", "nova_a"}
    fixed = FixedPoint.for_sites(SITES)
    for key, value in expected.items():
        abs_sum = sum(np.abs(simulated["plain"][s][key]) for s in in_sum)
        assert result.sums[key].dtype == np.float64 and result.sums[key].shape == value.shape
        assert np.all(np.abs(result.sums[key] - value) <= fixed.error_bound(len(in_sum), abs_sum))
    assert result.sums["weight"][0] == sum(simulated["plain"][s]["weight"][0] for s in in_sum)
    assert len(result.failures) == 2
    assert any(f.startswith("site 4, mask:") and "out of memory" in f for f in result.failures)
    assert any(f.startswith("site 1, unmask:") and "connection" in f for f in result.failures)
    stages = {"keys", "share", "mask", "unmask"}
    assert set(result.bytes_up) == set(result.bytes_down) == set(result.seconds) == stages
    assert all(seconds > 0 for seconds in result.seconds.values())
    adapter_bytes = sum(v.nbytes for v in simulated["plain"][0].values() if v.ndim > 1) // 2
    # the global adapter went down with the keys, to every site (4 failed only in training)
    assert result.bytes_down["keys"] > SITES * adapter_bytes > result.bytes_down["mask"]
    assert any("mask: 5/5 sites" in p for p in simulated["progress"])


def test_server_sees_masked_inputs_only(simulated):
    fixed = FixedPoint.for_sites(SITES)
    masked = [r for r in simulated["replies"] if r.has_content() and R.SECAGG_MASKED in r.content]
    assert len(masked) == SITES - 1
    for reply in masked:
        site = simulated["node_site"][reply.metadata.src_node_id]
        layout = Layout.from_config(reply.content[R.SECAGG_LAYOUT])
        x = layout.pack(simulated["plain"][site])
        seen = fixed.decode(reply.content[R.SECAGG_MASKED][R.SECAGG_MASKED].numpy())
        assert seen.shape == x.shape
        # the plaintext is small numbers; what the server holds spans the whole ring
        assert np.abs(x).max() < 1e4 and np.mean(np.abs(seen) > 1e6) > 0.99


def test_too_few_survivors_is_a_clear_error(simulated):
    message = simulated["error"]
    assert message.startswith("Round 2: secure aggregation failed at the 'unmask' stage")
    # site 0, the one survivor left to answer, will not help unmask a sum of 2 (its minimum
    # cohort is 3)
    assert "only 0 sites sent unmasking shares" in message
    assert "site 0 refused: only 2 inputs in the secure sum" in message
    assert "site 4, mask" in message and "site 1, unmask" in message
