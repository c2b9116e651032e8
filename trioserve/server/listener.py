"""``GET /health`` without waiting for the event loop: answered at accept time, and by a
thread that takes the connections the loop is too busy to accept.

Why a thread, against the habit of "no threads for your own logic": trio runs every task in one
loop, round-robin, with no priorities. When 1,000 streams keep it busy, a new connection waits
in the accept queue behind all the others, and each step of its request (accept, read, answer)
waits a full pass over every runnable task: liveness probes took seconds (docs/performance.md,
"profiling the 1,000-stream case"). The thread blocks in the kernel instead; it needs the GIL
only for microseconds per connection, and the interpreter hands the GIL over within
``sys.getswitchinterval()`` of asking. So ``/health`` is answered within milliseconds however
busy the loop is. The loop's own health stays visible: while it is stalled, the answer is 503
(see ``LOOP_STALL_AFTER``).

While the loop is idle it accepts every connection itself (``DirectListener``), and a request
pays nothing for the thread, whose hand-over would add a thread switch, slow on these machines
(docs/performance.md#the-machine-and-the-method). Only a connection left waiting
``TAKE_OVER_AFTER`` is taken by the thread. Both sides peek at the first bytes without reading
them (``first_bytes``): a complete ``/health`` request is answered on the spot; any other
request goes to Hypercorn unread, as if nothing had looked at it. A connection with no bytes
yet (rare: ``first_bytes.defer_accept``) waits in the thread for at most ``PEEK_WAIT``.

While the daemon drains before it stops (``hypercorn_serve.serve``), the answer is
``503 {"status":"draining"}``: a balancer that checks ``/health`` takes the node out of its
rotation while the node still serves everything it is sent.

With TLS the first bytes are a ClientHello: nothing says what the request is until the
handshake is done and the first record decrypted. Answering at accept time would mean every
TLS connection's handshake in the thread (it cannot tell a probe from a client before), then
handing an established session to trio, whose ``SSLStream`` only does handshakes of its own: a
TLS stream of ours, instead of trio's, for every connection, for the probe's sake. So the main
port over TLS is upstream's (``/health`` answered by the app, from the same ``Liveness``; each
handshake step waits a pass of a busy loop: p99 in the hundreds of ms under 200 TLS streams,
``bench/tls_health.py``), and ``[server] health_port`` offers this machinery on a plain-HTTP
loopback port, with or without TLS: the same listeners, thread and ``Liveness`` (draining,
stalled), with ``answer_on_health_port`` for what was not a complete ``/health`` at accept
time (a slow one, or anything else: 404, without the app). A probe is local anyway (systemd, a
balancer's agent); one from another machine checks the main port, and pays for its TLS.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

import trio

from trioserve.server.first_bytes import MAX_PEEK, Verdict, classify, peek

__all__ = [
    "HEALTH_STATE_KEY",
    "DirectListener",
    "Liveness",
    "TakenOverConnections",
    "answer_on_health_port",
]

log = logging.getLogger(__name__)

# How long a new connection is left for the loop to accept before the thread takes it: a loop
# that cannot accept within this long is one whose /health answer would be late.
TAKE_OVER_AFTER = 0.001
# Longest a connection's first bytes are waited for before it goes to trio unclassified.
PEEK_WAIT = 0.2
# At most this many connections accepted per pass of the loop (and handed out between two
# checkpoints): a pass stays a few milliseconds long.
MAX_DRAIN = 256
# Connections handed to trio but not yet taken by it. Beyond this the thread waits: the kernel's
# accept queue holds the rest, and the loop is clearly overloaded.
MAX_HANDED_OVER = 4096
# The loop proves it is alive by ticking this often; a tick older than LOOP_STALL_AFTER means
# it is stuck, and /health says so (503) instead of lying.
LOOP_TICK = 1.0
LOOP_STALL_AFTER = 30.0
# On the health port, a connection whose /health was not complete at accept time gets this
# long to send it (a probe that slow is the probe's problem; the connection is not kept).
HEALTH_PORT_HEAD_WAIT = 5.0

_OK_BODY = b'{"status":"ok"}'
_STALLED_BODY = b'{"status":"stalled","reason":"the event loop has not run for %ds"}'
_DRAINING_BODY = b'{"status":"draining"}'
_REASONS = {200: b"200 OK", 503: b"503 Service Unavailable"}
_NOT_FOUND_BODY = (
    b'{"error":{"message":"this port (server.health_port) serves only GET /health",'
    b'"type":"invalid_request_error","code":"not_found"}}'
)
_NOT_FOUND_HEAD = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_NOT_FOUND_BODY)).encode() + b"\r\nconnection: close\r\n\r\n"
)
# Where the server puts the ``Liveness`` in each request's ASGI ``scope["state"]``, so that a
# /health request Hypercorn serves (one on a keep-alive connection) gets the same answer.
HEALTH_STATE_KEY = "trioserve.liveness"


class Liveness:
    """The loop's heartbeat and the daemon's drain, and the /health answer made from them:
    whichever side answers (the loop at accept time, the thread, or the gateway app behind
    Hypercorn) uses this one object."""

    def __init__(self) -> None:
        self.last_tick = time.monotonic()
        # Set once, when shutdown begins; read by the thread (a plain bool: atomic to read).
        self.draining = False

    async def run(self) -> None:
        """Tick every ``LOOP_TICK`` until cancelled (only a running loop ticks)."""
        while True:
            self.last_tick = time.monotonic()
            await trio.sleep(LOOP_TICK)

    def status(self) -> tuple[int, bytes]:
        """The /health status code and JSON body now."""
        stalled = time.monotonic() - self.last_tick
        if stalled > LOOP_STALL_AFTER:
            return 503, _STALLED_BODY % int(stalled)
        if self.draining:
            return 503, _DRAINING_BODY
        return 200, _OK_BODY

    def reply(self, peeked: bytes) -> tuple[int, bytes]:
        """For a complete /health request: how many bytes it is, and the answer to send."""
        code, body = self.status()
        head = (
            b"HTTP/1.1 " + _REASONS[code] + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
        )
        return peeked.find(b"\r\n\r\n") + 4, head if peeked.startswith(b"HEAD ") else head + body

    def answer(self, conn: socket.socket, peeked: bytes) -> None:
        """Answer the complete /health request ``peeked`` on ``conn``, then close it.

        As few syscalls as it takes: in the thread, each one gives the GIL away and waits to
        get it back from a busy loop."""
        try:
            request_size, answer = self.reply(peeked)
            # Consume the request, so that closing sends FIN rather than RST.
            conn.recv(request_size)
            conn.send(answer)
        except OSError:
            pass
        finally:
            conn.close()


def _trio_stream(conn: socket.socket) -> trio.SocketStream:
    """An accepted connection as the stream Hypercorn's ``TCPServer`` serves."""
    return trio.SocketStream(trio.socket.from_stdlib_socket(conn))


