"""TLS for DERP: certificates, the derper meta-certificate, pins, fast start.

Server side (spec §2.2, §2.5):

* ``--certmode manual`` reads ``<certdir>/<hostname>.crt`` (leaf + intermediates,
  PEM) and ``<certdir>/<hostname>.key``. When ``hostname`` is an IP address
  and the files are missing, :func:`load_manual_cert` creates a self-signed
  certificate for that IP, stores it there (so its pin survives restarts) and
  reports the ``CertName: "sha256-raw:<hex>"`` value to put in the DERP map.
* :func:`meta_cert_pem` makes derper's meta-certificate: self-signed Ed25519,
  subject CN ``derpkey<64 hex of the server public key>``, serial number = the
  protocol version (2), valid from now − 30 days to now + 30 days, basic
  constraints present (not a CA). It is appended after the real chain, so a
  client on TLS ≥ 1.3 learns the server key during the TLS handshake and
  skips one round trip (``Derp-Fast-Start: 1``).
* :func:`server_ssl_context` loads ``chain ‖ meta-cert`` into an
  :class:`ssl.SSLContext`. Python's :mod:`ssl` has no call to add a
  certificate to the chain from memory, but ``load_cert_chain`` sends every
  certificate of its PEM file after the leaf, so we write the combined PEM to
  a private temporary file, load it and delete it.

Client side (spec §2.5, §6.3):

* :func:`client_tls` turns a DERP node's ``HostName``/``CertName`` into a
  :class:`ClientTLS`: normal verification against the system store (or a
  given ``cafile``/context) with ``server_hostname = CertName or HostName``;
  or, for ``CertName = "sha256-raw:<hex>"``, no CA verification but an exact
  SHA-256 match of the raw DER leaf, checked by :meth:`ClientTLS.check` right
  after the handshake (a mismatch raises :class:`PinMismatchError`).
* :func:`peer_meta_key` finds the server key in the peer's meta-certificate.
  Only the leaf is public API on Python < 3.13
  (``SSLObject.getpeercert(binary_form=True)``); the unverified chain is
  ``SSLObject.get_unverified_chain()`` on 3.13+, and the same method exists
  as private API on the internal ``_sslobj`` since 3.10 (checked on 3.11).
  We use whichever exists; if neither does, fast start is simply not used
  and the client takes the normal 101 path (fully compatible).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import ssl
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from .errors import DerpError
from .frames import PROTOCOL_VERSION
from .keys import PublicKey

__all__ = [
    "META_CN_PREFIX",
    "PIN_PREFIX",
    "ClientTLS",
    "ManualCert",
    "PinMismatchError",
    "cert_pin",
    "client_tls",
    "is_ip_hostname",
    "load_manual_cert",
    "meta_cert_pem",
    "parse_meta_cert",
    "peer_chain_der",
    "peer_meta_key",
    "self_signed_cert",
    "server_ssl_context",
]

META_CN_PREFIX: Final = "derpkey"
PIN_PREFIX: Final = "sha256-raw:"
_META_VALIDITY = datetime.timedelta(days=30)
_SELF_SIGNED_VALIDITY = datetime.timedelta(days=5 * 365)
_ENCODING_DER: Final = 2  # _ssl.ENCODING_DER, for _ssl.Certificate.public_bytes


class PinMismatchError(DerpError, ssl.SSLError):
    """The server's leaf certificate does not match the configured ``sha256-raw`` pin."""


def is_ip_hostname(hostname: str) -> bool:
    """True if ``hostname`` is an IPv4/IPv6 literal."""
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def cert_pin(der: bytes) -> str:
    """``sha256-raw:<hex>`` of a DER certificate (derper's ``CertName`` pin form)."""
    return PIN_PREFIX + hashlib.sha256(der).hexdigest()


# --------------------------------------------------------------------------- server side


