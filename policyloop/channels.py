"""The gRPC channel the command line opens to a running server (``admin``, ``evaluate
--target``): plaintext, TLS with the CA that signed the server's certificate, or mutual TLS
with a client certificate and key as well. One place, so every command takes the same three
flags and names the same way a file it cannot read."""

from __future__ import annotations

from pathlib import Path

import grpc

from policyloop.contract.errors import InvalidArgument


def open_channel(target: str, *, tls_ca: Path | None = None, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> grpc.Channel:
    """A channel to ``target``; TLS when ``tls_ca`` is given. A client certificate needs its
    key (and the CA); an unreadable file is an error naming its flag."""
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("--tls-cert and --tls-key come together (mutual TLS)")
    if tls_ca is None:
        if tls_cert is not None:
            raise InvalidArgument("--tls-cert needs --tls-ca, the CA that signed the server's "
                                  "certificate")
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read("--tls-ca", tls_ca),
        private_key=None if tls_key is None else _read("--tls-key", tls_key),
        certificate_chain=None if tls_cert is None else _read("--tls-cert", tls_cert))
    return grpc.secure_channel(target, credentials)


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{flag} {path}: {exc.strerror or exc}") from exc
