"""TLS for one run: a certificate authority and a server certificate for 127.0.0.1, made on the spot.

Flower's SuperLink serves over TLS when it is given a certificate, its private key and the
certificate of the authority (CA) that signed it; a SuperNode, and ``flwr`` submitting a run,
then trust the SuperLink only if its certificate was signed by the CA they are given
(``--root-certificates``). On one machine nobody else needs to trust that CA, so
:func:`make_certificates` creates one for the run with the ``cryptography`` package (which Flower
already depends on): a CA key and a self-signed CA certificate, and a server key and a certificate
the CA signs for ``localhost`` and ``127.0.0.1`` (the names a client checks the certificate
against). Keys are elliptic-curve (P-256), quick to make; certificates last one day.

:class:`~fedlora_edu.flower.localhost.LocalDeployment` writes them to a temporary directory and
removes it when it stops. Across machines the SuperLink's certificate must name the address the
SuperNodes dial (``hosts``), and its key must stay on the SuperLink's machine; only ``ca.pem``
travels.

Taught in ``book/flower/real_federation.ipynb``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certificates:
    """Where :func:`make_certificates` wrote its files (PEM)."""

    ca: Path
    """The CA's certificate: what SuperNodes and ``flwr`` trust (``--root-certificates``)."""
    certificate: Path
    """The SuperLink's certificate, signed by the CA (``--ssl-certfile``)."""
    key: Path
    """The SuperLink's private key (``--ssl-keyfile``); readable by its owner only."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora-edu"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_certificates(directory: str | Path, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                      days: int = 1) -> Certificates:
    """Create a CA and a server certificate for ``hosts`` (names or IP addresses) in ``directory``.

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` and returns their paths. The CA's key is
    not written: once the server certificate is signed nothing needs it, so no one can sign another.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedlora-edu run CA")
    ca_certificate = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_certificate = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    paths = Certificates(ca=directory / "ca.pem", certificate=directory / "server.pem", key=directory / "server.key")
    paths.ca.write_bytes(ca_certificate.public_bytes(serialization.Encoding.PEM))
    paths.certificate.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, paths.key)
    return paths
