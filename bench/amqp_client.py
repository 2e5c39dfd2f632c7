"""Just enough AMQP 0-9-1 for the benchmarks, in the standard library.

The queue scenario needs three things from the broker: declare or delete a
queue, publish a batch of messages quickly, and read a queue's depth often
(a passive declare answers with the count of ready messages) to time how
fast a consumer drains it. amqp-tools cannot report a depth, and
`rabbitmqctl` starts an Erlang VM per call, which would steal the CPU being
measured. So this speaks the wire protocol itself: one connection, one
channel, synchronous methods, no heartbeats, no confirms.
"""

from __future__ import annotations

import socket
import struct

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"


def _shortstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("B", len(b)) + b


def _longstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class AmqpError(Exception):
    pass


class Connection:
    """A blocking connection with channel 1 open."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672,
                 user: str = "guest", password: str = "guest", vhost: str = "/",
                 timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.frame_max = 131072
        self.sock.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(0, 10, 10)  # connection.start
        auth = b"\x00" + user.encode() + b"\x00" + password.encode()
        self._method(0, 10, 11, struct.pack(">I", 0) + _shortstr("PLAIN")
                     + _longstr(auth) + _shortstr("en_US"))
        args = self._expect(0, 10, 30)  # connection.tune
        channel_max, frame_max, _heartbeat = struct.unpack(">HIH", args[:8])
        self.frame_max = frame_max or self.frame_max
        self._method(0, 10, 31, struct.pack(">HIH", channel_max, self.frame_max, 0))
        self._method(0, 10, 40, _shortstr(vhost) + _shortstr("") + b"\x00")
        self._expect(0, 10, 41)  # connection.open-ok
        self._method(1, 20, 10, _shortstr(""))
        self._expect(1, 20, 11)  # channel.open-ok

    # -- frames -----------------------------------------------------------

    def _frame(self, kind: int, channel: int, payload: bytes) -> bytes:
        return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END

    def _method(self, channel: int, cls: int, meth: int, args: bytes) -> None:
        self.sock.sendall(self._frame(FRAME_METHOD, channel,
                                      struct.pack(">HH", cls, meth) + args))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AmqpError("the broker closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _expect(self, channel: int, cls: int, meth: int) -> bytes:
        """Reads frames until the named method arrives; returns its arguments."""
        while True:
            kind, ch, size = struct.unpack(">BHI", self._read(7))
            payload = self._read(size)
            if self._read(1) != FRAME_END:
                raise AmqpError("frame out of sync")
            if kind != FRAME_METHOD:
                continue
            c, m = struct.unpack(">HH", payload[:4])
            if (c, m) in ((10, 50), (20, 40)):  # connection.close, channel.close
                code = struct.unpack(">H", payload[4:6])[0]
                text = payload[7:7 + payload[6]].decode(errors="replace")
                raise AmqpError(f"broker closed the {'connection' if c == 10 else 'channel'}: {code} {text}")
            if (ch, c, m) == (channel, cls, meth):
                return payload[4:]

    # -- the few methods the benchmarks use -------------------------------

    def declare(self, queue: str, passive: bool = False, durable: bool = False) -> int:
        """queue.declare; returns the count of ready messages."""
        bits = (1 if passive else 0) | (2 if durable else 0)
        self._method(1, 50, 10, struct.pack(">H", 0) + _shortstr(queue)
                     + struct.pack("B", bits) + struct.pack(">I", 0))
        args = self._expect(1, 50, 11)
        n = args[0]
        return struct.unpack(">I", args[1 + n:5 + n])[0]

    def depth(self, queue: str) -> int:
        return self.declare(queue, passive=True)

    def delete(self, queue: str) -> None:
        self._method(1, 50, 40, struct.pack(">H", 0) + _shortstr(queue) + b"\x00")
        self._expect(1, 50, 41)

    def publish_many(self, queue: str, body: bytes, count: int) -> None:
        """Publishes `count` copies of `body` to `queue` (default exchange),
        then waits until the broker has them all (a declare on the same
        channel is answered only after the publishes before it)."""
        method = self._frame(FRAME_METHOD, 1, struct.pack(">HHH", 60, 40, 0)
                             + _shortstr("") + _shortstr(queue) + b"\x00")
        header = self._frame(FRAME_HEADER, 1, struct.pack(">HHQH", 60, 0, len(body), 0))
        frames = method + header + self._frame(FRAME_BODY, 1, body)
        if len(body) > self.frame_max - 8:
            raise AmqpError("body larger than one frame; not needed by the benchmarks")
        batch = 256
        for start in range(0, count, batch):
            self.sock.sendall(frames * min(batch, count - start))
        self.depth(queue)

    def close(self) -> None:
        try:
            self._method(0, 10, 50, struct.pack(">H", 200) + _shortstr("bye")
                         + struct.pack(">HH", 0, 0))
            self._expect(0, 10, 51)
        except (OSError, AmqpError):
            pass
        self.sock.close()
