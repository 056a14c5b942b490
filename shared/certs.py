"""Certificates for mTLS: one CA, one server certificate, one client certificate per silo.

`make_certs` writes, under one folder: `ca.pem` / `ca.key`, `server.pem` / `server.key` (SANs:
the given host names and IPs, plus localhost and 127.0.0.1), and `<silo>.pem` / `<silo>.key`
with CN = the silo name (the server takes a silo's identity from this CN and from nothing
else). Keys are written 0600. An existing CA is never overwritten unless `force=True`: new
certificates would lock out every silo that holds the old ones.

`check_pair` and `verify_signed_by` serve `crosslm-client check`: they say, in words a partner
site can act on, what is wrong with a certificate, key or CA file.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crosslm_shared.errors import ConfigError

SILO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
RESERVED_NAMES = frozenset({"ca", "server"})


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    server_cert: Path
    server_key: Path
    silos: dict[str, tuple[Path, Path]]  # silo -> (cert, key)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CrossLM"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # also when the file already existed with looser bits


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def check_silo_names(silos: Sequence[str]) -> None:
    for silo in silos:
        if not SILO_NAME_RE.match(silo) or silo in RESERVED_NAMES:
            raise ConfigError(f"silo name {silo!r} is invalid; use letters, digits, '.', '_' or '-' "
                              f"(at most 64, not {sorted(RESERVED_NAMES)})")
    if len(set(silos)) != len(silos) or not silos:
        raise ConfigError(f"--silos {list(silos)!r}: give one or more distinct silo names")


def make_certs(out: Path, *, server_hosts: Sequence[str], silos: Sequence[str], days: int = 825,
               force: bool = False) -> CertPaths:
    """Write a CA, a server certificate and one client certificate per silo into `out`.

    Contract: everything is made in a temporary folder inside `out` (not beside it: `out` may be a
    mount point whose parent is not writable, as the compose demo's /certs volume is) and moved
    in only when all of it was made, so a failed run leaves `out` as it was (no half-made CA that a rerun would
    then refuse to replace). `server_hosts` may name `localhost` or IPs; the server
    certificate's CN is the first host given (else `localhost`).
    """
    check_silo_names(silos)
    for host in server_hosts:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ConfigError(f"--server-host {host!r} is not a host name or IP address")
    out = Path(out)
    if ((out / "ca.pem").exists() or (out / "ca.key").exists()) and not force:
        raise ConfigError(f"{out / 'ca.pem'} exists; new certificates would lock out every silo holding the "
                          "old ones. Pass --force to replace the CA, or choose another --out folder")
    out.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys([*server_hosts, *DEFAULT_HOSTS]))
    with tempfile.TemporaryDirectory(prefix=".making-", dir=out) as tmp:
        made = _make_all(Path(tmp), hosts=hosts, silos=silos, days=days)
        for name in made:  # the keys first would not help: every file is complete before any is moved
            os.replace(Path(tmp) / name, out / name)
    return CertPaths(ca=out / "ca.pem", server_cert=out / "server.pem", server_key=out / "server.key",
                     silos={silo: (out / f"{silo}.pem", out / f"{silo}.key") for silo in silos})


def _make_all(tmp: Path, *, hosts: Sequence[str], silos: Sequence[str], days: int) -> list[str]:
    """Every file of `make_certs` in `tmp`; returns their names, the CA's last."""
    ca_key = _new_key()
    ca_name = _name("CrossLM CA")
    ca = (_builder("CrossLM CA", ca_name, ca_key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, stem: str, usage, sans: Sequence[str]) -> list[str]:
        key = _new_key()
        builder = (_builder(cn, ca_name, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
        _write_key(tmp / f"{stem}.key", key)
        _write_cert(tmp / f"{stem}.pem", builder.sign(ca_key, hashes.SHA256()))
        return [f"{stem}.key", f"{stem}.pem"]

    names = leaf(hosts[0], "server", ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    for silo in silos:
        names += leaf(silo, silo, ExtendedKeyUsageOID.CLIENT_AUTH, ())
    _write_key(tmp / "ca.key", ca_key)
    _write_cert(tmp / "ca.pem", ca)
    return names + ["ca.key", "ca.pem"]


# ---- reading and checking ------------------------------------------------------------------------
def read_pem(path: Path, what: str) -> bytes:
    """The file's bytes, or a ConfigError that names the file and the config key to fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} file {str(path)!r} cannot be read ({e.strerror})") from e


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_pem(path, what))
    except ValueError as e:
        raise ConfigError(f"{what} file {str(path)!r} is not a PEM certificate") from e


def load_key(path: Path, what: str = "key"):
    try:
        return serialization.load_pem_private_key(read_pem(path, what), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what} file {str(path)!r} is not an unencrypted PEM private key") from e


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def check_pair(cert: x509.Certificate, key) -> bool:
    """True when `key` is the private key of `cert`."""
    pub = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pub == cert.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when `ca` signed `cert` (and the names chain)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def expired(cert: x509.Certificate) -> bool:
    now = dt.datetime.now(dt.timezone.utc)
    return not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
