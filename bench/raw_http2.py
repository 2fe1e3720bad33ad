"""A gRPC client on a raw HTTP/2 connection that sends part of a message and never the rest: grpc's own
clients send whole messages only. It follows the server's flow control (SETTINGS, WINDOW_UPDATE), so what it
sends is what the server lets in (`bench_hostile.py`'s `grpc_held_messages`, `tests/test_receiving.py`)."""

from __future__ import annotations

import select
import socket
import struct
import time

WINDOW = 65_535  # HTTP/2's initial window, which the server keeps for a stream without `grpc_bdp_probe`


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK header field, literal without indexing, no Huffman (names and values under 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


class RawCalls:
    """gRPC calls to `path` on one HTTP/2 connection, each declaring a message of `declared` bytes and sending
    all of it but its last byte as fast as the server's flow control lets it (so none ever completes)."""

    def __init__(
        self, host: str, port: int, path: str, streams: int, declared: int, source: str = ""
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=30, source_address=(source, 0))
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0))
        self.declared = declared
        self.buffer = b""
        self.connection_window, self.initial_window = WINDOW, WINDOW
        self.window: dict[int, int] = {}
        self.sent: dict[int, int] = {}
        self.ended: set[int] = set()
        head = b"".join(
            _literal(k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "x"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            )
        )
        for i in range(streams):
            stream = 1 + 2 * i
            self.sock.sendall(_frame(1, 4, stream, head))  # HEADERS, END_HEADERS
            self.window[stream], self.sent[stream] = WINDOW, 0

    def run(self, seconds: float) -> int:
        """Send for `seconds`; the bytes the server took in all."""
        until = time.monotonic() + seconds
        moved = True
        while time.monotonic() < until:
            self._read(0.0 if moved else 0.02)  # waits only when the windows let nothing more go
            moved = False
            for stream in self.window:
                whole = self.declared + 5 - 1  # the gRPC prefix and the message, less its last byte
                room = min(self.window[stream], self.connection_window, 16_384, whole - self.sent[stream])
                if stream in self.ended or room <= 0:
                    continue
                if self.sent[stream] == 0:
                    payload = b"\x00" + struct.pack(">I", self.declared) + b"\x00" * (room - 5)
                else:
                    payload = b"\x00" * room
                self.sock.sendall(_frame(0, 0, stream, payload))
                self.window[stream] -= room
                self.connection_window -= room
                self.sent[stream] += room
                moved = True
        return sum(self.sent.values())

    def _read(self, timeout: float) -> None:
        poller = select.poll()  # not select(): a bench beside it may hold more than 1,024 descriptors
        poller.register(self.sock, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.buffer += data
        while len(self.buffer) >= 9 and len(self.buffer) >= 9 + int.from_bytes(self.buffer[:3], "big"):
            size = int.from_bytes(self.buffer[:3], "big")
            kind, flags = self.buffer[3], self.buffer[4]
            stream = struct.unpack(">I", self.buffer[5:9])[0] & 0x7FFFFFFF
            payload, self.buffer = self.buffer[9 : 9 + size], self.buffer[9 + size :]
            if kind == 4 and not flags & 1:  # SETTINGS: take the initial window, acknowledge
                for at in range(0, len(payload), 6):
                    ident, value = struct.unpack(">HI", payload[at : at + 6])
                    if ident == 4:
                        for s in self.window:
                            self.window[s] += value - self.initial_window
                        self.initial_window = value
                self.sock.sendall(_frame(4, 1, 0))
            elif kind == 6 and not flags & 1:  # PING
                self.sock.sendall(_frame(6, 1, 0, payload))
            elif kind == 8:  # WINDOW_UPDATE
                increment = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
                if stream == 0:
                    self.connection_window += increment
                elif stream in self.window:
                    self.window[stream] += increment
            elif kind in (1, 3) and stream:  # the call answered, or reset
                self.ended.add(stream)

    def close(self) -> None:
        self.sock.close()
