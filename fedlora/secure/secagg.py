"""Secure summation of the sites' contribution vectors (SecAgg, Bonawitz et al. 2017, CCS).

The server learns the elementwise SUM of the survivors' vectors and nothing else about any one
site's vector. Every fedlora strategy needs only per-key sums (strategies/base.py), so this one
protocol serves FedAvg, FedProx, SCAFFOLD and FedNova unchanged. This module is pure: no
messaging; fedlora/apps/secure.py carries its values in Flower messages.

Why not Flower's SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``, flwr 1.41), read in its
source: it runs only under the legacy ``LegacyContext``/``Strategy.aggregate_fit`` path; it
returns one weighted mean of one parameter list (``[w, w * params]``, divided by the summed
weight) where fedlora needs several named sums (SCAFFOLD's unweighted ``dc/`` and ``count``,
FedNova's ``nova_a``); the legacy ``FitRes`` it rebuilds carries ``num_examples`` and metrics in
the clear; values are ``np.clip``-ped to ``clipping_range`` (default 8) without a word, and a
weight above ``max_weight`` only logs a warning; its modulus is at most 2^32 (coarse fixed point);
and its mask generator ``pseudo_rand_gen`` folds each seed to 32 bits for numpy's Mersenne
Twister, so every mask has at most 2^32 possible values. So fedlora builds a Message-API secure
sum and takes from ``flwr.common.secure_aggregation`` what is sound: Fernet encryption of shares
(``encrypt``/``decrypt``) and the share envelope (``share_keys_plaintext_concat``). Key agreement
is X25519 + HKDF-SHA256 from ``cryptography``; masks are ChaCha20 key streams (256-bit seeds).
Shamir sharing is our own, over the prime field GF(2^521 - 1) in Python integers: flwr's
``combine_shares`` (pycryptodome, GF(2^128), interpolation in pure Python) took 52 ms per secret
at t = 26, 2.6 s of server time per round at 50 sites and growing as N t^2; ours takes well under
a millisecond, and a wrong set of shares is detected (the result does not fit 32 bytes).

Protocol, one session per round, for the sites U0 the server chose (the cohort, which every
site is told) and threshold t, 2t > |U0|:

1. advertise keys: each site makes two X25519 key pairs, c (share channel) and s (masks); the
   server forwards all public keys to the sites that answered, U1 (|U1| >= t, U1 within U0).
2. share keys: each site draws a self-mask seed b_i, Shamir-shares b_i and its mask secret key
   s_i (t of |U1| shares reconstruct), and encrypts one pair of shares per peer under the
   c-key agreed with that peer. Senders of a complete set form U2 (|U2| >= t).
3. masked input: each site i in U2 trains, encodes its vector x_i in fixed point modulo 2^w
   (w = 32 or 64 per key, see below) and sends  y_i = x_i + PRG(b_i) + sum_{j in U2, j > i}
   PRG(s_ij) - sum_{j in U2, j < i} PRG(s_ij)  (s_ij = the s-key agreed by i and j). Senders
   form U3 (|U3| >= t).
4. confirm (Bonawitz et al.'s consistency check; run when sites dropped after sharing keys,
   U3 != U2, and a site asks for it): the server sends U3 to the survivors, and each that
   finds U3 within the sites it heard from (its own U2), itself in it and |U3| >= t signs U3,
   once per session.
5. unmask: each survivor sends its shares of b_j for j in U3 and of s_j for j in U2 \\ U3, never
   both for one site. From t shares each, the server removes the survivors' self masks and the
   dropped sites' pairwise masks; the pairwise masks among survivors cancel in the sum.

Threat model: a server that looks at everything it sees and deviates from the protocol where it
likes, plus sites that drop at any stage; no site colludes with the server. A site reveals one
kind of share per peer, yet a server that tells different survivors different drop lists can
collect both kinds across them: with five sites and t = 3, relay to site 0 only the shares of
sites 1 and 2 (site 0 then pairs its masks with those two alone), tell site 1 that 2 dropped,
site 2 that 1 dropped, sites 3 and 4 that both did, and all four that 0 survived: they reveal
b_0, s_1 and s_2, and site 0's masked input is its update (tests/test_drop_lists.py). The
confirmation stops that: a site reveals mask keys s_j (of sites it is told dropped) only for
the U3 it confirmed and only when t sites of the session signed that same U3, and since each
site signs one U3 and 2t > |U0|, no two survivor sets can both be confirmed; with one U3 for
every site that answers, and U3 within each one's U2, the server learns the sum over U3 and
nothing about a smaller part of it. A site told that no one dropped reveals self-mask shares
alone (for the U2 it heard from, all of it), and without any s_j no pairwise mask comes off:
the inputs whose masks cancel are a set closed under "heard from", at least t sites (each
heard from t), of which 2t > |U0| leaves room for one. So a round without dropouts needs no
confirmation, and the stage costs a message round trip only in a round where a site dropped.
The signatures need keys the server cannot make, so a site checks them only with a roster of
its peers, and asks for the stage only then (this module keeps the sets; the daemon signs and
checks, fedlora.secure.identity). Likewise a server that forges sites' public keys holds the
shares it sends to them: this module cannot tell. In deployment every site signs its public
keys with the digest of the session's terms (the federation's run config, t, the value bound,
U0, and in a session set up in its own round the training content), and a site with a roster
accepts only keys its peers signed for the session and those terms (checked before the share
stage), and confirms only a U3 whose inputs were all trained from the content it trained from.

Fixed point (``FixedPoint``): each value x with |x| <= B (its key's bound) becomes
q = round(x * 2^f) in two's complement modulo 2^w, w = 32 or 64 bits, with f = (w - 2) -
ceil(log2(N * B)) for N sites, so the sum of N encoded values stays within 2^(w-2) + N/2 in
magnitude and decodes without wrapping. ``FixedPoint.choose`` picks the width from N and B: 32
bits when they leave at least 24 fractional bits (N * B <= 64), else 64; its docstring holds the
overflow analysis and the error bound. A value beyond B (or not finite) raises
``ValueOutOfRange`` naming its key; nothing is clipped. The decoded sum S' of m <= N inputs
satisfies, per element,

    |S' - sum_i x_i| <= m * 2^-(f+1) + 2^-52 * sum_i |x_i|

(m rounding errors of half a step when encoding; the second term is float64 rounding when a
64-bit integer sum is turned back into a float, the same order as a float64 sum's own error).

Bounds: the session's value bound B (default 2^30) covers every key; a site may give key prefixes
a tighter bound that the federation's config guarantees to all (``clipped_range``: under
client-level DP the data-carrying vectors are clipped to L2 norm C), so those keys can go in 32
bits while counts and statistics keep 64. The default B = 2^30 covers n_i * delta_i for sites with
up to millions of rows and FedNova's n_i * a_i up to 10^9, so it always needs 64 bits. At N = 10
it leaves f = 28 (step 3.7e-9): a site's rounding error 2^-(f+1) is below float32's |x| 2^-24
(plaintext contributions travel as float32) for every |x| above 2^(23-f) = 0.03; at N = 100,
f = 25 and the same holds above 0.25. Each doubling of B or of N costs one fractional bit.

On the wire a masked input is 64-bit words: the 64-bit values first (one word each, in key
order), then the 32-bit values two to a word; sums and masks work modulo 2^64 on the first part
and modulo 2^32 on each 32-bit lane of the second (``Layout.join``, ``ring_add``). A masked
32-bit value costs 4 bytes, as much as plaintext float32; a 64-bit one twice that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedlora.flower_internals import (
    decrypt,
    encrypt,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

DEFAULT_VALUE_BOUND = 2.0**30
"""Largest |value| a site may contribute unless the caller says otherwise (see module doc)."""
WIDTHS = (32, 64)
"""The moduli 2^w a value may be summed in."""
PRECISION_BITS = 24
"""A 32-bit format must keep at least this many fractional bits (``FixedPoint.choose``)."""
MIN_FRAC_BITS = 16
"""Refuse N * B so large that even 64 bits leave a step coarser than 2^-16."""
CLIP_SLACK = 2.0**-20
"""Relative room above a clip norm C for the float64 rounding of the clip (``clipped_range``)."""
NOISE_SIGMAS = 10.0
"""Gaussian noise is bounded at this many standard deviations (``clipped_range``)."""

_SIGNED = {32: np.int32, 64: np.int64}
_UNSIGNED = {32: np.uint32, 64: np.uint64}
_KEY_BYTES = 32
_PRIME = 2**521 - 1  # Shamir's field: a Mersenne prime above every 32-byte secret
_SHARE_BYTES = 4 + 66  # x (4 bytes) and f(x) < 2^521 (66 bytes), big-endian
_NONCE = bytes(16)  # ChaCha20 nonce: every mask key is used for exactly one stream
_PAIRWISE_INFO = b"fedlora secagg pairwise mask"
_CHANNEL_INFO = b"fedlora secagg share channel"

Arrays = dict[str, np.ndarray]
PublicKeys = tuple[bytes, bytes]
"""(c_pk, s_pk): a site's share-channel and mask public keys, raw X25519 (32 bytes each)."""


