"""The `process` device: the public prefix in a separate OS process, fed over pipes.

The device is its own program (``python -m tdllm.untrusted.process_device``) reading stdin and
writing stdout, so nothing of TD memory is forked into it and what crosses is real bytes, counted
as they are written: each message is a JSON header followed by one raw buffer per tensor, each
framed by an 8-byte length. The TD side never unpickles anything the device sends (a lying
device could otherwise run code in the TD); it parses JSON and copies bytes into tensors of the
shape and dtype it expects. (`multiprocessing` with spawn re-imports the caller's main script,
which a CLI or a test runner cannot promise to survive; a plain subprocess has no such trap.)

The host may kill or stop the device process at any moment. The TD's end of the pipes never
waits longer than ``timeout_s`` for progress, and a dead, exited or stalled device raises
`DeviceLostError` (a `ConnectionError`), which stops the engine; the service then restarts as a
whole (docs/api.md, "Device failures"), since the device's KV caches went with it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from typing import IO, Any

import torch

from tdllm.untrusted.offload import OffloadStore
from tdllm.untrusted.prefix import PrefixShape, PublicPrefix
from tdllm.untrusted.transcript import Transcript, tensor_bytes

Message = tuple[dict[str, Any], dict[str, torch.Tensor]]
# how long the TD waits for the device to make progress (read or take bytes): far beyond any
# step's work, so only a stopped or wedged device trips it
DEFAULT_TIMEOUT_S = 300.0
# the only tensor types that may cross; anything else in a header is a protocol error
WIRE_DTYPES = {
    str(d): d
    for d in (
        torch.float32,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    )
}


class Channel:
    """Length-framed byte messages over a pair of pipes."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes]) -> None:
        self.reader, self.writer = reader, writer

    def send_bytes(self, data: bytes) -> None:
        self.writer.write(len(data).to_bytes(8, "little"))
        self.writer.write(data)
        self.writer.flush()

    def recv_bytes(self) -> bytes:
        size = int.from_bytes(self._read(8), "little")
        return self._read(size)

    def _read(self, size: int) -> bytes:
        data = self.reader.read(size)
        if len(data) != size:
            raise EOFError("the device process closed its pipe")
        return data


class DeviceLostError(ConnectionError):
    """The device process died, exited or stalled; the message says which (no tensor data)."""


