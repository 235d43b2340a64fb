"""TLS of the aggregator's listeners: the PEM files, read once at start-up, and what serves them.

`load()` reads `--tls-cert`, `--tls-key` and `--tls-client-ca` and checks them
(readable, PEM, the key matching the certificate), raising a one-line
`StartupError` otherwise; gRPC's own checks come later and say only "Failed to
bind". `grpc_credentials()` and the `http` context of the result serve the same
files on the gRPC port and on every HTTP listener. With a client CA both sides
require a client certificate it signed (mutual TLS).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import grpc

from aggregator.errors import StartupError

_CERT_MARK = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class ServerTls:
    """The PEM bytes the aggregator serves, and the HTTP listeners' context built from them."""

    cert_chain: bytes
    """--tls-cert: the server's certificate, then any intermediates."""
    private_key: bytes
    """--tls-key: the certificate's private key (unencrypted)."""
    client_ca: bytes | None
    """--tls-client-ca: the CA certificates client certificates must chain to; None: no mTLS."""
    http: ssl.SSLContext
    """The HTTP listeners' context (server side, TLS 1.2 or later)."""

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate (mTLS)."""
        return self.client_ca is not None

    @property
    def mode(self) -> str:
        """ "mtls" or "tls", as the start-up log line says."""
        return "mtls" if self.mutual else "tls"


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise StartupError(f"{flag} {path!r}: cannot read it: {err.strerror or err}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise StartupError("--tls-key is encrypted: give an unencrypted private key")


def load(cert_path: str, key_path: str, client_ca_path: str = "") -> ServerTls:
    """Read and check the files; StartupError (one line, naming the flag) if they cannot serve."""
    cert = _read("--tls-cert", cert_path)
    key = _read("--tls-key", key_path)
    ca = _read("--tls-client-ca", client_ca_path) if client_ca_path else None
    if _CERT_MARK not in cert:
        raise StartupError(f"--tls-cert {cert_path!r} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise StartupError(f"--tls-key {key_path!r} holds no PEM private key")
    if b"ENCRYPTED" in key:
        raise StartupError(f"--tls-key {key_path!r} is encrypted: give an unencrypted key")
    if ca is not None and _CERT_MARK not in ca:
        raise StartupError(f"--tls-client-ca {client_ca_path!r} holds no PEM certificate")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # Python's ssl takes a certificate chain from files only: the same two, just read.
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"--tls-key {key_path!r} does not match the certificate of --tls-cert {cert_path!r}"
            ) from None
        raise StartupError(
            f"--tls-cert {cert_path!r} / --tls-key {key_path!r}: cannot use them: "
            f"{err.reason or err}"
        ) from None
    except OSError as err:  # replaced or removed in between
        raise StartupError(
            f"--tls-cert {cert_path!r} / --tls-key {key_path!r}: cannot read them: "
            f"{err.strerror or err}"
        ) from None
    if ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError) as err:
            reason = getattr(err, "reason", None) or "not PEM certificates"
            raise StartupError(
                f"--tls-client-ca {client_ca_path!r}: cannot use it: {reason}"
            ) from None
    return ServerTls(cert_chain=cert, private_key=key, client_ca=ca, http=context)


def grpc_credentials(tls: ServerTls) -> Any:
    """The gRPC server credentials serving `tls` (requiring a client certificate if mutual)."""
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.cert_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.mutual,
    )
