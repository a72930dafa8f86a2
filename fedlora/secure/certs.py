"""Key material of a federation: a CA, the server's TLS certificate, and each site's
node-authentication key pair, made with `cryptography` in the formats Flower 1.41 reads.

- TLS: the server presents `server.pem` (signed by `ca.pem`, with the host names and IP
  addresses the sites dial as subject alternative names); every site verifies it against
  `ca.pem`. Flower's transport has no client certificates: a site proves who it is with its
  node-authentication key instead.
- Node authentication: `flower-supernode --auth-supernode-private-key` loads an unencrypted
  OpenSSH private key on a NIST curve (`load_ssh_private_key`), and the SuperLink's control API
  registers the matching OpenSSH public key (`flwr supernode register KEY.pub` reads it with
  `load_ssh_public_key`). Flower itself generates P-384 keys, so fedlora does too.

Layout under the output folder (documented in server/README.md)::

    ca.pem  ca.key                      federation CA (ca.key never leaves this machine)
    server.pem  server.key              the server's TLS certificate and key
    sites/<name>/auth.key  auth.pub     a site's node-authentication key pair

Private keys are written 0600 (created with that mode, never widened); nothing that exists is
overwritten unless `force` is given, and the CA is never replaced (a new CA is a new federation).
A site can make its own key pair (`fedlora certs DIR --site NAME` on the site's machine), so its
private key never travels; only auth.pub goes to the server operator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import FedloraError

CURVE = ec.SECP384R1
CA_DAYS = 3650

#: a site name is a file name and a TOML key: letters, digits, '-', '_', '.'
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Layout:
    """Where each file of a federation's key material lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def site_key(self, name: str) -> Path:
        return self.root / "sites" / name / "auth.key"

    def site_public_key(self, name: str) -> Path:
        return self.root / "sites" / name / "auth.pub"


@dataclass
class Issued:
    """What `make_certs` wrote and what it reused."""

    written: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)


def check_site_name(name: str) -> str:
    if not SITE_NAME.match(name):
        raise FedloraError(
            f"Site name {name!r} is not valid: use 1-64 letters, digits, '.', '-' or '_', "
            "starting with a letter or digit."
        )
    return name


def parse_ips(values: list[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_address(value))
        except ValueError:
            raise FedloraError(f"--server-ip {value!r} is not an IP address.") from None
    return out


def write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start (no window in which others can read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(
    common_name: str = "fedlora federation CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[str],
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate whose subject alternative names are exactly what sites dial."""
    if not names and not ips:
        raise FedloraError(
            "The server certificate needs at least one --server-name or --server-ip."
        )
    key = ec.generate_private_key(CURVE())
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ip) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else str(ips[0])))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_keys() -> tuple[bytes, bytes]:
    """(private, public) node-authentication key pair as OpenSSH bytes, as Flower loads them."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + b"\n"


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A site's OpenSSH public key; refused unless it is an EC key on a NIST curve (what the
    SuperLink accepts)."""
    if not path.is_file():
        raise FedloraError(f"Site public key {path} does not exist.")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FedloraError(f"{path} is not an OpenSSH public key ({exc}).") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in (
        "secp256r1",
        "secp384r1",
        "secp521r1",
    ):
        raise FedloraError(
            f"{path} must be an EC public key on a NIST curve (P-256/384/521); make one with "
            "`fedlora certs DIR --site NAME`."
        )
    return key


def make_certs(
    out: Path,
    *,
    server_names: list[str],
    server_ips: list[str],
    sites: list[str],
    days: int = 825,
    force: bool = False,
) -> Issued:
    """Create what is asked under `out`: the server certificate when names/IPs are given
    (signed by the folder's CA, which is created first if there is none) and one key pair per
    site (no CA involved: a site can make its own and hand over only auth.pub). Checks every
    target before writing anything, so a refusal leaves the folder as it was."""
    layout = Layout(out)
    ips = parse_ips(server_ips)
    for name in sites:
        check_site_name(name)
    if len(set(sites)) != len(sites):
        raise FedloraError("A site name is given twice.")
    want_server = bool(server_names or ips)
    if days < 1:
        raise FedloraError(f"--days must be at least 1 (got {days}).")
    if not want_server and not sites:
        raise FedloraError(
            "Nothing to make: give --server-name/--server-ip for the server certificate and/or "
            "--site NAME for a site's key pair."
        )
    targets = [layout.server_cert, layout.server_key] if want_server else []
    for name in sites:
        targets += [layout.site_key(name), layout.site_public_key(name)]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FedloraError(
            f"{existing[0]} already exists; refusing to overwrite key material (pass --force to "
            "replace it, e.g. to rotate a site's key)."
        )
    if want_server and layout.ca_cert.exists() != layout.ca_key.exists():
        raise FedloraError(
            f"{out} holds only half of the CA ({layout.ca_cert.name} / {layout.ca_key.name}); "
            "restore the missing file (the server certificate is signed with ca.key)."
        )
    issued = Issued()
    if want_server:
        if layout.ca_cert.exists():
            ca_key, ca_cert = load_ca(layout)
            issued.reused.append(layout.ca_cert)
        else:
            ca_key, ca_cert = make_ca()
            write_private(layout.ca_key, _pem_key(ca_key))
            write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
            issued.written += [layout.ca_cert, layout.ca_key]
        key, cert = make_server_cert(ca_key, ca_cert, server_names, ips, days)
        write_private(layout.server_key, _pem_key(key))
        write_public(layout.server_cert, cert.public_bytes(serialization.Encoding.PEM))
        issued.written += [layout.server_cert, layout.server_key]
    for name in sites:
        private, public = make_site_keys()
        write_private(layout.site_key(name), private)
        write_public(layout.site_public_key(name), public)
        issued.written += [layout.site_key(name), layout.site_public_key(name)]
    return issued


def load_ca(layout: Layout) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except (ValueError, TypeError) as exc:
        raise FedloraError(f"Cannot read the CA in {layout.root}: {exc}.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise FedloraError(f"{layout.ca_key} does not belong to {layout.ca_cert}.")
    return key, cert
