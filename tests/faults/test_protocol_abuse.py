"""Abuse below the app, against a real node: ping floods, oversized handshakes, invalid UTF-8.

Raw sockets, so that a client can send frames and never read, or send what no WebSocket
library would.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import SECRET, NodeFactory, record, study, token
from tests.support.processes import NodeProcess, RedisServer

PING_PAYLOAD = b"p" * 125  # the largest a control frame may carry
FLOOD_SECONDS = 5.0
STALLED = 1.0  # sends blocked this long: the node stopped reading
# The shipped PRESENCE_WS_MAX_OUTGOING_BUFFER is 4 MiB; before the fix a node grew by about
# 20 MiB a second under this flood.
MAX_GROWTH_MIB = 24.0


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final frame, masked as RFC 6455 requires of a client (payloads under 126 bytes)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def upgrade(path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def server_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(opcode, payload) of each complete unmasked frame in `data`."""
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            (length,) = struct.unpack("!H", data[at : at + 2])
            at += 2
        elif length == 127:
            (length,) = struct.unpack("!Q", data[at : at + 8])
            at += 8
        if at + length > len(data):
            return
        yield opcode, data[at : at + length]
        at += length


def close_codes(data: bytes) -> list[int]:
    return [struct.unpack("!H", payload[:2])[0] for op, payload in server_frames(data) if op == 8]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1)) / 1024


def open_raw(port: int, path: str, headers: dict[str, str]) -> tuple[socket.socket, bytes]:
    """A connection that sent its upgrade and read the response head; what followed it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(upgrade(path, headers))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the handshake answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock, rest


def flood_pings(sock: socket.socket) -> float | None:
    """Pings, never reading, until the node stops reading (sends stall) or FLOOD_SECONDS pass.

    How long until the node stopped reading, or None if it never did.
    """
    chunk = client_frame(0x9, PING_PAYLOAD) * 1000
    sock.setblocking(False)
    started = time.monotonic()
    pending = memoryview(chunk)
    while time.monotonic() - started < FLOOD_SECONDS:
        try:
            pending = pending[sock.send(pending) :] or memoryview(chunk)
            continue
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
        blocked = time.monotonic()
        _, writable, _ = select.select([], [sock], [], STALLED)
        if not writable:
            return blocked - started
    return None


def drain(sock: socket.socket, within: float) -> tuple[bytes, float | None]:
    """What the node sends until the connection ends, and how long that took (None: it did not).

    A reset ends it too: a node that closes a socket with unread pings in its receive buffer
    makes the kernel answer with RST, which discards the rest of what it sent.
    """
    sock.setblocking(True)
    sock.settimeout(within)
    started = time.monotonic()
    received = bytearray()
    try:
        while chunk := sock.recv(1 << 20):
            received += chunk
    except TimeoutError:
        return bytes(received), None
    except ConnectionResetError:
        pass
    return bytes(received), time.monotonic() - started


def protocol_closes(node: NodeProcess, reason: str) -> float:
    metrics = httpx.get(node.base_url + "/metrics", timeout=5).text
    pattern = rf'^presence_ws_protocol_closes_total{{reason="{reason}"}} (\S+)$'
    found = re.search(pattern, metrics, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "refused_token"])
def test_a_ping_flood_that_never_reads_is_closed(nodes: NodeFactory, authenticated: bool) -> None:
    node = nodes()
    # Refused: the node accepts, closes with 4401, and until uvicorn's close timeout (10 s)
    # keeps reading, and answering pings.
    headers = {"Authorization": f"Bearer {token('flooder')}"} if authenticated else {}
    sock, rest = open_raw(node.port, f"/ws/presence?study_id={study()}", headers)
    with sock:
        before = rss_mib(node.pid)
        stopped_after = flood_pings(sock)
        growth = rss_mib(node.pid) - before
        received, ended_after = drain(sock, within=8.0)

    case = "ping flood, " + ("authenticated" if authenticated else "refused token")
    record(case, "node RSS growth while flooding", growth, "MiB")
    record(case, "time until the node stopped reading", stopped_after or FLOOD_SECONDS)
    assert stopped_after is not None, f"the node read pings for {FLOOD_SECONDS}s (+{growth} MiB)"
    assert growth < MAX_GROWTH_MIB
    assert ended_after is not None, "the node kept the connection open"
    # The 1013 frame is queued behind the pongs and lost in the reset; the count says why.
    assert protocol_closes(node, "outgoing_buffer") == 1
    if not authenticated:
        assert close_codes(rest + received)[:1] == [4401]


@pytest.mark.parametrize(
    ("case", "path_extra", "headers", "status"),
    [
        ("9 KB cookie", "", {"Cookie": "session=" + "c" * 9000}, 431),
        ("9 KB query string", "&pad=" + "q" * 9000, {}, 414),
        ("200 headers", "", {f"X-Pad-{i}": "x" for i in range(200)}, 431),
    ],
)
def test_an_oversized_handshake_is_answered_and_closed(
    nodes: NodeFactory, case: str, path_extra: str, headers: dict[str, str], status: int
) -> None:
    node = nodes()
    path = f"/ws/presence?study_id={study()}{path_extra}"
    headers = {"Authorization": f"Bearer {token('big')}", **headers}
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(upgrade(path, headers))
        received, closed_after = drain(sock, within=5.0)
    record(f"oversized handshake, {case}", "time to the answer and close", closed_after or -1)
    assert received.startswith(f"HTTP/1.1 {status} ".encode()), received[:200]
    assert closed_after is not None, "the node kept the connection open"
    assert time.monotonic() - started < 5


@pytest.fixture
def info_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeProcess]:
    """A node that logs at info, the level the protocol layer's one line is written at."""
    env = {
        "PRESENCE_REDIS_URL": redis_server.url,
        "PRESENCE_JWT_SECRET": SECRET,
        "PRESENCE_KEY_PREFIX": "faults",
    }
    node = NodeProcess(env, tmp_path, log_level="info").start()
    try:
        yield node
    finally:
        node.stop()


def test_invalid_utf8_closes_with_1007_and_is_logged_once(info_node: NodeProcess) -> None:
    sockets = 20
    started = time.monotonic()
    for _ in range(sockets):
        headers = {"Authorization": f"Bearer {token('garbler')}"}
        sock, rest = open_raw(info_node.port, f"/ws/presence?study_id={study()}", headers)
        with sock:
            sock.sendall(client_frame(0x1, b'{"type": "ping", "x": "\xff\xfe"}'))
            received, closed_after = drain(sock, within=5.0)
        assert closed_after is not None
        assert close_codes(rest + received) == [1007]
    record("invalid UTF-8", "time per socket to its 1007", (time.monotonic() - started) / sockets)

    assert protocol_closes(info_node, "invalid_utf8") == sockets
    info_node.stop()  # flushes the log
    log = info_node.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert log.count("not valid UTF-8") == 1, log
