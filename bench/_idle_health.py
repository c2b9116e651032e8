"""The floor for a liveness probe on this machine: a process that does nothing but answer
``GET /health`` (blocking accept, no event loop, no other work). Probed at the same time as
trioserve, it shows how much of a probe's latency is the machine's CPU scheduling.

    python bench/_idle_health.py PORT
"""

from __future__ import annotations

import socket
import sys

RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n"
    b"connection: close\r\n\r\n" + b'{"status":"ok"}'
)


def main() -> None:
    server = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=128)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(RESPONSE)


if __name__ == "__main__":
    main()
