"""Who stands behind a secure-aggregation key, what it trained from, and which sum it helps
unmask: every site daemon signs the keys it advertises, the training content it trained from
and the survivor set it confirms with its node-authentication key, and a site with a roster of
its peers (site.toml `[peers]`: name = fingerprint of that site's key) takes part in a session
only when every other key in it is signed by a peer on the roster that has a roster too (each
signs that with its keys: a peer without one would help unmask any sum), and unmasks a sum only
when every input came from its content and t peers confirmed the same survivors.

Why: secure aggregation hides a site's update in a sum of at least t inputs, and distributed
client-level noise is split over those t. A server that invents sites (keys whose secrets it
holds) can open a session of one real site and t - 1 of its own: their shares of the real
site's self-mask and their pairwise keys unmask its update, carrying 1/t of the noise. Node
authentication does not stop that: the server registers the nodes. The roster comes to a site
from its peers (the consortium's agreement, a call between operators), so the server can
relay the signatures but not make them.

Written here because no library signs secure-aggregation keys for Flower's Message API (Bonawitz
et al. 2017 sign them the same way, with keys from a trusted registry). The statements a site
signs are domain-separated (Flower's node authentication signs only timestamps with the same
key) and length-prefixed, and name the federation, the session's round, the site's index and
name: a signature holds for that session alone. One covers the site's two public keys, checked
before the site shares its secrets; one the training content it trained from, checked before
it confirms the survivors (every input in the sum must come from the same content); one the
survivor set, checked before it reveals unmasking shares; one its masked input (with its
content, self-mask seed commitment and mask key), checked by the sites of the next round before
they train from the adapter made of the sum. ECDSA over SHA-384 and the key formats come from
`cryptography`; a fingerprint is OpenSSH's (`ssh-keygen -lf auth.pub` prints the same).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.errors import FedloraError

KEYS = b"fedlora secure-aggregation keys v3\n"
CONTENT = b"fedlora secure-aggregation content v1\n"
SURVIVORS = b"fedlora secure-aggregation survivors v1\n"
INPUT = b"fedlora secure-aggregation input v1\n"
FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def fingerprint(public_key: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of an OpenSSH public key line ("ecdsa-sha2-... AAAA...")."""
    try:
        blob = base64.b64decode(public_key.split()[1], validate=True)
    except (IndexError, binascii.Error):
        raise ValueError("not an OpenSSH public key line") from None
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def check_fingerprint(value: object, where: str) -> str:
    if not isinstance(value, str) or not FINGERPRINT.match(value):
        raise FedloraError(
            f'{where} must be a key fingerprint such as "SHA256:{"x" * 43}" (got {value!r}): '
            "`fedlora certs` prints it when it makes a site's key, and `ssh-keygen -lf auth.pub` "
            "shows it."
        )
    return value


def keys_statement(
    federation: str,
    session: int,
    site: int,
    name: str,
    c_pk: bytes,
    s_pk: bytes,
    terms: bytes = b"",
    rostered: bool = False,
) -> bytes:
    """What a site signs when it advertises its keys for one session. `terms`: the digest of
    what the keys came with (fedlora.apps.records.session_terms): the federation's run config,
    and in a session set up in its own round the training content, so that a site sees, before
    it masks anything, that every peer trains under the same config from the same content.
    `rostered`: the site has a roster of its peers, so it checks what they sign (their
    content, the survivors they confirm) before it helps unmask anyone."""
    flag = b"rostered" if rostered else b""
    return _statement(KEYS, federation, session, site, name, c_pk, s_pk, terms, flag)


def content_statement(federation: str, session: int, site: int, name: str, digest: bytes) -> bytes:
    """What a site signs with its masked input: the digest of the training content it trained
    from (fedlora.apps.records.content_digest). Every site of a sum must have trained from the
    same: a server that sends one site the round's adapter and the others one whose B factors
    are zero (near-zero gradients, near-zero updates) reads that site's update from the sum
    (Pasquini et al. 2022, model inconsistency)."""
    return _statement(CONTENT, federation, session, site, name, digest)


def input_statement(
    federation: str,
    session: int,
    site: int,
    name: str,
    content: bytes,
    masked: bytes,
    seed: bytes,
    s_pk: bytes,
    rostered: bool,
) -> bytes:
    """What a site signs with its masked input besides the content statement: the digest of
    the content it trained from, of the masked input (fedlora.secure.secagg.input_digest), the
    commitment to its self-mask seed (`seed_commitment`), its mask public key and whether it has
    a roster. With these a site of a later round recomputes the sum the server made and checks
    the global adapter it is sent against it (fedlora.apps.evidence): a server cannot swap an
    input, a seed or a key without breaking a signature."""
    flag = b"rostered" if rostered else b""
    return _statement(INPUT, federation, session, site, name, content, masked, seed, s_pk, flag)


def survivors_statement(
    federation: str, session: int, site: int, name: str, survivors: list[int]
) -> bytes:
    """What a site signs when it confirms a session's survivor set, the sites whose masked
    inputs are in the sum; it signs one per session (fedlora.secure.secagg: a server that tells
    different sites different survivors could otherwise unmask one site)."""
    listed = ",".join(str(j) for j in sorted(survivors)).encode()
    return _statement(SURVIVORS, federation, session, site, name, listed)


def _statement(
    domain: bytes, federation: str, session: int, site: int, name: str, *values: bytes
) -> bytes:
    parts = [federation.encode(), str(session).encode(), str(site).encode(), name.encode()]
    return domain + b"".join(len(p).to_bytes(4, "big") + p for p in [*parts, *values])


@dataclass(frozen=True)
class Proof:
    """A site's signature on a statement: its name, its public key (OpenSSH), the signature."""

    name: str
    public_key: bytes
    signature: bytes

    def holds(self, expected_fingerprint: str, statement: bytes) -> bool:
        """The key is the one the roster names and it signed `statement`."""
        try:
            if fingerprint(self.public_key) != expected_fingerprint:
                return False
            key = serialization.load_ssh_public_key(self.public_key)
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return False
            key.verify(self.signature, statement, ec.ECDSA(hashes.SHA384()))
        except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature):
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A site daemon's name and node-authentication private key."""

    name: str
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, name: str, path: Path) -> Signer:
        try:
            key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise FedloraError(f"Cannot read this site's key {path}: {exc}.") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FedloraError(f"{path} is not an EC private key; make one with `fedlora certs`.")
        return cls(name, key)

    def public_key(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )

    def prove(self, statement: bytes) -> Proof:
        signature = self.key.sign(statement, ec.ECDSA(hashes.SHA384()))
        return Proof(self.name, self.public_key(), signature)