class SecAggError(ValueError):
    """The secure sum cannot be completed or a party broke the protocol."""


class ValueOutOfRange(SecAggError):
    """A value exceeds the fixed-point bound: it would wrap, so it is refused."""


# --- fixed point ----------------------------------------------------------------------------


def _ceil_log2(x: Fraction) -> int:
    """The least k with 2^k >= x > 0, computed exactly (a float log2 can round across k)."""
    k = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** k < x:
        k += 1
    while Fraction(2) ** (k - 1) >= x:
        k -= 1
    return k


def _frac_bits(num_sites: int, value_bound: float, width: int) -> int:
    """f = (w - 2) - ceil(log2(N * B)): the finest scale with N * B * 2^f <= 2^(w-2)."""
    if width not in WIDTHS:
        raise SecAggError(f"width must be one of {WIDTHS}, got {width}")
    if num_sites < 1:
        raise SecAggError(f"num_sites must be >= 1, got {num_sites}")
    if not (math.isfinite(value_bound) and value_bound > 0):
        raise SecAggError(f"value_bound must be a positive number, got {value_bound}")
    return width - 2 - _ceil_log2(num_sites * Fraction(value_bound))


def decode_ints(total: np.ndarray, frac_bits: int) -> np.ndarray:
    """The float64 value of a sum of encoded values: uint32 or uint64 read as two's complement
    of its own width, times 2^-f."""
    total = np.asarray(total)
    if total.dtype not in (np.uint32, np.uint64):
        raise SecAggError(f"encoded values must be uint32 or uint64, got {total.dtype}")
    as_int = total.view(_SIGNED[8 * total.dtype.itemsize])
    return np.ldexp(as_int.astype(np.float64), -frac_bits)