def meta_cert_pem(server_key: PublicKey, now: datetime.datetime | None = None) -> bytes:
    """derper's meta-certificate for ``server_key`` (PEM); see the module docstring."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ed25519.Ed25519PrivateKey.generate()
    with warnings.catch_warnings():
        # 71 characters: over X.509's advisory 64-character CN bound, as in derper.
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(
            NameOID.COMMON_NAME, META_CN_PREFIX + server_key.raw.hex(), _validate=False
        )
    name = x509.Name([cn])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - _META_VALIDITY)
        .not_valid_after(now + _META_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def parse_meta_cert(der: bytes) -> tuple[PublicKey, int] | None:
    """``(server key, protocol version)`` if ``der`` is a DERP meta-certificate, else None."""
    try:
        cert = x509.load_der_x509_certificate(der)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the 71-character CN
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError):
        return None
    for attr in cns:
        cn = attr.value
        if isinstance(cn, str) and cn.startswith(META_CN_PREFIX):
            try:
                key = PublicKey(bytes.fromhex(cn[len(META_CN_PREFIX) :]))
            except ValueError:
                return None
            serial = cert.serial_number
            if not 0 <= serial <= 255:
                return None
            return key, serial
    return None


def self_signed_cert(
    hostname: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``hostname`` (IP or DNS name).

    Returns ``(cert_pem, key_pem)``. The subject alternative name is an IP
    address entry for IP literals, a DNS entry otherwise.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    san: x509.GeneralName
    if is_ip_hostname(hostname):
        san = x509.IPAddress(ipaddress.ip_address(hostname))
    else:
        san = x509.DNSName(hostname)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _SELF_SIGNED_VALIDITY)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@dataclass(frozen=True, slots=True)
class ManualCert:
    """A certificate found (or created) for ``--certmode manual``."""

    cert_file: Path
    key_file: Path
    leaf_der: bytes
    created: bool
    """True if a self-signed certificate was just generated."""

    @property
    def pin(self) -> str:
        """The ``sha256-raw:<hex>`` pin of the leaf (the DERP map ``CertName``)."""
        return cert_pin(self.leaf_der)

    def cert_name_hint(self) -> str:
        """The DERP map snippet derper prints for self-signed IP certificates."""
        return f'CertName: "{self.pin}"'


def load_manual_cert(certdir: str | os.PathLike[str], hostname: str) -> ManualCert:
    """Locate ``<certdir>/<hostname>.crt/.key``; create a self-signed pair for IP hostnames.

    Raises ``FileNotFoundError`` (with the paths) when the files are missing and
    ``hostname`` is not an IP address, ``ValueError`` when the certificate
    file holds no PEM certificate.
    """
    d = Path(certdir)
    cert_file = d / f"{hostname}.crt"
    key_file = d / f"{hostname}.key"
    created = False
    if not cert_file.exists() or not key_file.exists():
        if not is_ip_hostname(hostname):
            raise FileNotFoundError(
                f"certmode manual: {cert_file} and {key_file} are required for {hostname!r}"
            )
        cert_pem, key_pem = self_signed_cert(hostname)
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_file.write_bytes(cert_pem)
        created = True
    try:
        leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError as exc:
        raise ValueError(f"{cert_file}: not a PEM certificate: {exc}") from None
    return ManualCert(cert_file, key_file, leaf.public_bytes(serialization.Encoding.DER), created)


def server_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    server_key: PublicKey | None,
    *,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> ssl.SSLContext:
    """A server context serving ``cert_file``'s chain plus the meta-certificate.

    ``server_key=None`` serves the chain alone (no fast start). The default
    minimum is TLS 1.3 (fast start needs it; every Tailscale client has it);
    pass ``ssl.TLSVersion.TLSv1_2`` to match derper's floor. TLS 1.2
    renegotiation is refused (``OP_NO_RENEGOTIATION``). The client's cipher
    preference wins, as with Go's server (Tailscale's clients on AES hardware
    pick AES-128-GCM; OpenSSL's server preference would force AES-256-GCM).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    chain = Path(cert_file).read_bytes()
    if server_key is None:
        ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
        return ctx
    combined = chain.rstrip(b"\n") + b"\n" + meta_cert_pem(server_key)
    fd, path = tempfile.mkstemp(prefix="derp-chain-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(combined)
        ctx.load_cert_chain(path, os.fspath(key_file))
    finally:
        os.unlink(path)
    return ctx


# --------------------------------------------------------------------------- client side


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """How a client dials one DERP node over TLS."""

    context: ssl.SSLContext
    server_hostname: str
    pin: str | None = None
    """``sha256-raw:<hex>`` to check after the handshake, or None."""

    def check(self, ssl_object: Any) -> None:
        """Enforce the pin on a finished handshake (no-op without a pin)."""
        if self.pin is None:
            return
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise PinMismatchError("server sent no certificate to check the pin against")
        got = cert_pin(der)
        if not hmac.compare_digest(got.lower(), self.pin.lower()):
            raise PinMismatchError(f"server certificate {got} does not match pin {self.pin}")


def client_tls(
    hostname: str,
    cert_name: str | None = None,
    *,
    context: ssl.SSLContext | None = None,
    cafile: str | os.PathLike[str] | None = None,
) -> ClientTLS:
    """TLS settings for dialing ``hostname`` whose DERP map ``CertName`` is ``cert_name``.

    * no ``cert_name``: verify the chain and ``hostname``;
    * ``cert_name`` = ``sha256-raw:<hex>``: pin the leaf, skip CA checks;
    * any other ``cert_name``: verify the chain against that name instead.
    """
    if cert_name and cert_name.lower().startswith(PIN_PREFIX):
        digest = cert_name[len(PIN_PREFIX) :]
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError(f"bad certificate pin {cert_name!r}: want sha256-raw:<64 hex>")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ClientTLS(ctx, hostname, PIN_PREFIX + digest.lower())
    if context is None:
        context = ssl.create_default_context(cafile=os.fspath(cafile) if cafile else None)
    return ClientTLS(context, cert_name or hostname)


def peer_chain_der(ssl_object: Any) -> list[bytes]:
    """The certificates the peer sent (DER, leaf first), as far as Python exposes them.

    Uses ``get_unverified_chain`` (public on 3.13+, private ``_sslobj`` method
    on 3.10–3.12); falls back to the leaf alone.
    """
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        inner = getattr(ssl_object, "_sslobj", None)
        getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        try:
            chain = getter()
        except (ssl.SSLError, ValueError, AttributeError):
            chain = None
        if chain:
            out: list[bytes] = []
            for c in chain:
                if isinstance(c, bytes):
                    out.append(c)
                else:
                    out.append(c.public_bytes(_ENCODING_DER))
            return out
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def peer_meta_key(ssl_object: Any) -> PublicKey | None:
    """The server key from the peer's meta-certificate, if TLS ≥ 1.3 and one is present."""
    if ssl_object is None or ssl_object.version() not in ("TLSv1.3",):
        return None
    for der in peer_chain_der(ssl_object)[1:]:
        found = parse_meta_cert(der)
        if found is not None:
            return found[0]
    return None
