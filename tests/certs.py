"""TLS certificates for the tests, made on the spot with trustme: real CAs, real chains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certs:
    """PEM files: a server CA and its server certificate, a client CA and two clients."""

    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    # A client certificate from a CA the server does not trust.
    stranger_cert: Path
    stranger_key: Path
    _server_ca: trustme.CA

    def rotate_server_cert(self) -> bytes:
        """Replace the server's certificate and key with new ones from the same CA (each file
        renamed into place, as a rotation should be done); returns the new certificate (PEM)."""
        leaf = self._server_ca.issue_cert("localhost", "127.0.0.1", "::1")
        for path, data in (
            (self.server_key, leaf.private_key_pem.bytes()),
            (self.server_cert, b"".join(blob.bytes() for blob in leaf.cert_chain_pems)),
        ):
            tmp = path.with_suffix(".new")
            tmp.write_bytes(data)
            tmp.replace(path)
        return leaf.cert_chain_pems[0].bytes()


def make_certs(folder: Path) -> Certs:
    """Write a fresh set of certificates into `folder` (the server's is for localhost)."""
    folder.mkdir(parents=True, exist_ok=True)
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = client_ca.issue_cert("client.example")
    stranger = stranger_ca.issue_cert("client.example")
    files = {
        "ca": server_ca.cert_pem.bytes(),
        "server_cert": b"".join(blob.bytes() for blob in server.cert_chain_pems),
        "server_key": server.private_key_pem.bytes(),
        "client_ca": client_ca.cert_pem.bytes(),
        "client_cert": client.cert_chain_pems[0].bytes(),
        "client_key": client.private_key_pem.bytes(),
        "stranger_cert": stranger.cert_chain_pems[0].bytes(),
        "stranger_key": stranger.private_key_pem.bytes(),
    }
    paths = {}
    for name, data in files.items():
        path = folder / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = path
    return Certs(folder=folder, _server_ca=server_ca, **paths)