class DirectListener(trio.abc.Listener[trio.SocketStream]):
    """The loop's own accepts, straight from the listening socket. A /health request already
    here is answered at once; the rare connection whose first bytes are not here yet (see
    ``defer_accept``) waits in the thread, not in the loop.

    Each time the socket is readable the whole accept queue is drained (up to ``MAX_DRAIN``):
    when 1,000 clients connect at once, a probe among them is answered in that one pass rather
    than after hundreds of passes of a loop busy with the others (or by the thread, which needs
    the GIL back after every syscall). The others are handed out by the following ``accept``
    calls without waiting: their handlers all start in the next pass.
    """

    def __init__(self, listen_socket: socket.socket, thread: TakenOverConnections) -> None:
        self._socket = listen_socket
        self._thread = thread
        # Accepted (and not /health), not yet handed out by ``accept``.
        self._accepted: collections.deque[socket.socket] = collections.deque()
        self._handed_since_checkpoint = 0

    async def accept(self) -> trio.SocketStream:
        while not self._accepted:
            await trio.lowlevel.wait_readable(self._socket)
            if not self._drain() and not self._accepted:
                # EMFILE and friends: the thread or a later pass takes it.
                await trio.sleep(0.01)
        self._handed_since_checkpoint += 1
        if self._handed_since_checkpoint >= MAX_DRAIN:
            # Still a checkpoint now and then, however long the queue.
            self._handed_since_checkpoint = 0
            await trio.lowlevel.checkpoint()
        return _trio_stream(self._accepted.popleft())

    def _drain(self) -> bool:
        """Accept what is queued; False if accepting failed for lack of resources."""
        for _ in range(MAX_DRAIN):
            try:
                conn, _ = self._socket.accept()
            except (BlockingIOError, InterruptedError):
                return True  # drained (or the thread took it)
            except OSError:
                return False
            conn.setblocking(False)
            verdict, peeked = peek(conn)
            if verdict is Verdict.OTHER:
                self._accepted.append(conn)
            elif verdict is Verdict.HEALTH:
                self._thread.liveness.answer(conn, peeked)
            elif verdict is Verdict.GONE:
                conn.close()
            else:
                self._thread.watch(conn)  # no bytes yet
        return True

    async def aclose(self) -> None:
        while self._accepted:
            self._accepted.popleft().close()
        await trio.lowlevel.checkpoint()


