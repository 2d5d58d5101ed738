"""TLS for the gRPC port: the server's certificate, and client certificates with mTLS.

The files are read again when they change: gRPC asks for the configuration at every new
handshake, and gets a new one when a file's modification time, size or inode moved (connections
already open keep theirs). A set of files that does not load (a rotation half done) is logged
and the previous one kept.

With mTLS, the server's own certificate is accepted as a client certificate besides those the
client CA signed: Envoy presents it on its hop to the server, and so can local health checks.
Only the first certificate of the file (the server's, not the CAs of its chain) is trusted so.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.S)


class TlsFilesError(ValueError):
    """A certificate, key or CA file is missing or does not load."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the PEM files are."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def paths(self) -> tuple[Path, ...]:
        """Every file, in a fixed order."""
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (
                self.cert,
                self.key,
                self.client_ca,
            )
        )


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The contents of the files, checked to load together."""

    cert_chain: bytes
    key: bytes
    # The CAs a client certificate must chain to, plus the server's own certificate (None: no
    # client certificates are asked for).
    client_roots: bytes | None


def first_certificate(chain: bytes) -> bytes:
    """The first PEM certificate of a chain (the leaf)."""
    match = _PEM_CERT.search(chain)
    if match is None:
        raise TlsFilesError("no PEM certificate found")
    return match.group(0).strip() + b"\n"


def read_material(files: TlsFiles) -> TlsMaterial:
    """Read and check the files: the key must match the certificate, the CA file must load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFilesError(
            f"cannot load the certificate {files.cert} with the key {files.key}: {exc}"
        ) from exc
    try:
        cert_chain = files.cert.read_bytes()
        key = files.key.read_bytes()
        roots = None
        if files.client_ca is not None:
            try:
                context.load_verify_locations(cafile=str(files.client_ca))
            except (OSError, ssl.SSLError) as exc:
                message = f"cannot load the client CA file {files.client_ca}: {exc}"
                raise TlsFilesError(message) from exc
            ca = files.client_ca.read_bytes()
            roots = ca.rstrip() + b"\n" + first_certificate(cert_chain)
    except OSError as exc:
        raise TlsFilesError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return TlsMaterial(cert_chain, key, roots)


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    result: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
            result.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            result.append(None)
    return tuple(result)


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert_chain)], root_certificates=material.client_roots
    )


class ReloadingServerCredentials:
    """gRPC server credentials that pick up changed files at the next handshake."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = _signature(files.paths())
        material = read_material(files)  # a bad set at start is the caller's error to report
        self.reloads = 0
        # grpc-stubs types the fetcher's result without the None that means "no change".
        fetch: Any = self._fetch
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(material),
            fetch,
            require_client_authentication=files.client_ca is not None,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration, or None to keep it."""
        signature = _signature(self.files.paths())
        with self._lock:
            if signature == self._signature:
                return None
            self._signature = signature
            try:
                material = read_material(self.files)
            except TlsFilesError as exc:
                log.warning("TLS: keeping the certificate in use: %s", exc)
                return None
            self.reloads += 1
        log.info("TLS: certificate files changed; new connections get the new ones")
        return _configuration(material)
