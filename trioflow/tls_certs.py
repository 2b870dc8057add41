"""Throwaway TLS files for a cluster: a CA, and a certificate and key per role.

For local use and tests (``trioflow tls-certs DIR``). In production, issue
certificates from your own CA with your usual tooling; what trioflow needs
is the CA certificate and, for each process, a certificate signed by it and
its key (`trioflow.comm.security.Security`).

Needs the ``tls`` extra (``cryptography``), imported only when called.

Files written (keys 0600)::

    ca.pem                       the CA certificate (give it to every process)
    scheduler.pem, scheduler-key.pem
    worker.pem, worker-key.pem   (nannies use the worker's)
    client.pem, client-key.pem

Each certificate's subject carries its role in the organizational unit
(``OU=trioflow-scheduler`` ...), for operators reading them; trioflow's
roles themselves are enforced by the tokens (`trioflow.comm.auth`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

ROLES = ("scheduler", "worker", "client")
VALID_DAYS = 30


def make_certificates(directory: str | os.PathLike, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """Write a CA and a certificate per role into `directory`; return the paths.

    Args:
        hosts: names and addresses put in the certificates (for tools that
            check them; trioflow itself does not, see `comm.security`).

    Raises:
        ImportError: ``cryptography`` is not installed (``pip install 'trioflow[tls]'``).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise ImportError("making TLS files needs cryptography: pip install 'trioflow[tls]'") from exc

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS))

    def name(common: str, unit: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trioflow"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                x509.NameAttribute(NameOID.COMMON_NAME, common),
            ]
        )

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        data = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("trioflow test CA", "trioflow-ca")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": out / "ca.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"trioflow {role}", f"trioflow-{role}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            # Every process both accepts and makes connections (a worker
            # serves its data port and dials the scheduler).
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        paths[role] = out / f"{role}.pem"
        paths[f"{role}-key"] = out / f"{role}-key.pem"
        paths[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(paths[f"{role}-key"], key)
    return paths
