"""A private gloo link between the target leader (rank 0) and the draft worker (rank 1), and its setup.

The leader's side of the rounds is ``transports.GlooDraftPhase`` (the batched rounds of the leader's loop);
the draft's side is ``serve_rounds`` running ``draft_frame_handler`` in a long-running
``DraftWorker.serve_link`` call.

Why torch.distributed's ``ProcessGroupGloo`` built directly on a ``TCPStore``, and not
``ray.util.collective`` or ``init_process_group``: those set up the process-wide default group, and a
DeepSpeed tensor-parallel target initialises that same default group in its actors (the notes' gotcha).
A standalone group touches no global state, so it can sit beside DeepSpeed's world, and it binds to the
address we give it (the node's Ray address; 127.0.0.1 in tests) instead of whatever the hostname resolves to.

**Tensor lane.** The draft's fp32 probability rows (only when sampling: ``[gamma, vocab]``, megabytes for a
128k vocabulary) may travel on a second group built on the same store: NCCL when the draft and the leader
sit on different GPUs (``choose_lane``), so those bytes take NVLink / InfiniBand instead of TCP; frames, ids
and every control message stay on gloo. The lane is chosen once per link and logged. ``lane="gloo"`` builds
the same two-group link with gloo as the lane: the CPU twin the tests run. (The rows are moved to the host
for the decision on both ends, where the leader's verification runs.)

Gloo facts this relies on (checked with torch 2.13 on CPU): point-to-point send/recv over TCP,
about 0.25 ms for a 1 KiB round trip to two peers; a dead peer fails a pending ``wait`` at once
("connection closed by peer"); a ``wait`` that times out closes the pair for good. So a timeout or error
breaks the link: the requests the draft held go on on the target alone and the coordinator replaces the draft,
which brings a fresh link for the requests that join after it.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import wire

log = logging.getLogger(__name__)


class LinkError(RuntimeError):
    """The link timed out or a peer went away; it cannot be used again."""


LANES = (None, "gloo", "nccl")


def choose_lane(setting: str, draft: dict, target: dict) -> tuple[str | None, str]:
    """Which group carries the probability rows, from the ``tensor_lane`` setting and the two workers'
    ``info()`` (``device``, ``node_id``, ``gpu_ids``): returns (lane, reason); lane None = the gloo link itself.

    Example:
        >>> choose_lane("auto", {"device": "cuda", "node_id": "a", "gpu_ids": [0]},
        ...             {"device": "cuda", "node_id": "a", "gpu_ids": [1]})
        ('nccl', 'draft and target leader on different GPUs (node a GPU [0] / node a GPU [1])')
    """
    on_cuda = str(draft.get("device", "cpu")).startswith("cuda") and str(target.get("device", "cpu")).startswith("cuda")
    where = (f"node {draft.get('node_id')} GPU {draft.get('gpu_ids')} / "
             f"node {target.get('node_id')} GPU {target.get('gpu_ids')}")
    shared = draft.get("node_id") == target.get("node_id") and bool(
        set(map(str, draft.get("gpu_ids") or [])) & set(map(str, target.get("gpu_ids") or [])))
    if setting == "gloo":
        return "gloo", "tensor_lane='gloo' (a separate gloo group: the CPU twin of the NCCL lane)"
    if setting == "nccl":
        if not on_cuda or shared:
            raise ValueError(f"tensor_lane='nccl' needs the draft and the target leader on different CUDA GPUs ({where})")
        return "nccl", f"tensor_lane='nccl' ({where})"
    if not on_cuda:
        return None, "not both on CUDA: gloo carries everything"
    if shared:
        return None, f"draft and target leader share a GPU ({where}): gloo carries everything"
    return "nccl", f"draft and target leader on different GPUs ({where})"


class TensorLane:
    """A second two-rank group on the link's store for the fp32 probability rows (see the module docstring)."""

    def __init__(self, store, name: str, rank: int, backend: str, timeout_s: float, host: str):
        self.backend = backend
        prefixed = dist.PrefixStore(name + "/lane", store)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = datetime.timedelta(seconds=timeout_s)
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        else:
            opts = dist.ProcessGroupGloo._Options()
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            opts._timeout = datetime.timedelta(seconds=timeout_s)
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(prefixed, rank, 2, opts)

    def send(self, tensor: torch.Tensor, dst: int):
        t = tensor.to(self.device).contiguous()
        return self.pg.send([t], dst, 0), t

    def recv(self, shape, dtype, src: int):
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return self.pg.recv([buf], src, 0), buf

    def close(self) -> None:
        try:
            self.pg.abort()
        except Exception as exc:  # noqa: BLE001 - already broken
            log.debug("lane abort: %s", exc)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listening_store(host: str, port: int, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """The server side of a ``TCPStore`` that listens on ``host`` only (0: a free port). TCPStore's own
    listener binds every interface whatever its host argument, and the store answers anyone, so the socket
    is bound here and handed over (``master_listen_fd``; the store then owns and closes it)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
        sock.listen(128)
        bound = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return dist.TCPStore(host, bound, world_size, True, timeout=timeout, wait_for_workers=False,
                             master_listen_fd=fd)
    except Exception:
        os.close(fd)
        raise


class GlooLink:
    """One rank's end of a small gloo group. Rank 0 creates the store (``port=0`` picks a free port).
    ``lane``: None, or "gloo"/"nccl" for a tensor lane that carries the fp32 tensors (``TensorLane``)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, name: str,
                 timeout_s: float = 3600.0, connect_timeout_s: float = 60.0, lane: str | None = None):
        if lane not in LANES or (lane and world_size != 2):
            raise ValueError(f"lane must be one of {LANES} (on a two-rank link), got {lane!r}")
        self.lane_backend, self.lane = lane, None
        self.rank, self.world_size, self.name = rank, world_size, name
        timeout = datetime.timedelta(seconds=connect_timeout_s)
        if rank == 0:
            self.store = listening_store(host, port, world_size, timeout)
        else:
            self.store = dist.TCPStore(host, port, world_size, False, timeout=timeout, wait_for_workers=False)
        self.host, self.port = host, self.store.port
        self.timeout_s = timeout_s  # the group's default; every wait below passes its own
        self.pg = None

    def connect(self) -> None:
        """Join the group (blocks until every rank has joined, bounded by the store's timeout)."""
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]
        opts._timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            self.pg = dist.ProcessGroupGloo(dist.PrefixStore(self.name, self.store), self.rank, self.world_size, opts)
            if self.lane_backend:
                self.lane = TensorLane(self.store, self.name, self.rank, self.lane_backend, self.timeout_s, self.host)
        except RuntimeError as exc:
            raise LinkError(f"gloo link {self.name}: rank {self.rank} could not connect: {exc}") from exc

    @staticmethod
    def wait(work, timeout_s: float, what: str) -> None:
        """Wait for a posted send or receive, at most ``timeout_s``; a timeout or a closed pair is a LinkError."""
        try:
            work.wait(datetime.timedelta(seconds=max(timeout_s, 1e-3)))
        except RuntimeError as exc:
            raise LinkError(f"{what}: {str(exc)[:200]}") from exc

    def post_send(self, tensors: list[torch.Tensor], dst: int) -> list:
        """Post the sends without waiting; returns their works (the tensors must outlive them). fp32 tensors
        go on the tensor lane when there is one."""
        try:
            works = []
            for t in tensors:
                if self.lane is not None and t.dtype == torch.float32:
                    work, staged = self.lane.send(t, dst)
                    self._staged = staged  # a device copy must outlive its send too
                    works.append(work)
                else:
                    works.append(self.pg.send([t], dst, 0))
            return works
        except (RuntimeError, AttributeError) as exc:  # a closed pair, or this end already closed
            raise LinkError(f"send: {str(exc)[:200]}") from exc

    def send(self, tensors: list[torch.Tensor], dst: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for w in self.post_send(tensors, dst):
            self.wait(w, deadline - time.monotonic(), f"send to rank {dst}")

    def recv_frame(self, src: int):
        """Post a receive for the next frame from ``src``; returns (work, frame buffer)."""
        frame = torch.empty(wire.FRAME, dtype=torch.int64)
        try:
            return self.pg.recv([frame], src, 0), frame
        except (RuntimeError, AttributeError) as exc:
            raise LinkError(f"recv: {str(exc)[:200]}") from exc

    def recv_tensor(self, src: int, shape, dtype, timeout_s: float) -> torch.Tensor:
        """The next tensor from ``src`` (fp32 ones from the tensor lane when there is one), on the host."""
        try:
            if self.lane is not None and dtype == torch.float32:
                work, buf = self.lane.recv(shape, dtype, src)
            else:
                buf = torch.empty(shape, dtype=dtype)
                work = self.pg.recv([buf], src, 0)
        except (RuntimeError, AttributeError) as exc:
            raise LinkError(f"recv: {str(exc)[:200]}") from exc
        self.wait(work, timeout_s, f"recv from rank {src}")
        return buf.cpu()

    def close(self) -> None:
        lane, self.lane = self.lane, None
        if lane is not None:
            lane.close()
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                pg.abort()
            except Exception as exc:  # already broken: nothing more to free
                log.debug("gloo abort: %s", exc)
        self.store = None


def draft_frame_handler(worker) -> Callable:
    """The draft's answer to each batched round's message, for ``serve_rounds``: ``worker`` has
    ``batch_round(starts, releases, reqs)``, as ``workers.DraftWorker`` does."""

    def on_frame(frame, recv):
        op = int(frame[0])
        if op == wire.OP_BATCH:
            return wire.encode_batch_reply(worker.batch_round(*wire.decode_batch(frame, recv)))
        raise ValueError(f"unexpected op {op}")

    return on_frame


def serve_rounds(link: GlooLink, on_frame: Callable, reply_timeout_s: float, idle_timeout_s: float) -> str:
    """A worker's persistent loop: receive a frame from rank 0, answer it with ``on_frame(frame, recv)``
    (the tensors to send back); until a stop frame, a broken link, or ``idle_timeout_s`` without a frame.
    Returns why it ended. (Polling instead of blocking was tried: on 2 cores it made the hop slower.)"""
    try:
        link.connect()
        while True:
            work, frame = link.recv_frame(0)
            link.wait(work, idle_timeout_s, "waiting for the next round")
            if int(frame[0]) == wire.OP_STOP:
                return "stopped"
            try:
                reply = on_frame(frame, lambda shape, dtype: link.recv_tensor(0, shape, dtype, reply_timeout_s))
            except LinkError:
                raise
            except Exception as exc:  # the request failed here: tell rank 0, keep serving
                log.warning("request (op %d) failed in the worker: %s", int(frame[0]), exc)
                reply = [wire.error_frame(int(frame[1]))]
            link.send(reply, 0, reply_timeout_s)
    except LinkError as exc:
        return f"link closed: {exc}"
    finally:
        link.close()


def open_draft_link(leader, draft, reply_timeout_s: float, idle_timeout_s: float, connect_timeout_s: float,
                    lane: str | None = None):
    """Link a target leader to a draft worker (both Ray actor handles): the leader opens rank 0 on its node's
    address and a free port, the draft joins as rank 1 in a long-running ``serve_link`` call, and the leader
    connects. Returns that call's ref (ready = the draft's loop ended). Raises on failure (bounded waits)."""
    import uuid

    import ray

    name = f"pearl-{uuid.uuid4().hex[:12]}"
    host, port = ray.get(leader.open_link.remote(name, idle_timeout_s, connect_timeout_s, lane),
                         timeout=connect_timeout_s)
    loop_ref = draft.serve_link.remote(host, port, name, reply_timeout_s, idle_timeout_s, connect_timeout_s, lane)
    ray.get(leader.connect_link.remote(), timeout=connect_timeout_s + 5)
    return loop_ref
