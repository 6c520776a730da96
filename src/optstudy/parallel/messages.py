"""The messages of the asynchronous trainers (Downpour, asynchronous EASGD) over ``torch.distributed``'s
point-to-point ``send``/``recv`` (gloo): a server (rank 0) and workers (ranks 1..N).

A worker starts every message with a header, a float64 vector of ``HEADER + extra`` numbers; the server receives
headers from any worker (``serve``: ``recv`` without ``src``, which returns the sender) and then any tensor that
follows from that worker only. One message at a time per worker, and the pair's messages arrive in order, so a
header can never be mistaken for a payload; tags keep the kinds apart anyway.

Header: ``[kind, gradients, loss, worker_step, counted, extra...]``: ``gradients`` the number of minibatch
gradients the message carries (Downpour's push) and ``extra`` the parameter versions they were computed at;
``loss`` their mean training loss; ``worker_step`` the worker's own step count; ``counted`` the gradients the
worker computed since its previous message (the server counts epochs with them).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist

PULL, PUSH, EXCHANGE, PROGRESS, DONE = range(5)  # message kinds
HEADER = 5  # fixed fields; extra fields follow
TAG_HEADER, TAG_PAYLOAD, TAG_REPLY, TAG_VERSION = 1, 2, 3, 4


def init(rank: int, world: int, backend: str = "gloo") -> None:
    """Joins the process group from the environment ``launch`` set (``MASTER_ADDR``/``MASTER_PORT``). A long
    timeout: a server waits for workers as long as an epoch of theirs takes."""
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(hours=2))


def header(kind: int, extra: int, gradients: int = 0, loss: float = float("nan"), worker_step: int = 0,
           counted: int = 0, versions=()) -> torch.Tensor:
    h = torch.full((HEADER + extra,), -1.0, dtype=torch.float64)
    h[:HEADER] = torch.tensor([kind, gradients, loss, worker_step, counted], dtype=torch.float64)
    if len(versions):
        h[HEADER:HEADER + len(versions)] = torch.tensor(list(versions), dtype=torch.float64)
    return h


def send_header(h: torch.Tensor) -> None:
    dist.send(h, 0, tag=TAG_HEADER)


class Header(NamedTuple):
    """A received header's fields (the module docstring); ``versions``: the first ``gradients`` extra fields."""

    kind: int
    gradients: int
    loss: float
    worker_step: int
    counted: int
    versions: list[int]


def serve(workers: int, extra: int) -> Iterator[tuple[int, Header]]:
    """A server's loop: ``(sender rank, header)`` of every message from any worker, in order of arrival, until the
    last of the ``workers`` has sent ``DONE`` (that header is yielded too). The caller receives what follows a
    header (``receive``) before it asks for the next one."""
    done = 0
    while done < workers:
        h = torch.empty(HEADER + extra, dtype=torch.float64)
        src = dist.recv(h, tag=TAG_HEADER)
        kind, gradients, loss, worker_step, counted = h[:HEADER].tolist()
        versions = [int(v) for v in h[HEADER:HEADER + int(gradients)].tolist()]
        yield src, Header(int(kind), int(gradients), loss, int(worker_step), int(counted), versions)
        if kind == DONE:
            done += 1


def send(t: torch.Tensor, dst: int, tag: int) -> None:
    dist.send(t.detach().cpu().contiguous(), dst, tag=tag)  # gloo: CPU tensors


def receive(numel: int, dtype: torch.dtype, src: int, tag: int) -> torch.Tensor:
    t = torch.empty(numel, dtype=dtype)
    dist.recv(t, src, tag=tag)
    return t


class EpochCounter:
    """The server's epochs: epoch e of the run ends when the workers together have computed
    ``(e + 1) * workers * steps_per_epoch`` gradients (each worker's shard holds ``steps_per_epoch`` batches)."""

    def __init__(self, workers: int, steps_per_epoch: int, epochs: int):
        self.per_epoch, self.epochs = workers * steps_per_epoch, epochs
        self.counted, self.epoch = 0, 0

    def add(self, n: int) -> list[int]:
        """Counts ``n`` gradients; returns the epochs that ended with them."""
        self.counted += n
        ended = []
        while self.epoch < self.epochs and self.counted >= (self.epoch + 1) * self.per_epoch:
            ended.append(self.epoch)
            self.epoch += 1
        return ended
