"""Client keep-alive: an idle connection lives `client_header_timeout`, longer than a client's idle expiry.

httpx and the openai SDK reuse an idle connection for up to 5 s, uvicorn's own keep-alive timeout is
5 s: at that moment a request goes out on a connection the server is closing. bastion closes idle
connections with its head timer instead (tests/integration/test_slow_clients.py: within the timeout).
"""

from __future__ import annotations

import socket
import time

from tests.support import gateway, read_until


def test_an_idle_keep_alive_connection_outlives_a_clients_5_s_expiry(sim: str) -> None:
    env = {"BASTION_CLIENT_HEADER_TIMEOUT": "7"}
    with gateway("--upstream-url", sim, env=env) as (_, base):
        host, port = base.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            for pause in (0.0, 5.6):
                time.sleep(pause)
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = read_until(sock, b'{"status":"ok"}', f"the connection was closed after {pause} s idle")
                assert answer.startswith(b"HTTP/1.1 200")
