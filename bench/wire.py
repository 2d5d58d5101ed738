"""Minimal clients for the Envoy benchmark: JSON over HTTP/1.1 and unary gRPC over HTTP/2.

Both do as little as a client can (one write per call, then parse the reply on the calling
thread), so that comparing a JSON route with a gRPC call compares what the server side does,
not what two clients of very different weights do. The typed GlmClient is the third client the
benchmark runs, for the latency its users see.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

# HTTP/2 (RFC 9113) frame types and flags used here.
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MAX_WINDOW = 2**31 - 1


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _literal(index: int, value: str) -> bytes:
    """An HPACK literal without indexing whose name is static-table entry `index` (< 15)."""
    data = value.encode()
    if len(data) > 126:
        raise ValueError("header values this long need HPACK's multi-byte lengths")
    return bytes([index, len(data)]) + data


class JsonHttpClient:
    """POSTs JSON over one kept-alive HTTP/1.1 connection, doing as little as a client can.

    One write per request, then the status line, the headers and a Content-Length (or chunked)
    body, then json.loads: the same HTTP bytes any client sends. (http.client, which parses the
    response line by line in Python, measured about 0.2 ms a call slower than this on 2 cores.)
    """

    def __init__(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        self._host = f"{host}:{port}"
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        # One write per request already; without Nagle nothing waits for an ACK either way.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def _fill(self) -> None:
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionError("Envoy closed the connection")
        self._buffer += data

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._fill()
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _take_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
        return line

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        """The status and the decoded JSON body of one POST."""
        self._sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {self._host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        status = int(self._take_line().split(b" ", 2)[1])
        headers = {}
        while line := self._take_line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            payload = self._take(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            chunks = []
            while size := int(self._take_line().split(b";")[0], 16):
                chunks.append(self._take(size))
                self._take_line()
            self._take_line()  # the empty line after the last chunk (no trailers are sent)
            payload = b"".join(chunks)
        else:
            raise ValueError(f"{path}: a response without a length cannot be kept alive")
        if headers.get(b"connection") == b"close":
            raise ConnectionError(f"{path}: Envoy closed the connection after {status}")
        return status, json.loads(payload)


class GrpcH2Client:
    """Unary gRPC calls over one HTTP/2 connection (prior knowledge, as gRPC's own clients).

    Each call is one write (HEADERS and DATA frames); the reply's frames are read until the
    stream ends, answering the server's SETTINGS and PINGs on the way. Response headers are not
    decoded (that would need HPACK's Huffman tables): a call whose reply has no message fails.
    """

    def __init__(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        self._authority = f"{host}:{port}"
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._next_stream = 1
        self._headers: dict[str, bytes] = {}
        # Windows as large as HTTP/2 allows, so that no flow-control update is ever needed for
        # the small replies measured here (the connection window is topped up in call()).
        settings = struct.pack(">HI", 0x2, 0) + struct.pack(">HI", 0x4, _MAX_WINDOW)
        self._unacknowledged = _MAX_WINDOW
        self._sock.sendall(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, settings)
            + _frame(0x8, 0, 0, struct.pack(">I", _MAX_WINDOW - 65535))
        )

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()

    def _take(self, size: int) -> bytes:
        while len(self._buffer) < size:
            data = self._sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._buffer += data
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _header_block(self, method: str) -> bytes:
        block = self._headers.get(method)
        if block is None:
            # :method POST and :scheme http are static entries 3 and 6; :authority is 1, :path 4;
            # content-type (31) and te are spelled out.
            block = (
                b"\x83\x86"
                + _literal(1, self._authority)
                + _literal(4, method)
                + b"\x00\x0ccontent-type\x10application/grpc"
                + b"\x00\x02te\x08trailers"
            )
            self._headers[method] = block
        return block

    def call(self, method: str, request: bytes) -> bytes:
        """The serialized reply of one unary call to `method` ("/package.Service/Method")."""
        stream = self._next_stream
        self._next_stream += 2
        self._sock.sendall(
            _frame(_HEADERS, _END_HEADERS, stream, self._header_block(method))
            + _frame(_DATA, _END_STREAM, stream, struct.pack(">BI", 0, len(request)) + request)
        )
        message = b""
        while True:
            head = self._take(9)
            size = int.from_bytes(head[:3], "big")
            kind, flags, frame_stream = struct.unpack(">BBI", head[3:])
            payload = self._take(size)
            if kind == _SETTINGS and not flags & _ACK:
                self._sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _PING and not flags & _ACK:
                self._sock.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                raise ConnectionError(f"GOAWAY from the server: {payload[8:]!r}")
            elif frame_stream != stream:
                continue
            elif kind == _RST_STREAM:
                raise ConnectionError(f"stream reset, HTTP/2 error {payload.hex()}")
            elif kind == _DATA:
                if flags & _PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                message += payload
                self._unacknowledged -= size
            if frame_stream == stream and kind in (_DATA, _HEADERS) and flags & _END_STREAM:
                break
        if self._unacknowledged < _MAX_WINDOW // 2:
            self._sock.sendall(
                _frame(0x8, 0, 0, struct.pack(">I", _MAX_WINDOW - self._unacknowledged))
            )
            self._unacknowledged = _MAX_WINDOW
        if len(message) < 5:
            raise RuntimeError(f"{method}: no reply message (an error status)")
        return message[5 : 5 + int.from_bytes(message[1:5], "big")]
