"""Weights from the trainer to one replica over a two-process gloo group (the gloo path).

Each replica gets its own group of two: the trainer is rank 0 and hosts the rendezvous
(a ``TCPStore`` on a free port), the replica is rank 1. Groups of two keep failures
apart: a replica that dies breaks only its own link, and a replica that comes back gets
a new one without touching the others. Every send and receive waits at most the
group's timeout, and a closed peer fails at once (gloo: "Connection closed by peer").

An update is a sequence of buckets, each sent as three messages: its header's length
(one int64), the header (UTF-8 JSON: the version and, per tensor, name, dtype, shape,
byte offset), and the bucket's bytes (one flat uint8 tensor). A header with ``"end":
true`` closes the update with the count of tensors and bytes sent, which the receiver
checks; one with ``"abort"`` (the trainer's weights failed between two buckets) ends it
at once, as a failure.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


_ALIGN = 16  # bytes: every tensor in a bucket starts at a multiple of this


def _timeout(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def pack_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[tuple[list[list[Any]], torch.Tensor]]:
    """``(entries, flat)`` per bucket: ``entries`` are ``[name, dtype, shape, offset]`` and
    ``flat`` the bucket's bytes; a tensor larger than ``bucket_bytes`` is a bucket alone.
    Each tensor starts at a multiple of 16 bytes, so the receiver can view any dtype in
    place (a float32 after a 3-element bf16 would otherwise sit at byte 6)."""
    import torch

    entries: list[list[Any]] = []
    parts: list[torch.Tensor] = []
    size = 0
    for name, tensor in weights:
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8)
        if parts and size + raw.numel() > bucket_bytes:
            yield entries, torch.cat(parts)
            entries, parts, size = [], [], 0
        if size % _ALIGN:
            pad = _ALIGN - size % _ALIGN
            parts.append(torch.zeros(pad, dtype=torch.uint8))
            size += pad
        entries.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), size])
        parts.append(raw)
        size += raw.numel()
    if parts:
        yield entries, torch.cat(parts)


class _Link:
    def __init__(self, store, rank: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self.timeout_s = timeout_s
        self._pg = dist.ProcessGroupGloo(
            dist.PrefixStore("agent-spo-weights", store), rank, 2, _timeout(timeout_s)
        )
        self._store = store
        self.peer = 1 - rank

    def _send(self, t: torch.Tensor):
        return self._pg.send([t], self.peer, 0)  # type: ignore[attr-defined]  # a Work

    def _recv(self, t: torch.Tensor) -> torch.Tensor:
        self._pg.recv([t], self.peer, 0).wait()  # type: ignore[attr-defined]
        return t

    def post(self, header: dict[str, Any], flat: torch.Tensor | None = None) -> list:
        """Start sending one message; returns the sends to wait for."""
        import torch

        data = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
        works = [self._send(torch.tensor([data.numel()], dtype=torch.int64)), self._send(data)]
        if flat is not None:
            works.append(self._send(flat))
        return works

    def send_message(self, header: dict[str, Any], flat: torch.Tensor | None = None) -> None:
        for w in self.post(header, flat):
            w.wait()

    def recv_header(self) -> dict[str, Any]:
        import torch

        n = int(self._recv(torch.empty(1, dtype=torch.int64))[0])
        raw = self._recv(torch.empty(n, dtype=torch.uint8))
        return json.loads(bytes(raw.numpy()).decode())

    def close(self) -> None:
        self._pg = None  # type: ignore[assignment]
        self._store = None


class GlooSender(_Link):
    """The trainer's end: hosts the rendezvous on ``port`` (0: a free one, see ``.port``);
    :meth:`connect` returns once the replica has joined, or raises after ``timeout_s``."""

    def __init__(self, host: str = "127.0.0.1", *, timeout_s: float = 300.0) -> None:
        from torch.distributed import TCPStore

        self.host = host
        self.timeout_s = timeout_s
        self.store = TCPStore(host, 0, 2, True, timeout=_timeout(timeout_s), wait_for_workers=False)
        self.port = int(self.store.port)

    def connect(self) -> GlooSender:
        _Link.__init__(self, self.store, 0, self.timeout_s)
        return self

    def close(self) -> None:
        super().close()
        self.store = None  # type: ignore[assignment]  # stops listening


class GlooReceiver(_Link):
    """The replica's end: joins the trainer's rendezvous at ``host:port``."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 300.0) -> None:
        from torch.distributed import TCPStore

        store = TCPStore(host, port, 2, False, timeout=_timeout(timeout_s))
        super().__init__(store, 1, timeout_s)


class IncomingUpdate:
    """One update as it arrives: iterate for ``(name, tensor)``, one bucket in memory at a
    time. ``streaming`` tells the engine the names and shapes are not known up front, so
    it checks each tensor as it comes (see :meth:`HFEngine.update_weights`)."""

    streaming = True
    shapes = None

    def __init__(self, link: GlooReceiver, version: int) -> None:
        self.link = link
        self.version = version
        self.bytes = 0
        self.count = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        while True:
            header = self.link.recv_header()
            if header.get("version") != self.version:
                raise ValueError(
                    f"the trainer sent version {header.get('version')}, expected {self.version}"
                )
            if "abort" in header:
                raise ValueError(f"the trainer abandoned the update: {header['abort']}")
            if header.get("end"):
                if header["count"] != self.count or header["bytes"] != self.bytes:
                    raise ValueError(
                        f"update ended after {self.count} tensors / {self.bytes} bytes; the "
                        f"trainer sent {header['count']} / {header['bytes']}"
                    )
                return
            entries = header["tensors"]
            sizes = [
                (torch.Size(shape).numel())
                * torch.empty((), dtype=getattr(torch, dt)).element_size()
                for _, dt, shape, _ in entries
            ]
            flat = self.link._recv(torch.empty(entries[-1][3] + sizes[-1], dtype=torch.uint8))
            self.bytes += flat.numel()
            for (name, dt, shape, offset), n in zip(entries, sizes, strict=True):
                self.count += 1
                yield name, flat[offset : offset + n].view(getattr(torch, dt)).view(shape)
