"""`crosslm-client check`: tell a partner site in one run whether its setup is right.

Each check prints one line, OK / FAIL / SKIP, and on FAIL what to change. Checks run in the
order a site would fix things: config, data, CA, certificate, key, address, TLS, the server's
answer. A check whose input failed earlier is skipped, not reported as a second failure.
"""
from __future__ import annotations

import csv
import socket
import ssl
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from crosslm_client.config import SiloConfig, load_silo_config
from crosslm_client.transport import RetryPolicy, TransportError
from crosslm_shared import certs
from crosslm_shared.data import read_labelled
from crosslm_shared.errors import CrossLMError

CONNECT_TIMEOUT_S = 5.0
TLS_ONLY = frozenset({"ca", "cert", "key", "tls"})
NEEDS = {"data": (), "ca": (), "cert": ("ca",), "key": ("cert",), "address": (),
         "tls": ("ca", "cert", "key", "address"), "server": ("ca", "cert", "key", "address", "tls")}


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # "OK", "FAIL" or "SKIP"
    message: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<8}  {self.message}"


class _Failed(Exception):
    """A check failed; the message says what to fix."""


def run_checks(config_path: Path, *, address: str | None = None) -> list[Result]:
    """Every check's result, in order; the setup is right when none is FAIL."""
    try:
        config = load_silo_config(config_path, overrides={"server": {"address": address}})
    except CrossLMError as e:
        return [Result("config", "FAIL", f"{e} (fix {config_path})")]
    return [Result("config", "OK", f"{config_path}: silo {config.silo.name!r}, server {config.server.address}"),
            *_Checks(config).run()]


