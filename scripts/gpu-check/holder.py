"""A stand-in model for scripts/gpu-check.sh: holds N MiB of GPU memory through the driver's own
library (libcuda.so.1, present wherever the NVIDIA driver is) and serves just enough HTTP for
trioserve to supervise it: ``GET /health`` and ``POST /v1/chat/completions`` (plain or
streamed). Standard library only; no model file, no download.

    python holder.py --port N --mib M [--name NAME]   hold and serve
    python holder.py --probe                           list the GPUs CUDA sees, then exit

Exit status 2 with "no NVIDIA driver: libcuda.so.1 not found" where there is no driver.
A user message "sleep S" makes the answer wait S seconds: a busy model, for the check.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Another library name or path instead of the driver's (the no-driver test points it nowhere).
LIBCUDA = os.environ.get("GPU_CHECK_LIBCUDA", "libcuda.so.1")
NO_DRIVER = 2
MIB = 2**20


class CudaError(Exception):
    pass


class Cuda:
    """The few driver API calls the check needs, through ctypes."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL(LIBCUDA)
        except OSError:
            print(f"no NVIDIA driver: {LIBCUDA} not found", file=sys.stderr)
            raise SystemExit(NO_DRIVER) from None
        lib = self.lib
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuInit.argtypes = [ctypes.c_uint]
        lib.cuDeviceGetCount.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDeviceGetName.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDeviceGetPCIBusId.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.cuDeviceTotalMem_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.c_int]
        lib.cuCtxCreate_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint, ctypes.c_int]
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        lib.cuMemGetInfo_v2.argtypes = [
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        # CUDA numbers GPUs fastest first unless told otherwise; trioserve's "cuda:N" is NVML's
        # index N, which is PCI bus order. Read by the driver at cuInit.
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        self.check("cuInit", lib.cuInit(0))

    def check(self, call: str, result: int) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.byref(name))
            words = name.value.decode() if name.value else f"error {result}"
            raise CudaError(f"{call} failed: {words}")

    def count(self) -> int:
        count = ctypes.c_int()
        self.check("cuDeviceGetCount", self.lib.cuDeviceGetCount(ctypes.byref(count)))
        return count.value

    def describe(self, ordinal: int) -> str:
        device = ctypes.c_int()
        self.check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(device), ordinal))
        name = ctypes.create_string_buffer(256)
        self.check("cuDeviceGetName", self.lib.cuDeviceGetName(name, 256, device))
        bus = ctypes.create_string_buffer(64)
        self.check("cuDeviceGetPCIBusId", self.lib.cuDeviceGetPCIBusId(bus, 64, device))
        total = ctypes.c_size_t()
        self.check("cuDeviceTotalMem", self.lib.cuDeviceTotalMem_v2(ctypes.byref(total), device))
        return f"{name.value.decode()} (PCI {bus.value.decode()}, {total.value // MIB} MiB)"

    def hold(self, mib: int) -> str:
        """A context on CUDA device 0 (the first of CUDA_VISIBLE_DEVICES) and ``mib`` MiB in it,
        kept until the process exits; a line saying what is held."""
        device = ctypes.c_int()
        self.check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(device), 0))
        context = ctypes.c_void_p()
        self.check("cuCtxCreate", self.lib.cuCtxCreate_v2(ctypes.byref(context), 0, device))
        pointer = ctypes.c_uint64()
        self.check("cuMemAlloc", self.lib.cuMemAlloc_v2(ctypes.byref(pointer), mib * MIB))
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check(
            "cuMemGetInfo", self.lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
        )
        return (
            f"holding {mib} MiB on {self.describe(0)}; the GPU has {free.value // MIB} MiB free "
            f"of {total.value // MIB} MiB"
        )


def _handler(name: str, held: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # no access log: the daemon keeps the model's output for errors

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("content-length", "0")))

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            else:
                self._json(404, {"error": {"message": f"no {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            body = self._body()
            if self.path != "/v1/chat/completions":
                self._json(404, {"error": {"message": f"no {self.path}", "type": "not_found"}})
                return
            try:
                request = json.loads(body)
                last = str(request["messages"][-1].get("content", ""))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                self._json(400, {"error": {"message": "not a chat request", "type": "invalid"}})
                return
            if last.startswith("sleep "):
                time.sleep(float(last.split()[1]))
            text = f"{name}: {held}"
            if request.get("stream"):
                self._stream(request, text)
            else:
                self._json(200, _completion(name, text))

        def _stream(self, request: dict[str, Any], text: str) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            delta = {"role": "assistant", "content": text}
            chunks: list[dict[str, Any]] = [
                {"index": 0, "delta": delta, "finish_reason": None},
                {"index": 0, "delta": {}, "finish_reason": "stop"},
            ]
            events = [
                {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [choice],
                }
                for choice in chunks
            ]
            if (request.get("stream_options") or {}).get("include_usage"):
                events.append(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "choices": [],
                        "usage": _usage(text),
                    }
                )
            for event in [*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]:
                data = event.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def _usage(text: str) -> dict[str, int]:
    words = len(text.split())
    return {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": 1 + words}


def _completion(name: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(text),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", action="store_true", help="list the GPUs CUDA sees, exit")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mib", type=int, default=1024, help="GPU memory to hold")
    parser.add_argument("--name", default="gpu-holder")
    args = parser.parse_args()
    cuda = Cuda()
    try:
        if args.probe:
            count = cuda.count()
            if count == 0:
                raise CudaError("the driver sees no GPU")
            for ordinal in range(count):
                print(f"  CUDA device {ordinal}: {cuda.describe(ordinal)}")
            return
        if args.port is None:
            parser.error("--port is required unless --probe")
        held = cuda.hold(args.mib)
    except CudaError as error:
        print(f"gpu-check holder: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{args.name}: {held}", file=sys.stderr, flush=True)
    # Bound only once the memory is held: trioserve counts the model ready at its first 200.
    server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(args.name, held))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