class TimedChannel(Channel):
    """The TD's end over the raw pipe descriptors: every wait for the device to read or write
    gives up after `timeout_s` without progress, so a stopped device cannot hang the engine."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes], timeout_s: float) -> None:
        super().__init__(reader, writer)
        self.timeout_s = timeout_s
        self._in, self._out = reader.fileno(), writer.fileno()
        os.set_blocking(self._out, False)  # a full pipe must not block past the deadline

    def send_bytes(self, data: bytes) -> None:
        self._write(len(data).to_bytes(8, "little"))
        self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._out, select.POLLOUT)
            try:
                view = view[os.write(self._out, view) :]
            except BlockingIOError:
                continue

    def _read(self, size: int) -> bytes:
        data = bytearray(size)
        view, done = memoryview(data), 0
        while done < size:
            self._wait(self._in, select.POLLIN)
            got = os.readv(self._in, [view[done:]])
            if got == 0:
                raise EOFError("the device process closed its pipe")
            done += got
        return bytes(data)

    def _wait(self, fd: int, event: int) -> None:
        poller = select.poll()
        poller.register(fd, event)
        if not poller.poll(int(self.timeout_s * 1000)):
            raise TimeoutError(f"no progress within {self.timeout_s:g}s")


def send(conn: Channel, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[int]:
    """Write one message; returns the byte count of each part (header first)."""
    specs = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype)} for n, t in tensors.items()]
    encoded = json.dumps(header | {"tensors": specs}).encode()
    conn.send_bytes(encoded)
    sizes = [len(encoded)]
    for tensor in tensors.values():
        data = tensor_bytes(tensor)
        conn.send_bytes(data)
        sizes.append(len(data))
    return sizes


def receive(conn: Channel) -> tuple[Message, bytes]:
    """Read one message: (header, tensors) and the raw header bytes."""
    raw = conn.recv_bytes()
    header = json.loads(raw)
    tensors: dict[str, torch.Tensor] = {}
    for spec in header.pop("tensors"):
        dtype = WIRE_DTYPES.get(spec["dtype"])
        if dtype is None:
            raise ValueError(f"tensor type {spec['dtype']!r} may not cross")
        data = bytearray(conn.recv_bytes())
        flat = (
            torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        )
        tensors[spec["name"]] = flat.view(dtype).reshape(spec["shape"])
    return (header, tensors), raw


class ProcessDevice:
    """TD-side handle of a device process; records every byte it writes and reads."""

    kind = "process"

    def __init__(self, keep_payloads: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.transcript = Transcript(keep_payloads)
        command = [sys.executable, "-m", "tdllm.untrusted.process_device"]
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*command, str(torch.get_num_threads())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # raw pipes: TimedChannel polls the descriptors themselves
        )
        if self.process.stdin is None or self.process.stdout is None:
            raise RuntimeError("the device process has no pipes")
        self.conn = TimedChannel(self.process.stdout, self.process.stdin, timeout_s)
        self.lost: str | None = None  # why the device is gone; every later call fails at once

    def _call(self, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Message:
        if self.lost is not None:
            raise DeviceLostError(self.lost)
        try:
            send(self.conn, header, tensors)
            (reply, out), raw = receive(self.conn)
        except (EOFError, OSError) as exc:  # OSError: a broken pipe, TimeoutError
            self.lost = self._why_lost(stalled=isinstance(exc, TimeoutError))
            raise DeviceLostError(self.lost) from None
        self.transcript.metadata("from_device", "reply", raw)
        for name, tensor in out.items():
            self.transcript.tensor("from_device", name, tensor)
        if "error" in reply:
            raise RuntimeError(f"device process: {reply['error']}")
        return reply, out

    def load(self, shape: PrefixShape, weights: dict[str, torch.Tensor]) -> None:
        header = {"op": "load", "shape": shape.to_json()}
        self.transcript.metadata("to_device", "load", json.dumps(header).encode())
        for name, tensor in weights.items():
            self.transcript.tensor("to_device", name, tensor)
        self._call(header, weights)

    def run_prefix(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor:
        header = {"op": "run", "slots": slots, "starts": starts}
        self.transcript.metadata("to_device", "placement", json.dumps(header).encode())
        self.transcript.tensor("to_device", "tokens", tokens)
        _, out = self._call(header, {"tokens": tokens})
        return out["hidden"]

    def gemm_io(self, names: list[str]) -> dict[str, torch.Tensor]:
        header = {"op": "gemm_io", "names": names}
        self.transcript.metadata("to_device", "gemm_io", json.dumps(header).encode())
        return self._call(header, {})[1]

    def put(self, name: str, tensor: torch.Tensor) -> None:
        header = {"op": "put", "name": name}
        self.transcript.metadata("to_device", "put", json.dumps(header).encode())
        self.transcript.tensor("to_device", name, tensor)
        self._call(header, {name: tensor})

    def call(
        self, op: str, args: dict[str, torch.Tensor], params: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        header = {"op": "call", "call": op, "params": params}
        self.transcript.metadata("to_device", "call", json.dumps(header).encode())
        for name, tensor in args.items():
            self.transcript.tensor("to_device", name, tensor)
        return self._call(header, args)[1]

    def dump(self) -> dict[str, torch.Tensor]:
        return self._call({"op": "dump"}, {})[1]

    def _why_lost(self, *, stalled: bool) -> str:
        """Reap the device process (killing a stalled one) and say how it ended."""
        if stalled:
            self.process.kill()
        try:
            code = self.process.wait(timeout=10)  # its pipe closes just before it is reapable
        except subprocess.TimeoutExpired:  # it closed its pipe but lives on: end it
            self.process.kill()
            code = self.process.wait()
        if stalled:
            return f"the device process did not answer within {self.conn.timeout_s:g}s (killed)"
        if code < 0:
            return f"the device process was killed by {signal.Signals(-code).name}"
        return f"the device process exited with code {code}"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                send(self.conn, {"op": "close"}, {})
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):  # OSError: TimeoutError too
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


def serve(conn: Channel, threads: int) -> None:
    """The device process: answer messages until told to close."""
    torch.set_num_threads(threads)
    prefix: PublicPrefix | None = None
    store = OffloadStore("cpu")
    while True:
        try:
            (header, tensors), _ = receive(conn)
        except EOFError:  # the TD went away
            return
        op = header["op"]
        try:
            if op == "close":
                return
            if op == "load":
                prefix = PublicPrefix(PrefixShape(**header["shape"]), tensors)
                send(conn, {"ok": True}, {})
            elif op == "run" and prefix is not None:
                hidden = prefix.run(tensors["tokens"], header["slots"], header["starts"])
                send(conn, {"ok": True}, {"hidden": hidden})
            elif op == "gemm_io" and prefix is not None:
                send(conn, {"ok": True}, prefix.gemm_io_of(header["names"]))
            elif op == "put":
                store.put(header["name"], tensors[header["name"]])
                send(conn, {"ok": True}, {})
            elif op == "call":
                send(conn, {"ok": True}, store.call(header["call"], tensors, header["params"]))
            elif op == "dump":
                held = store.held()
                if prefix is not None:
                    held |= prefix.held_weights() | prefix.held_caches()
                send(conn, {"ok": True}, held)
            else:
                send(conn, {"error": f"cannot {op} now"}, {})
        except (ValueError, RuntimeError, KeyError) as exc:
            send(conn, {"error": str(exc)}, {})


if __name__ == "__main__":
    serve(Channel(sys.stdin.buffer, sys.stdout.buffer), int(sys.argv[1]))