class _Checks:
    def __init__(self, config: SiloConfig):
        self.config, self.s = config, config.server
        self.results: list[Result] = []
        self.ca = self.cert = self.key = None

    def run(self) -> list[Result]:
        tls = not self.s.plaintext_dev_mode
        steps = (("data", self.check_data), ("ca", self.check_ca), ("cert", self.check_cert), ("key", self.check_key),
                 ("address", self.check_address), ("tls", self.check_tls), ("server", self.check_server))
        for name, check in steps:
            needs = [n for n in NEEDS[name] if tls or n not in TLS_ONLY]
            if name in TLS_ONLY and not tls:
                self.results.append(Result(name, "SKIP", "plaintext_dev_mode = true: no certificates are used"))
            elif not self.ok(*needs):
                self.results.append(Result(name, "SKIP", f"needs {', '.join(needs)} to be OK first"))
            else:
                try:
                    self.results.append(Result(name, "OK", check()))
                except _Failed as e:
                    self.results.append(Result(name, "FAIL", str(e)))
        return self.results

    def ok(self, *names: str) -> bool:
        done = {r.name: r.status for r in self.results}
        return all(done.get(n) == "OK" for n in names)

    # ---- the checks ------------------------------------------------------------------------------
    def check_data(self) -> str:
        s = self.config.silo
        try:
            texts, ys = read_labelled(s.data, labels=s.labels, text_column=s.text_column,
                                      label_column=s.label_column).pair()
        except CrossLMError as e:
            raise _Failed(f"{e} (fix the file, or [silo] data / text_column / label_column)") from e
        except (UnicodeDecodeError, csv.Error, OSError) as e:  # not a text CSV / JSONL at all
            raise _Failed(f"{s.data}: cannot be read as UTF-8 CSV or JSONL ({e}); export it as UTF-8 text") from e
        counts = Counter(s.labels[y] for y in ys)
        missing = [label for label in s.labels if counts[label] < 2]
        if missing:
            raise _Failed(f"{s.data}: labels {missing} have fewer than 2 examples; every label needs some "
                          "for training and some held out")
        return f"{s.data}: {len(texts)} examples ({', '.join(f'{counts[l]} {l}' for l in s.labels)})"

    def check_ca(self) -> str:
        self.ca = self._load(certs.load_cert, self.s.ca, "[server] ca")
        if not _is_ca(self.ca):
            raise _Failed(f"{self.s.ca} is not a CA certificate; [server] ca must be the ca.pem from `crosslm certs`, "
                          "not a silo or server certificate")
        if certs.expired(self.ca):
            raise _Failed(f"{self.s.ca} has expired ({self.ca.not_valid_after_utc:%Y-%m-%d}); ask the server's "
                          "operator for new certificates")
        return f"{self.s.ca}: CA {certs.common_name(self.ca)!r}, valid until {self.ca.not_valid_after_utc:%Y-%m-%d}"

    def check_cert(self) -> str:
        self.cert = self._load(certs.load_cert, self.s.cert, "[server] cert")
        cn = certs.common_name(self.cert)
        if not certs.verify_signed_by(self.cert, self.ca):
            raise _Failed(f"{self.s.cert} was not signed by the CA in {self.s.ca}: it comes from another "
                          "`crosslm certs` run; use the certificate and ca.pem the server's operator sent together")
        if certs.expired(self.cert):
            raise _Failed(f"{self.s.cert} has expired or is not valid yet; ask the server's operator for a new one")
        if cn != self.config.silo.name:
            raise _Failed(f"{self.s.cert} is for silo {cn!r} but [silo] name is {self.config.silo.name!r}: the "
                          "server knows you by the certificate; set name = "
                          f"{cn!r} or use your own silo's certificate")
        return f"{self.s.cert}: silo {cn!r}, signed by the CA"

    def check_key(self) -> str:
        self.key = self._load(certs.load_key, self.s.key, "[server] key")
        if not certs.check_pair(self.cert, self.key):
            raise _Failed(f"{self.s.key} is not the key of {self.s.cert}; use the .key file made with that "
                          "certificate")
        mode = stat.S_IMODE(Path(self.s.key).stat().st_mode)
        if mode & 0o077:
            raise _Failed(f"{self.s.key} is readable by other users (mode {mode:o}); run: chmod 600 {self.s.key}")
        return f"{self.s.key}: matches the certificate, mode {mode:o}"

    def check_address(self) -> str:
        host, port = _split(self.s.address)
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
                pass
        except OSError as e:
            raise _Failed(f"cannot reach {self.s.address} ({e.strerror or e}): is the server running, is "
                          "[server] address right (host:port of its gRPC port), does a firewall block it?") from e
        return f"{self.s.address} accepts connections"

    def check_tls(self) -> str:
        host, port = _split(self.s.address)
        name = self.s.server_name or host
        context = ssl.create_default_context(cafile=str(self.s.ca))
        context.load_cert_chain(str(self.s.cert), str(self.s.key))
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw:
                with context.wrap_socket(raw, server_hostname=name) as tls:
                    peer = tls.getpeercert()
        except ssl.SSLCertVerificationError as e:
            raise _Failed(f"the server's certificate did not verify for {name!r} ({e.verify_message}): if the "
                          "name is wrong, set [server] server_name to a name in the server certificate; otherwise "
                          "[server] ca is not the CA that signed the server") from e
        except (ssl.SSLError, OSError) as e:
            raise _Failed(f"TLS handshake with {self.s.address} failed ({e}): is the server running with TLS "
                          "(not plaintext_dev_mode)?") from e
        subject = dict(x[0] for x in peer.get("subject", ()))
        return f"server certificate {subject.get('commonName', '?')!r} verified for {name!r}"

    def check_server(self) -> str:
        from crosslm_client.daemon import connect

        try:
            with connect(self.config, retry=RetryPolicy(max_attempts=1)) as client:
                subs = client.list_submissions()
        except TransportError as e:
            hint = ("the server refused this silo's certificate: it does not trust the CA that signed it"
                    if not self.s.plaintext_dev_mode and "UNAVAILABLE" in str(e)
                    else "is this a CrossLM server, and does its mode (mTLS or plaintext) match yours?")
            raise _Failed(f"{e}; {hint}") from e
        return f"the server knows this silo as {self.config.silo.name!r}: {len(subs)} submission(s) so far"

    def _load(self, loader, path, what):
        try:
            return loader(path, what)
        except CrossLMError as e:
            raise _Failed(f"{e}; fix {what} in the config") from e


def _is_ca(cert) -> bool:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError as e:
        raise _Failed(f"[server] address {address!r}: the port is not a number; use host:port") from e
