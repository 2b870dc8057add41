"""TLS for ``tls://`` addresses: mutual, through `trio.SSLStream` and the standard `ssl`.

Authentication (`trioflow.comm.auth`) proves that a peer holds a token; it
does not hide the traffic. With TLS every connection is encrypted and both
ends show a certificate signed by the cluster's CA (mutual TLS, as
dask.distributed's ``Security`` does): a process without a certificate
from that CA cannot even start the token exchange, which then runs inside
the encrypted stream. The two combine; neither replaces the other.

Certificates name no host here (`check_hostname` is off): cluster machines
are often reached by IP address, or through NAT, so a peer is trusted for
holding a certificate of the cluster's CA, not for its name. Keep the CA's
key off the cluster machines.

`trioflow tls-certs DIR` (`trioflow.tls_certs`, with the `tls` extra:
``cryptography``) makes a throwaway CA and a certificate per role for local
use and tests.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

from trioflow.config import Config, ConfigError


@dataclasses.dataclass(frozen=True)
class Security:
    """The TLS files of one process.

    Args:
        ca_file: the cluster's CA certificate (PEM): peers must show a
            certificate it signed.
        cert_file: this process's certificate (PEM), signed by that CA.
        key_file: its private key (PEM).
    """

    ca_file: str
    cert_file: str
    key_file: str

    @classmethod
    def from_config(cls, config: Config) -> Security | None:
        """The TLS files `config` names (all three, or none: then None).

        Raises:
            ConfigError: only some are given, or one cannot be read.
        """
        files = (config.tls_ca_file, config.tls_cert_file, config.tls_key_file)
        if not any(files):
            return None
        if not all(files):
            raise ConfigError(
                "TLS needs all three of tls_ca_file, tls_cert_file and tls_key_file "
                f"(got ca={files[0]!r}, cert={files[1]!r}, key={files[2]!r})"
            )
        for name, path in zip(("tls_ca_file", "tls_cert_file", "tls_key_file"), files, strict=True):
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"Config.{name}: no such file {path!r}")
        return cls(*(str(Path(f).expanduser()) for f in files))

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        context = ssl.create_default_context(purpose, cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False  # see the module docstring
        context.verify_mode = ssl.CERT_REQUIRED  # mutual: the other side must show one too
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the side that accepts: asks for and checks the peer's certificate."""
        return self._context(ssl.Purpose.CLIENT_AUTH)

    def client_context(self) -> ssl.SSLContext:
        """For the side that connects: checks the server's certificate, shows ours."""
        return self._context(ssl.Purpose.SERVER_AUTH)