@dataclass(frozen=True)
class FixedPoint:
    """Float64 <-> integers modulo 2^`width` with `frac_bits` fractional bits, safe for the sum
    of `num_sites` values of magnitude <= `value_bound`."""

    num_sites: int
    value_bound: float
    frac_bits: int
    width: int = 64

    @classmethod
    def for_sites(
        cls, num_sites: int, value_bound: float = DEFAULT_VALUE_BOUND, width: int = 64
    ) -> FixedPoint:
        """The finest scale at `width` bits that cannot overflow: f = (w - 2) - ceil(log2(N B))
        (the analysis is in ``choose``). 64 bits: refused below MIN_FRAC_BITS; 32 bits:
        refused below PRECISION_BITS or for N >= 2^31 (``choose`` then takes 64)."""
        frac_bits = _frac_bits(num_sites, value_bound, width)
        if width == 32 and (frac_bits < PRECISION_BITS or num_sites >= 2**31):
            raise SecAggError(
                f"value_bound {value_bound:g} with {num_sites} sites leaves {frac_bits} "
                f"fractional bits in 32 bits (at least {PRECISION_BITS} needed)"
            )
        if frac_bits < MIN_FRAC_BITS:
            raise SecAggError(
                f"value_bound {value_bound:g} with {num_sites} sites leaves {frac_bits} "
                f"fractional bits (at least {MIN_FRAC_BITS} needed): lower the value bound"
            )
        return cls(num_sites, float(value_bound), frac_bits, width)

    @classmethod
    def choose(cls, num_sites: int, value_bound: float = DEFAULT_VALUE_BOUND) -> FixedPoint:
        """The format for summing N = `num_sites` values with |x| <= B = `value_bound`: 32 bits
        when f_32 = 30 - ceil(log2(N B)) >= PRECISION_BITS = 24, i.e. N B <= 2^6 = 64; else
        64 bits with f_64 = 62 - ceil(log2(N B)) (refused below MIN_FRAC_BITS = 16). Every
        party derives it from N (the sites that advertised keys) and B (the session's bound, or
        a key's bound from the federation's config), so all sum in the same ring.

        Why the sum cannot wrap, at width w with f = (w - 2) - ceil(log2(N B)): 2^f <=
        2^(w-2) / (N B). A value is checked |x| <= B (never clipped) and encoded as q =
        rint(x 2^f), so |q| <= B 2^f + 1/2; the sum of m <= N of them, masks removed (they
        cancel modulo 2^w), has |sum q| <= N B 2^f + N/2 <= 2^(w-2) + N/2 < 2^(w-1) (N <
        2^(w-1)). So the sum modulo 2^w, read as a w-bit two's complement integer, is the exact
        integer sum: nothing wraps, whatever the signs. (One bit of guard: with f + 1 the sum of
        N values equal to B is 2^(w-1) when N B is a power of two, one past the largest int_w.)

        Error per element of the decoded sum S' = 2^-f sum q of m inputs: each q is off from
        x 2^f by at most 1/2, so
          w = 32: |S' - sum x| <= m 2^-(f+1), exactly that (an int32 is exact in float64);
          w = 64: |S' - sum x| <= m 2^-(f+1) + 2^-52 sum |x| (float64 rounding of an int64).
        FedAvg, FedProx and SCAFFOLD divide the summed vectors by a summed weight of at least m
        (n_i >= 1, 1 per site under client-level DP; SCAFFOLD's c by the number of sites), so
        their averaged update is off by at most 2^-(f+1) per element, 2^-25 = 3.0e-8 at worst
        in 32 bits (FedNova's by tau_eff, its mean local steps, times that).

        Why 24 bits: plaintext rounds send float32, whose 24-bit significand rounds a value in
        [0.5, 1) (the top of the default client-level clip range, C = 1) by up to 2^-25, the
        same as the fixed point at f = 24; and the federation tests hold a secure run equal to
        the plaintext one within 1e-6 per adapter entry over two rounds, which 2^-25 per round
        meets 16 times over (tests/test_secure_federation.py; measured there under client-level
        DP in 32 bits: the adapters differ by at most 1.2e-7, one float32 ulp of entries near
        1.8, the eval loss by 4e-9 relative). Examples: B = 2^30 (the default) needs 64 bits
        from N = 1; a clip norm C = 1 gives 32 bits (f = 26) at N = 10 and up to N = 63
        (f = 24)."""
        try:
            return cls.for_sites(num_sites, value_bound, 32)
        except SecAggError:
            return cls.for_sites(num_sites, value_bound, 64)

    @property
    def step(self) -> float:
        """The quantisation step 2^-f."""
        return math.ldexp(1.0, -self.frac_bits)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """round(x * 2^f) as uint32 or uint64 (two's complement of the width); out-of-bound or
        non-finite -> error."""
        x = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(x) | (np.abs(x) > self.value_bound)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueOutOfRange(
                f"value {x.flat[index]!r} at index {index} is outside the secure-aggregation "
                f"range [-{self.value_bound:g}, {self.value_bound:g}] ({int(bad.sum())} values "
                "in all): raise the value bound"
            )
        ints = np.rint(np.ldexp(x, self.frac_bits)).astype(np.int64)
        return ints.astype(_SIGNED[self.width]).view(_UNSIGNED[self.width])

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 value of a sum of at most `num_sites` encoded vectors (mod 2^width)."""
        return decode_ints(np.asarray(total, dtype=_UNSIGNED[self.width]), self.frac_bits)

    def error_bound(self, count: int, abs_sum: np.ndarray | float) -> np.ndarray:
        """Per-element bound on |decoded sum - exact sum| for `count` inputs whose absolute
        values sum to `abs_sum`: count * 2^-(f+1) + 2^-52 * abs_sum (module doc; the second
        term, zero for a 32-bit sum itself, also covers a float64 reference sum's rounding)."""
        return count * self.step / 2 + np.ldexp(np.asarray(abs_sum, dtype=np.float64), -52)


def clipped_range(max_norm: float, noise_std: float = 0.0) -> float:
    """A bound on every coordinate of a vector clipped to L2 norm C = `max_norm`, plus N(0,
    `noise_std`^2) per coordinate: C (1 + 2^-20) + 10 noise_std. A coordinate of a clipped
    vector is at most its norm; the slack covers the float64 rounding of the clip (relative
    d 2^-53, under 1e-10 for a million values). A Gaussian draw exceeds 10 standard deviations
    with probability 2 Phi(-10) = 1.5e-23: once in 10^15 runs of 10^8 noised coordinates, and
    then that site fails with ValueOutOfRange naming the key (never clipped, never wrapped)."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise SecAggError(f"max_norm must be a positive number, got {max_norm}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise SecAggError(f"noise_std must be a number >= 0, got {noise_std}")
    return max_norm * (1 + CLIP_SLACK) + NOISE_SIGMAS * noise_std


# --- contribution dict <-> one vector ----------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Which key sits where in the packed vector: keys sorted, each array flattened (C order);
    once encoded, each key's number format (width, frac_bits)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    formats: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        keys = tuple(sorted(arrays))
        return cls(keys, tuple(tuple(np.shape(arrays[k])) for k in keys))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def pack(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """One float64 vector; the keys and shapes must be exactly this layout's."""
        if set(arrays) != set(self.keys):
            raise SecAggError(
                f"contribution keys differ from the layout: missing "
                f"{sorted(set(self.keys) - set(arrays))}, unexpected "
                f"{sorted(set(arrays) - set(self.keys))}"
            )
        parts = []
        for key, shape in zip(self.keys, self.shapes, strict=True):
            if tuple(np.shape(arrays[key])) != shape:
                raise SecAggError(f"{key!r} has shape {np.shape(arrays[key])}, expected {shape}")
            parts.append(np.asarray(arrays[key], dtype=np.float64).ravel())
        return np.concatenate(parts) if parts else np.zeros(0)

    def unpack(self, vector: np.ndarray) -> Arrays:
        if np.shape(vector) != (self.size,):
            raise SecAggError(f"vector has shape {np.shape(vector)}, layout needs ({self.size},)")
        ends = np.cumsum(self.sizes)
        return {
            key: np.array(vector[end - n : end]).reshape(shape)
            for key, shape, n, end in zip(self.keys, self.shapes, self.sizes, ends, strict=True)
        }

    def key_at(self, index: int) -> str:
        """The key whose values include packed position `index` (to name it in errors)."""
        return self.keys[int(np.searchsorted(np.cumsum(self.sizes), index, side="right"))]

    # the wire: 64-bit words, the 64-bit values first, then the 32-bit ones two to a word ------
    def _formats(self) -> tuple[tuple[int, int], ...]:
        if len(self.formats) != len(self.keys):
            raise SecAggError("the layout has no number format for every key")
        return self.formats

    def count(self, width: int) -> int:
        """How many values are encoded in `width` bits."""
        return sum(n for (w, _), n in zip(self._formats(), self.sizes, strict=True) if w == width)

    @property
    def words(self) -> int:
        """Length of the masked input in 64-bit words: 8 bytes per 64-bit value, 4 per 32-bit."""
        return self.count(64) + (self.count(32) + 1) // 2

    def join(self, wide: np.ndarray, narrow: np.ndarray) -> np.ndarray:
        """The words of the wire from the uint64 values and the uint32 values (one word of
        padding half empty when their number is odd)."""
        narrow = np.asarray(narrow, dtype=np.uint32)
        if narrow.size % 2:
            narrow = np.append(narrow, np.uint32(0))
        return np.concatenate([np.asarray(wide, dtype=np.uint64), narrow.view(np.uint64)])

    def split(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Views of the words as (uint64 values, uint32 lanes incl. any padding lane): writing
        to them writes to `words`."""
        if words.dtype != np.uint64 or words.shape != (self.words,):
            raise SecAggError(
                f"masked input is {words.dtype} {words.shape}, the layout needs uint64 "
                f"({self.words},)"
            )
        wide = self.count(64)
        return words[:wide], words[wide:].view(np.uint32)

    def error_bound(self, count: int, abs_sum: np.ndarray) -> np.ndarray:
        """``FixedPoint.error_bound`` per packed position, each key at its own scale."""
        steps = np.repeat([math.ldexp(1.0, -f) for _, f in self._formats()], self.sizes)
        return count * steps / 2 + np.ldexp(np.asarray(abs_sum, dtype=np.float64), -52)

    def to_config(self) -> dict[str, list[str] | list[int]]:
        """Plain lists for a Flower ConfigRecord: keys, ranks, concatenated dimensions, and
        each key's width and fractional bits."""
        return {
            "keys": list(self.keys),
            "ranks": [len(s) for s in self.shapes],
            "dims": [d for s in self.shapes for d in s],
            "widths": [w for w, _ in self.formats],
            "frac_bits": [f for _, f in self.formats],
        }

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> Layout:
        keys, ranks, dims = list(config["keys"]), list(config["ranks"]), list(config["dims"])
        widths, frac_bits = list(config["widths"]), list(config["frac_bits"])
        if len(ranks) != len(keys) or sum(ranks) != len(dims):
            raise SecAggError("malformed layout: keys, ranks and dims do not match")
        if len(widths) != len(frac_bits) or (widths and len(widths) != len(keys)):
            raise SecAggError("malformed layout: keys, widths and frac_bits do not match")
        if any(w not in WIDTHS for w in widths):
            raise SecAggError(f"malformed layout: widths must be in {WIDTHS}, got {widths}")
        ends = np.cumsum(ranks, dtype=int)
        shapes = tuple(tuple(dims[e - r : e]) for r, e in zip(ranks, ends, strict=True))
        formats = tuple((int(w), int(f)) for w, f in zip(widths, frac_bits, strict=True))
        return cls(tuple(keys), shapes, formats)


def encode_contribution(
    fixed: FixedPoint | Callable[[str], FixedPoint], arrays: Mapping[str, np.ndarray]
) -> tuple[Layout, np.ndarray]:
    """Pack and encode a contribution dict into the words of the wire (module doc), each key in
    its format (`fixed`, or `fixed(key)`); an out-of-range error names the offending key."""
    layout = Layout.of(arrays)
    layout.pack(arrays)  # checks the shapes
    formats = {k: fixed(k) if callable(fixed) else fixed for k in layout.keys}
    parts: dict[int, list[np.ndarray]] = {32: [], 64: []}
    for key in layout.keys:
        try:
            parts[formats[key].width].append(formats[key].encode(np.ravel(arrays[key])))
        except ValueOutOfRange as err:
            raise ValueOutOfRange(f"contribution {key!r}: {err}") from None
    layout = replace(
        layout, formats=tuple((formats[k].width, formats[k].frac_bits) for k in layout.keys)
    )
    wide = np.concatenate(parts[64]) if parts[64] else np.zeros(0, np.uint64)
    narrow = np.concatenate(parts[32]) if parts[32] else np.zeros(0, np.uint32)
    return layout, layout.join(wide, narrow)


def ring_add(layout: Layout, total: np.ndarray, other: np.ndarray, subtract: bool = False) -> None:
    """total += other (or -=) in place, word by word modulo 2^64 over the 64-bit values and
    lane by lane modulo 2^32 over the 32-bit ones (no carry between two lanes of a word)."""
    for a, b in zip(layout.split(total), layout.split(other), strict=True):
        if subtract:
            a -= b
        else:
            a += b


def decode_sum(layout: Layout, words: np.ndarray) -> np.ndarray:
    """The float64 packed vector (key order) of a summed, unmasked input, each key decoded in
    its own format."""
    segments = dict(zip((64, 32), layout.split(words), strict=True))
    offsets = {64: 0, 32: 0}
    out = []
    for (width, frac_bits), n in zip(layout._formats(), layout.sizes, strict=True):
        out.append(decode_ints(segments[width][offsets[width] : offsets[width] + n], frac_bits))
        offsets[width] += n
    return np.concatenate(out) if out else np.zeros(0)


# --- primitives -----------------------------------------------------------------------------


def new_private_key() -> bytes:
    """A fresh X25519 private key, raw 32 bytes (one per key and session: never reused)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def public_key(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw private key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256 of the X25519 shared secret."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public)
    )
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=purpose).derive(
        shared
    )


def channel_key(private: bytes, peer_public: bytes) -> bytes:
    """The Fernet key (urlsafe base64) that encrypts shares between two sites."""
    return base64.urlsafe_b64encode(agree(private, peer_public, _CHANNEL_INFO))


def mask(seed: bytes, size: int) -> np.ndarray:
    """`size` uniform uint64 values from a 32-byte seed (ChaCha20 key stream)."""
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def pairwise_mask(private: bytes, peer_public: bytes, size: int) -> np.ndarray:
    return mask(agree(private, peer_public, _PAIRWISE_INFO), size)


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir's t-of-n sharing: share x = (x, f(x)) for x = 1..n, f a random polynomial of
    degree t - 1 over GF(p) with f(0) = the secret. Fewer than t shares say nothing about it."""
    if not 1 <= threshold <= count < 2**32:
        raise SecAggError(f"cannot split a secret {threshold} of {count}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(_PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, count + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % _PRIME
        shares.append(x.to_bytes(4, "big") + y.to_bytes(_SHARE_BYTES - 4, "big"))
    return shares


def combine_secret(shares: list[bytes], size: int = _KEY_BYTES) -> bytes:
    """f(0) by Lagrange interpolation from t shares; a `size`-byte secret or SecAggError."""
    if any(len(s) != _SHARE_BYTES for s in shares):
        raise SecAggError("malformed secret share")
    points = [(int.from_bytes(s[:4], "big"), int.from_bytes(s[4:], "big")) for s in shares]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SecAggError("two secret shares have the same index")
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        num = den = 1
        for j, x_j in enumerate(xs):
            if j != i:
                num = num * x_j % _PRIME
                den = den * (x_j - x_i) % _PRIME
        secret = (secret + y_i * num * pow(den, -1, _PRIME)) % _PRIME
    if secret.bit_length() > 8 * size:
        raise SecAggError("the secret shares do not combine (wrong or mixed shares)")
    return secret.to_bytes(size, "big")


def check_threshold(threshold: int, num_sites: int) -> None:
    """1 <= t <= n and 2t > n (module doc: no site can be unmasked by lying about drops)."""
    if not 1 <= threshold <= num_sites:
        raise SecAggError(
            f"threshold {threshold} must be between 1 and the number of sites ({num_sites})"
        )
    if 2 * threshold <= num_sites:
        raise SecAggError(
            f"threshold {threshold} must exceed half the {num_sites} sites "
            f"(at least {num_sites // 2 + 1})"
        )


def default_threshold(num_sites: int) -> int:
    """The smallest safe threshold, floor(n/2) + 1: tolerates the most dropouts."""
    return num_sites // 2 + 1


# --- what the server and a checking site both compute ------------------------------------------


@dataclass(frozen=True)
class Revealed:
    """What an unmasking rebuilds: the survivors' self-mask seeds b_j and the mask keys s_d of
    the sites that dropped after sharing theirs."""

    seeds: dict[int, bytes]
    mask_keys: dict[int, bytes]


def unmasked_sum(
    layout: Layout,
    masked_sum: np.ndarray,
    survivor_keys: Mapping[int, bytes],
    revealed: Revealed,
) -> np.ndarray:
    """The float64 sum (packed in key order) of the inputs whose masked sum is `masked_sum`:
    each survivor's self mask removed, and each dropped site's pairwise masks with every
    survivor (`survivor_keys`: survivor -> its mask public key); the pairwise masks among
    survivors cancel. The server's last step, and a site's when it checks the sum a global
    adapter came from (fedlora.apps.evidence)."""
    total = masked_sum.copy()
    for j in survivor_keys:
        ring_add(layout, total, mask(revealed.seeds[j], total.size), subtract=True)
    for d, s_d in revealed.mask_keys.items():
        for j, p_j in survivor_keys.items():  # j added +PRG(s_jd) if d > j, -PRG(s_jd) if d < j
            ring_add(layout, total, pairwise_mask(s_d, p_j, total.size), subtract=d > j)
    return decode_sum(layout, total)


def input_digest(layout: Layout, masked: np.ndarray) -> bytes:
    """SHA-256 of a masked input as it travels: its layout, then its words."""
    h = hashlib.sha256(json.dumps(layout.to_config(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(masked, dtype="<u8").tobytes())
    return h.digest()


def seed_commitment(seed: bytes) -> bytes:
    """A site's commitment to its self-mask seed b_i, signed with its masked input before b_i
    is revealed: a server that relays a b_i of its choosing is caught."""
    return hashlib.sha256(b"fedlora self-mask seed\n" + seed).digest()


# --- the site's side ---------------------------------------------------------------------------


@dataclass
class SecAggClient:
    """One site's secrets and progress in one session; `to_state`/`from_state` let it live in
    Flower's `context.state` between the stages' messages."""

    session: int
    site: int
    threshold: int
    value_bound: float
    c_sk: bytes
    s_sk: bytes
    seed: bytes  # b_i, the self-mask seed
    stage: str = "keys"
    #: key prefix -> a tighter bound than value_bound that the federation's config guarantees
    key_bounds: dict[str, float] = field(default_factory=dict)
    #: the sites the server asked into the session, U0 (empty: the keys it relays, U1)
    cohort: list[int] = field(default_factory=list)
    #: digest of what the keys were advertised with (the federation's terms, and the round's
    #: training content when it came with them); opaque here, signed with the keys by a daemon
    terms: bytes = b""
    peers: dict[int, PublicKeys] = field(default_factory=dict)  # U1, self included
    own_shares: tuple[bytes, bytes] = (b"", b"")  # this site's share of its own (b_i, s_i)
    shares: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # from U2: (b_j, s_j)
    confirmed: list[int] = field(default_factory=list)  # the U3 this site confirmed, if any

    @classmethod
    def create(
        cls,
        session: int,
        site: int,
        threshold: int,
        value_bound: float = DEFAULT_VALUE_BOUND,
        key_bounds: Mapping[str, float] | None = None,
        terms: bytes = b"",
        cohort: Iterable[int] = (),
    ) -> SecAggClient:
        """`key_bounds`: key prefix -> bound for the keys that start with it (the longest
        matching prefix wins), in place of `value_bound`; see ``FixedPoint.choose``. `cohort`:
        U0, the sites the server asked into the session (2t must exceed their number)."""
        if threshold < 1:
            raise SecAggError(f"threshold must be >= 1, got {threshold}")
        cohort = sorted(int(j) for j in cohort)
        if cohort:
            if site not in cohort:
                raise SecAggError(f"site {site}: asked into a session of sites {cohort}")
            check_threshold(threshold, len(cohort))
        key_bounds = {str(k): float(b) for k, b in (key_bounds or {}).items()}
        for bound in (value_bound, *key_bounds.values()):
            FixedPoint.choose(1, bound)  # validate the bounds early
        return cls(
            session=session,
            site=site,
            threshold=threshold,
            value_bound=float(value_bound),
            c_sk=new_private_key(),
            s_sk=new_private_key(),
            seed=os.urandom(_KEY_BYTES),
            key_bounds=key_bounds,
            cohort=cohort,
            terms=terms,
        )

    def public_keys(self) -> PublicKeys:
        """Stage 1 reply: (c_pk, s_pk)."""
        return public_key(self.c_sk), public_key(self.s_sk)

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                f"site {self.site}: message out of order (session at {self.stage!r}, "
                f"this step needs {stage!r})"
            )

    @property
    def fixed_point(self) -> FixedPoint:
        """The format of the keys under the session's value bound."""
        return FixedPoint.choose(len(self.peers), self.value_bound)

    def bound(self, key: str) -> float:
        """The largest |value| `key` may hold: its longest prefix's bound, else value_bound."""
        prefixes = [p for p in self.key_bounds if key.startswith(p)]
        return self.key_bounds[max(prefixes, key=len)] if prefixes else self.value_bound

    def fixed_point_for(self, key: str) -> FixedPoint:
        """The format `key` is encoded in: chosen from the cohort U1 and the key's bound."""
        return FixedPoint.choose(len(self.peers), self.bound(key))

    def share_keys(self, peers: Mapping[int, PublicKeys]) -> dict[int, bytes]:
        """Stage 2: Shamir-share (b_i, s_i) among U1; one ciphertext per other site."""
        self._expect("keys")
        if peers.get(self.site) != self.public_keys():
            raise SecAggError(f"site {self.site}: the server did not relay this site's own keys")
        if self.cohort and not set(peers) <= set(self.cohort):
            raise SecAggError(
                f"site {self.site}: keys of sites {sorted(set(peers) - set(self.cohort))}, "
                f"outside the session's sites {self.cohort}"
            )
        check_threshold(self.threshold, len(peers))
        all_keys = [k for pair in peers.values() for k in pair]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(f"site {self.site}: two sites advertised the same public key")
        order = sorted(peers)
        b_shares = split_secret(self.seed, self.threshold, len(order))
        s_shares = split_secret(self.s_sk, self.threshold, len(order))
        out: dict[int, bytes] = {}
        for j, b_share, s_share in zip(order, b_shares, s_shares, strict=True):
            if j == self.site:
                self.own_shares = (b_share, s_share)
                continue
            plain = share_keys_plaintext_concat(self.site, j, b_share, s_share)
            out[j] = encrypt(channel_key(self.c_sk, peers[j][0]), plain)
        self.peers = dict(peers)
        self.stage = "shared"
        return out

    def mask_input(
        self, contribution: Mapping[str, np.ndarray], ciphertexts: Mapping[int, bytes]
    ) -> tuple[Layout, np.ndarray]:
        """Stage 3: keep the shares U2 sent, then y_i = encode(x_i) + masks (module doc).
        Returns the layout (sent in the clear: keys, shapes and number formats) and y_i, the
        words of the wire."""
        self._expect("shared")
        if len(ciphertexts) + 1 < self.threshold:
            raise SecAggError(
                f"site {self.site}: only {len(ciphertexts) + 1} sites shared keys, "
                f"threshold is {self.threshold}"
            )
        shares: dict[int, tuple[bytes, bytes]] = {}
        for j, ciphertext in ciphertexts.items():
            if j == self.site or j not in self.peers:
                raise SecAggError(f"site {self.site}: shares from unknown site {j}")
            try:
                plain = decrypt(channel_key(self.c_sk, self.peers[j][0]), ciphertext)
            except InvalidToken:
                raise SecAggError(f"site {self.site}: the shares from {j} do not decrypt") from None
            src, dst, b_share, s_share = share_keys_plaintext_separate(plain)
            if (src, dst) != (j, self.site):
                raise SecAggError(f"site {self.site}: a share from {j} claims {src} -> {dst}")
            shares[j] = (b_share, s_share)
        layout, masked = encode_contribution(self.fixed_point_for, contribution)
        ring_add(layout, masked, mask(self.seed, masked.size))
        for j in shares:
            pair = pairwise_mask(self.s_sk, self.peers[j][1], masked.size)
            ring_add(layout, masked, pair, subtract=j < self.site)
        self.shares = shares
        self.stage = "masked"
        return layout, masked

    def _check_enough(self, alive: set[int]) -> None:
        if len(alive) < self.threshold:
            raise SecAggError(
                f"site {self.site}: {len(alive)} survivors, threshold is {self.threshold}"
            )

    def confirm(self, survivors: Iterable[int]) -> None:
        """Stage 4: accept U3, once: within the sites this site heard from, this site in it,
        at least t of them. The unmasking then answers for this U3 alone."""
        self._expect("masked")
        alive, u2 = set(survivors), set(self.shares) | {self.site}
        if not alive <= u2 or self.site not in alive:
            raise SecAggError(
                f"site {self.site}: survivors {sorted(alive)} are not among the sites that "
                f"shared keys with it {sorted(u2)}, with it"
            )
        self._check_enough(alive)
        self.confirmed = sorted(alive)
        self.stage = "confirmed"

    def unmask(
        self, survivors: Iterable[int], dropped: Iterable[int]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Stage 5: shares of b_j for survivors and of s_j for dropped sites, never both; after
        a confirmation, for the survivors it confirmed only."""
        if self.stage != "confirmed":
            self._expect("masked")
        alive, gone = set(survivors), set(dropped)
        if self.confirmed and sorted(alive) != self.confirmed:
            raise SecAggError(
                f"site {self.site}: survivors {sorted(alive)}, but it confirmed {self.confirmed}"
            )
        u2 = set(self.shares) | {self.site}
        if alive & gone or alive | gone != u2 or self.site not in alive:
            raise SecAggError(
                f"site {self.site}: survivors {sorted(alive)} and dropped {sorted(gone)} do not "
                f"split the sites that shared keys {sorted(u2)}"
            )
        self._check_enough(alive)
        mine = {self.site: self.own_shares} | self.shares
        self.stage = "done"
        return {j: mine[j][0] for j in sorted(alive)}, {j: mine[j][1] for j in sorted(gone)}

    def to_state(self) -> dict[str, int | float | str | bytes | list[int] | list[bytes]]:
        """Plain values only (fits a Flower ConfigRecord)."""
        order, senders = sorted(self.peers), sorted(self.shares)
        return {
            "session": self.session,
            "site": self.site,
            "threshold": self.threshold,
            "value_bound": self.value_bound,
            "c_sk": self.c_sk,
            "s_sk": self.s_sk,
            "seed": self.seed,
            "stage": self.stage,
            "peer_ids": order,
            "peer_c_pks": [self.peers[j][0] for j in order],
            "peer_s_pks": [self.peers[j][1] for j in order],
            "own_shares": list(self.own_shares),
            "share_ids": senders,
            "b_shares": [self.shares[j][0] for j in senders],
            "s_shares": [self.shares[j][1] for j in senders],
            "bound_prefixes": list(self.key_bounds),
            "bound_values": list(self.key_bounds.values()),
            "cohort": self.cohort,
            "terms": self.terms,
            "confirmed": self.confirmed,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> SecAggClient:
        peers = zip(state["peer_ids"], state["peer_c_pks"], state["peer_s_pks"], strict=True)
        shares = zip(state["share_ids"], state["b_shares"], state["s_shares"], strict=True)
        own = tuple(state["own_shares"])
        return cls(
            session=int(state["session"]),
            site=int(state["site"]),
            threshold=int(state["threshold"]),
            value_bound=float(state["value_bound"]),
            c_sk=bytes(state["c_sk"]),
            s_sk=bytes(state["s_sk"]),
            seed=bytes(state["seed"]),
            stage=str(state["stage"]),
            peers={int(j): (bytes(c), bytes(s)) for j, c, s in peers},
            own_shares=(bytes(own[0]), bytes(own[1])),
            shares={int(j): (bytes(b), bytes(s)) for j, b, s in shares},
            key_bounds={
                str(k): float(b)
                for k, b in zip(state["bound_prefixes"], state["bound_values"], strict=True)
            },
            cohort=[int(j) for j in state["cohort"]],
            terms=bytes(state["terms"]),
            confirmed=[int(j) for j in state["confirmed"]],
        )


# --- the server's side -------------------------------------------------------------------------


@dataclass
class SecAggServer:
    """The server's view of one session: public keys, routed ciphertexts, the masked SUM (never
    a single site's input in the clear), and the shares that remove the masks."""

    threshold: int
    value_bound: float = DEFAULT_VALUE_BOUND
    peers: dict[int, PublicKeys] = field(default_factory=dict)  # U1
    sharers: list[int] = field(default_factory=list)  # U2
    survivors: list[int] = field(default_factory=list)  # U3
    layout: Layout | None = None  # the keys, shapes and number formats of the inputs
    masked_sum: np.ndarray | None = None
    revealed: Revealed | None = None  # after the unmasking

    def _enough(self, what: str, sites: Iterable[int]) -> list[int]:
        sites = sorted(sites)
        if len(sites) < self.threshold:
            raise SecAggError(
                f"only {len(sites)} sites {what} (sites {sites}); secure aggregation needs at "
                f"least the threshold of {self.threshold}"
            )
        return sites

    @property
    def fixed_point(self) -> FixedPoint:
        """The format of the keys under the session's value bound."""
        return FixedPoint.choose(len(self.peers), self.value_bound)

    def receive_keys(self, keys: Mapping[int, PublicKeys]) -> dict[int, PublicKeys]:
        """Stage 1: U1 = the sites that advertised keys; returns what every site gets."""
        self._enough("advertised keys", keys)
        check_threshold(self.threshold, len(keys))
        self.peers = {int(j): (bytes(c), bytes(s)) for j, (c, s) in sorted(keys.items())}
        return dict(self.peers)

    def route_shares(self, sent: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2: U2 = senders of a ciphertext for every other site in U1; returns, per
        recipient in U2, the ciphertexts addressed to it by the rest of U2."""
        complete = [
            i for i, out in sent.items() if i in self.peers and set(out) == set(self.peers) - {i}
        ]
        self.sharers = self._enough("shared keys", complete)
        return {j: {i: sent[i][j] for i in self.sharers if i != j} for j in self.sharers}

    def receive_masked(
        self, masked: Mapping[int, np.ndarray], layout: Layout | None
    ) -> tuple[list[int], list[int]]:
        """Stage 3: add the masked inputs of U3, all in `layout` (modulo 2^64 or 2^32 per
        value, ``ring_add``); returns (survivors, dropped)."""
        arrived = {i: np.asarray(y) for i, y in masked.items() if i in self.sharers}
        self.survivors = self._enough("sent masked inputs", arrived)
        if layout is None:
            raise SecAggError("masked inputs without a layout")
        sizes = {(str(y.dtype), y.shape) for y in arrived.values()}
        if sizes != {("uint64", (layout.words,))}:
            raise SecAggError(
                f"masked inputs differ in shape or type: {sorted(sizes)}, the layout needs "
                f"uint64 ({layout.words},)"
            )
        total = np.zeros(layout.words, dtype=np.uint64)
        for i in self.survivors:
            ring_add(layout, total, arrived[i])
        self.layout = layout
        self.masked_sum = total
        return list(self.survivors), sorted(set(self.sharers) - set(self.survivors))

    def receive_confirmations(self, sites: Iterable[int]) -> list[int]:
        """Stage 4: the survivors that confirmed U3 (at least t), who are asked to unmask."""
        return self._enough("confirmed the survivors", set(sites) & set(self.survivors))

    def unmask(
        self, responses: Mapping[int, tuple[Mapping[int, bytes], Mapping[int, bytes]]]
    ) -> np.ndarray:
        """Stage 5: from the survivors' (b shares, s shares), the float64 sum of U3's inputs
        (packed in the layout's key order). The rebuilt seeds and mask keys are kept
        (`revealed`): what a site needs to recompute the sum (fedlora.apps.evidence)."""
        if self.masked_sum is None or self.layout is None:
            raise SecAggError("unmask before the masked inputs arrived")
        responders = self._enough("sent unmasking shares", set(responses) & set(self.survivors))
        dropped = sorted(set(self.sharers) - set(self.survivors))
        seeds = {
            j: self._combine(j, [responses[r][0].get(j) for r in responders])
            for j in self.survivors
        }
        mask_keys = {}
        for d in dropped:
            mask_keys[d] = self._combine(d, [responses[r][1].get(d) for r in responders])
            if public_key(mask_keys[d]) != self.peers[d][1]:
                raise SecAggError(f"the shares of dropped site {d} rebuild a wrong mask key")
        self.revealed = Revealed(seeds, mask_keys)
        survivors = {j: self.peers[j][1] for j in self.survivors}
        return unmasked_sum(self.layout, self.masked_sum, survivors, self.revealed)

    def _combine(self, site: int, shares: list[bytes | None]) -> bytes:
        given = [s for s in shares if s]
        if len(given) < self.threshold:
            raise SecAggError(
                f"only {len(given)} shares for site {site}, threshold is {self.threshold}"
            )
        try:
            return combine_secret(given[: self.threshold])
        except SecAggError as err:
            raise SecAggError(f"site {site}: {err}") from None