class TakenOverConnections(trio.abc.Listener[trio.SocketStream]):
    """The connections the take-over thread accepted because the loop left them waiting, as
    a listener for trio; and the owner of that thread: ``run`` starts it, keeps the loop's
    heartbeat (``liveness``) and, when cancelled, stops it and closes the listening socket."""

    def __init__(self, listen_socket: socket.socket, liveness: Liveness | None = None) -> None:
        # One Liveness may serve several listening sockets (the daemon's drain is one).
        self.liveness = liveness if liveness is not None else Liveness()
        self._socket = listen_socket
        self._send, self._receive = trio.open_memory_channel[socket.socket](math.inf)
        self._thread: _TakeOverThread | None = None

    def watch(self, conn: socket.socket) -> None:
        """Let the thread wait for this connection's first bytes."""
        assert self._thread is not None
        self._thread.watch(conn)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the thread until cancelled; then stop it and wait for it."""
        token = trio.lowlevel.current_trio_token()
        send = self._send

        def deliver(conn: socket.socket) -> None:
            # Runs in the trio thread; it must not raise (that would crash the run).
            try:
                send.send_nowait(conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                thread.slots.release()
                conn.close()

        def hand_over(conn: socket.socket) -> None:
            token.run_sync_soon(deliver, conn)

        thread = self._thread = _TakeOverThread(self._socket, hand_over, self.liveness)
        finished = trio.Event()

        def on_finish(result: object) -> None:
            error = getattr(result, "error", None)  # an outcome.Error
            if error is not None:
                # The loop still accepts everything itself; only the fast /health is gone.
                log.error("the accept take-over thread failed", exc_info=error)
            token.run_sync_soon(finished.set)

        trio.lowlevel.start_thread_soon(thread.run, on_finish, name="trioserve accept take-over")
        task_status.started()
        try:
            await self.liveness.run()
        finally:
            thread.stop()
            with trio.CancelScope(shield=True):
                await finished.wait()
            thread.close()
            # New connections are refused from now on, not left in a queue nobody accepts.
            trio.lowlevel.notify_closing(self._socket)
            self._socket.close()
            self._send.close()
            self._drop_undelivered()

    def _drop_undelivered(self) -> None:
        while True:
            try:
                self._receive.receive_nowait().close()
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                return

    async def accept(self) -> trio.SocketStream:
        conn = await self._receive.receive()
        if self._thread is not None:
            self._thread.slots.release()
        return _trio_stream(conn)

    async def aclose(self) -> None:
        self._drop_undelivered()
        self._receive.close()
        await trio.lowlevel.checkpoint()


class _TakeOverThread:
    """Runs in its own thread: accept what the loop leaves waiting, wait for first bytes,
    answer /health, hand the rest over (``hand_over``, called in this thread)."""

    def __init__(
        self,
        listen_socket: socket.socket,
        hand_over: Callable[[socket.socket], None],
        liveness: Liveness,
    ) -> None:
        self.listen_socket = listen_socket
        self.hand_over = hand_over
        self.liveness = liveness
        # Wakes the thread: to stop, or to watch connections the loop passed to it.
        self.wake_reader, self.wake_writer = socket.socketpair()
        self.wake_reader.setblocking(False)
        self.wake_writer.setblocking(False)
        self.stopping = False
        # Connections the loop accepted before their first bytes came, passed to this thread.
        self.watch_queue: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        # One per connection handed to trio and not yet taken by it (released on the take).
        self.slots = threading.BoundedSemaphore(MAX_HANDED_OVER)
        self.selector = selectors.DefaultSelector()
        # Connections waiting for their first bytes, each until its deadline (then to trio).
        self.waiting: dict[socket.socket, float] = {}

    def watch(self, conn: socket.socket) -> None:
        self.watch_queue.put(conn)
        self._wake()

    def stop(self) -> None:
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        # A full buffer (BlockingIOError) already holds a wake-up.
        with contextlib.suppress(OSError):
            self.wake_writer.send(b"x")

    def close(self) -> None:
        self.wake_reader.close()
        self.wake_writer.close()
        while not self.watch_queue.empty():
            self.watch_queue.get_nowait().close()

    def run(self) -> None:
        self.selector.register(self.listen_socket, selectors.EVENT_READ)
        self.selector.register(self.wake_reader, selectors.EVENT_READ)
        take_over_at: float | None = None
        try:
            while not self.stopping:
                deadlines = list(self.waiting.values())
                if take_over_at is not None:
                    deadlines.append(take_over_at)
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                for key, _ in self.selector.select(timeout):
                    if key.fileobj is self.wake_reader:
                        self._take_watched()
                    elif key.fileobj is self.listen_socket:
                        # A connection is waiting: the loop gets TAKE_OVER_AFTER to accept
                        # it itself; if it is too busy to, this thread takes over.
                        self.selector.unregister(self.listen_socket)
                        take_over_at = time.monotonic() + TAKE_OVER_AFTER
                    else:
                        assert isinstance(key.fileobj, socket.socket)
                        self._peek_waiting(key.fileobj)
                now = time.monotonic()
                if take_over_at is not None and take_over_at <= now:
                    take_over_at = None
                    self._accept_all()
                    self.selector.register(self.listen_socket, selectors.EVENT_READ)
                for conn, deadline in list(self.waiting.items()):
                    if deadline <= now:
                        self._forget(conn)
                        self._give(conn)
        finally:
            for conn in list(self.waiting):
                self._forget(conn)
                conn.close()
            self.selector.close()

    def _take_watched(self) -> None:
        """Empty the wake-up socket; start waiting for the first bytes of what ``watch`` sent."""
        with contextlib.suppress(OSError):
            while self.wake_reader.recv(4096):
                pass
        while not self.watch_queue.empty():
            conn = self.watch_queue.get_nowait()
            self.waiting[conn] = time.monotonic() + PEEK_WAIT
            self.selector.register(conn, selectors.EVENT_READ)
            self._peek_waiting(conn)

    def _accept_all(self) -> None:
        # Drain the accept queue: a probe behind 1,000 connecting clients is reached at once.
        while True:
            try:
                conn, _ = self.listen_socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # EMFILE and friends: leave the rest in the kernel's queue for a moment.
                time.sleep(0.01)
                return
            conn.setblocking(False)
            verdict, peeked = peek(conn)
            if verdict is None:
                # No bytes yet: the selector says when they come.
                self.waiting[conn] = time.monotonic() + PEEK_WAIT
                self.selector.register(conn, selectors.EVENT_READ)
            else:
                self._decide(conn, verdict, peeked)

    def _peek_waiting(self, conn: socket.socket) -> None:
        """Decide about a waiting connection, if its bytes allow it yet."""
        verdict, peeked = peek(conn)
        if verdict is None:
            return  # still no bytes: the selector says when they come
        self._forget(conn)
        self._decide(conn, verdict, peeked)

    def _decide(self, conn: socket.socket, verdict: Verdict, peeked: bytes) -> None:
        if verdict is Verdict.HEALTH:
            self.liveness.answer(conn, peeked)
        elif verdict is Verdict.GONE:
            conn.close()
        else:
            self._give(conn)

    def _forget(self, conn: socket.socket) -> None:
        del self.waiting[conn]
        self.selector.unregister(conn)

    def _give(self, conn: socket.socket) -> None:
        """Hand ``conn`` to trio (its ``TakenOverConnections.accept``)."""
        # Blocks while trio has MAX_HANDED_OVER connections not yet taken; never past a stop
        # (trio takes none then, and shutdown waits for this thread).
        while not self.slots.acquire(timeout=0.1):
            if self.stopping:
                conn.close()
                return
        try:
            self.hand_over(conn)
        except trio.RunFinishedError:
            self.slots.release()
            conn.close()


async def answer_on_health_port(liveness: Liveness, stream: trio.SocketStream) -> None:
    """On the health port, a connection the listeners did not answer at accept time: a
    ``/health`` that came slowly gets ``liveness``'s answer, anything else 404; the app is
    never involved, and the connection is closed after the one answer."""
    async with stream:
        with trio.move_on_after(HEALTH_PORT_HEAD_WAIT):
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < MAX_PEEK:
                    data = await stream.receive_some(MAX_PEEK - len(head))
                    if not data:
                        break
                    head += data
                if not head:
                    return
                if classify(head) is Verdict.HEALTH:
                    _, answer = liveness.reply(head)
                elif head.startswith(b"HEAD "):
                    answer = _NOT_FOUND_HEAD
                else:
                    answer = _NOT_FOUND_HEAD + _NOT_FOUND_BODY
                await stream.send_all(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
