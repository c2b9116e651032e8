"""The load of ``bench/tls_health.py``: N chat streams over HTTPS, kept open (a stream that
ends is started again) until stdin closes. Its own process, by path, importing nothing of the
project. Prints ``ready`` once every stream has had its first chunk, then at the end one JSON
object: chunks read, streams started, errors.

    python bench/_tls_streams.py URL CA_PEM N BODY
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from urllib.parse import urlsplit


async def main() -> None:
    url, ca, count, body = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    context = ssl.create_default_context(cafile=ca)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    stats = {"chunks": 0, "streams": 0, "errors": 0}
    first_chunks = 0
    all_started = asyncio.Event()
    stop = asyncio.Event()

    async def stream() -> None:
        nonlocal first_chunks
        counted = False
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
                writer.write(head + body)
                stats["streams"] += 1
                while data := await reader.read(65536):
                    stats["chunks"] += data.count(b"data: ")
                    if not counted:
                        counted = True
                        first_chunks += 1
                        if first_chunks == count:
                            all_started.set()
                writer.close()
            except (OSError, ssl.SSLError):
                stats["errors"] += 1
                await asyncio.sleep(0.1)

    async def until_stdin_closes() -> None:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        stop.set()

    tasks = [asyncio.create_task(stream()) for _ in range(count)]
    watcher = asyncio.create_task(until_stdin_closes())
    await all_started.wait()
    print("ready", flush=True)
    await watcher
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
