"""Tensor-parallel targets: one DeepSpeed AutoTP rank per process, driven by rank 0.

The target group is ``world_size`` processes (Ray actors in ``runtime``; plain processes work too). Each
builds a DeepSpeed inference engine over a torch.distributed world that holds **only the target's ranks**
(the draft never joins it: DeepSpeed builds its TP group over the whole world, and on CPU its shared-memory
all-reduce waits for every rank of the world, so a foreign rank hangs the first forward).

Rank 0 runs the decoding loop over ``TPBatchedLeader``, the slot cache of the batched rounds: every
operation first goes to the other ranks as a broadcast of a small int64 tensor over the TP group (the same
group the all-reduces use), then runs locally; the forwards of all ranks meet in AutoTP's all-reduces.
Rank 0's model itself is a ``TPLeaderModel``, a one-sequence ``CausalLM`` on each rank's own runner cache,
apart from the slot cache: ``TargetLeader.time_forward`` times the target with it (the auto gamma of
``Coordinator.measure``) and ``TargetLeader.score`` reads logits. The other ranks sit in ``follow``:
receive an operation, run it, repeat until ``OP_STOP``. Only rank 0 reads the logits.

Loading: ``load_sharded`` builds the model on the meta device and lets AutoTP read the checkpoint's
safetensors files one by one, keeping each rank's slice only, so no rank ever holds the whole model (the
way a 70B target fits 4 or 8 GPUs). Otherwise every rank loads the full model on the host and AutoTP slices it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidParameterError, ModelNotFoundError

log = logging.getLogger(__name__)

OP_FORWARD, OP_CROP, OP_RESET, OP_STOP = 1, 2, 3, 4
"""``TPLeaderModel``'s operations on the runners' own one-sequence caches, and the end of ``follow``."""
OP_BATCH_FORWARD, OP_BATCH_CROP, OP_BATCH_RELEASE = 5, 6, 7
"""The slot cache's operations (``modeling.batched``): one broadcast carries a whole batched forward."""
HEADER = 4  # op, n_ids, num_logits, crop length


class TPGroup:
    """The TP world as seen by one rank: broadcasts of operations from rank 0 (torch.distributed default group,
    which DeepSpeed initialised with exactly the target's ranks)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def send_op(self, op: int, ids: list[int] = (), num_logits: int = 0, length: int = 0) -> None:
        import torch.distributed as dist

        header = torch.tensor([op, len(ids), num_logits, length], dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        if ids:
            dist.broadcast(torch.tensor(list(ids), dtype=torch.int64, device=self.device), src=0)

    def recv_op(self) -> tuple[int, list[int], int, int]:
        import torch.distributed as dist

        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        dist.broadcast(header, src=0)
        op, n, num_logits, length = header.tolist()
        ids: list[int] = []
        if n:
            buf = torch.empty(n, dtype=torch.int64, device=self.device)
            dist.broadcast(buf, src=0)
            ids = buf.tolist()
        return op, ids, num_logits, length


class TPLeaderModel:
    """Rank 0's one-sequence ``core.sides.CausalLM`` (timing and scoring, apart from the slot cache): the local
    shard's runner, with every operation mirrored to the group."""

    def __init__(self, runner, group: TPGroup):
        self.runner, self.group = runner, group
        self.vocab_size, self.max_context = runner.vocab_size, runner.max_context
        self.stopped = False

    @property
    def cache_len(self) -> int:
        return self.runner.cache_len

    def reset(self) -> None:
        self.group.send_op(OP_RESET)
        self.runner.reset()

    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        self.group.send_op(OP_FORWARD, token_ids, num_logits)
        return self.runner.forward(token_ids, num_logits)

    def crop(self, length: int) -> None:
        self.group.send_op(OP_CROP, length=length)
        self.runner.crop(length)

    def stop_group(self) -> None:
        """Release the followers from ``follow`` (they return "stopped")."""
        if not self.stopped:
            self.stopped = True
            self.group.send_op(OP_STOP)


def encode_feeds(feeds: dict[int, tuple[list[int], int]]) -> list[int]:
    """A batched forward as one int list: [n, (slot, n_ids, num_logits) * n, ids of every slot in order]."""
    head, ids = [len(feeds)], []
    for slot, (tokens, k) in feeds.items():
        head += [slot, len(tokens), k]
        ids += list(tokens)
    return head + ids


def decode_feeds(payload: list[int]) -> dict[int, tuple[list[int], int]]:
    n = payload[0]
    feeds, at = {}, 1 + 3 * n
    for i in range(n):
        slot, count, k = payload[1 + 3 * i: 4 + 3 * i]
        feeds[slot] = (payload[at: at + count], k)
        at += count
    return feeds


class TPBatchedLeader:
    """Rank 0's ``core.sides.BatchedLM``: the local shard's slot cache, each operation first broadcast to the
    group (a batched forward is one op: every slot's new ids, lengths and logit counts), so that every rank's
    cache makes the same moves and their forwards meet in AutoTP's all-reduces."""

    def __init__(self, lm, group: TPGroup):
        self.lm, self.group = lm, group
        self.vocab_size, self.max_context = lm.vocab_size, lm.max_context

    def forward(self, feeds):
        self.group.send_op(OP_BATCH_FORWARD, encode_feeds(feeds))
        return self.lm.forward(feeds)

    def crop(self, slot: int, length: int) -> None:
        self.group.send_op(OP_BATCH_CROP, [slot], length=length)
        self.lm.crop(slot, length)

    def release(self, slot: int) -> None:
        self.group.send_op(OP_BATCH_RELEASE, [slot])
        self.lm.release(slot)

    def cache_len(self, slot: int) -> int:
        return self.lm.cache_len(slot)

    @property
    def slots(self) -> list[int]:
        return self.lm.slots


def follow(runner, group: TPGroup, batched=None) -> str:
    """A non-leader rank's loop: run rank 0's operations on the local shard until ``OP_STOP``. The slot cache
    (``batched``, built over the runner's model on the first batched op unless given) mirrors rank 0's."""
    while True:
        op, ids, num_logits, length = group.recv_op()
        if op in (OP_BATCH_FORWARD, OP_BATCH_CROP, OP_BATCH_RELEASE):
            if batched is None:
                from .batched import BatchedHFCausalLM

                batched = BatchedHFCausalLM(runner.model, runner.vocab_size)
                batched.to_host = False
            if op == OP_BATCH_FORWARD:
                batched.forward(decode_feeds(ids))
            elif op == OP_BATCH_CROP:
                batched.crop(ids[0], length)
            else:
                batched.release(ids[0])
            continue
        if op == OP_FORWARD:  # the same shapes as rank 0 (AutoTP's lm_head all-reduces them); logits unused
            runner.forward(ids, num_logits, to_host=False)
        elif op == OP_CROP:
            runner.crop(length)
        elif op == OP_RESET:
            runner.reset()
        elif op == OP_STOP:
            return "stopped"
        else:
            raise RuntimeError(f"tensor-parallel rank {group.rank}: unknown operation {op}")


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a model dir, in the index's order (sharded) or the single file."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        raise ModelNotFoundError(f"sharded loading needs safetensors weights in {path!r} (none found); "
                                 f"pass load_sharded=False to load the whole model on each rank")
    return [str(root / n) for n in names]


@dataclass(frozen=True)
class TPModelFactory:
    """Builds one rank of a tensor-parallel target inside its process (a Ray actor). Rank 0 returns
    ``(TPLeaderModel, tokenizer)``, the others ``(HFCausalLM, None)`` for ``follow``.

    ``master_addr``/``master_port``: the rendezvous of the TP world (rank 0's node and a free port there).
    ``local_rank``: the device index this rank uses (0 when Ray gives each actor one GPU), and on CPU the
    rank's slot in DeepSpeed's shared-memory all-reduce (ranks of one node: 0..world_size-1)."""

    path: str
    rank: int
    world_size: int
    master_addr: str
    master_port: int
    device: str = "cpu"
    dtype: str = "float32"
    with_tokenizer: bool = False
    load_sharded: bool = True
    kernel_inject: bool = False
    timeout_s: float = 86400.0
    """The TP world's collective timeout: how long followers may wait idle for the next operation."""

    def __call__(self):
        return build_tp_rank(self)


def _device_for(device: str) -> torch.device:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidParameterError(f"device {device!r} requested but CUDA is not available")
        index = 0 if device == "cuda" else int(device.split(":")[1])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's file of DeepSpeed's shared-memory all-reduce from /dev/shm, keeping its mapping.

    On CPU, DeepSpeed's all-reduce gives each rank a 66 MB file in /dev/shm (RAM) that every rank maps while
    ``init_distributed`` runs, and it never removes them: each group's start would leave its files behind until
    the machine's memory runs out. After a barrier every rank has mapped every file, so each rank unlinks its
    own; the memory is freed when the last process that maps it exits, however it exits. A build without the
    shared-memory op (no compiler) makes no file, and this only passes the barrier."""
    import torch.distributed as dist

    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_{rank}"
    dist.barrier()
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def build_tp_rank(f: TPModelFactory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf import HFCausalLM, resolve_dtype
    from .resolve import load_tokenizer, resolve_path, vocab_map

    if f.world_size < 1 or not 0 <= f.rank < f.world_size:
        raise InvalidParameterError(f"rank {f.rank} is not in a tensor-parallel world of {f.world_size}")
    dev = _device_for(f.device)
    on_cpu = dev.type == "cpu"
    os.environ.update({"RANK": str(f.rank), "WORLD_SIZE": str(f.world_size), "MASTER_ADDR": f.master_addr,
                       "MASTER_PORT": str(f.master_port),
                       # DeepSpeed's CPU all-reduce works over shared memory among LOCAL_SIZE ranks of a node;
                       # without LOCAL_SIZE the first forward crashes.
                       "LOCAL_RANK": str(f.rank if on_cpu else (dev.index or 0)),
                       "LOCAL_SIZE": str(f.world_size)})
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=f.timeout_s))
        if on_cpu:
            unlink_shm_buffer(f.rank)
    if dist.get_world_size() != f.world_size:
        raise RuntimeError(f"this process's torch.distributed world has {dist.get_world_size()} ranks, "
                           f"the target group {f.world_size}: the world must hold exactly the target's ranks")
    path = resolve_path(f.path)
    if vocab_map(path) is not None:
        raise InvalidParameterError("a reduced-vocabulary draft cannot be a tensor-parallel target")
    torch_dtype = resolve_dtype(f.dtype)
    ds_kwargs = {"tensor_parallel": {"tp_size": f.world_size}, "dtype": torch_dtype,
                 "replace_with_kernel_inject": f.kernel_inject}
    if f.kernel_inject and on_cpu:
        raise InvalidParameterError("kernel injection needs CUDA (DeepSpeed has no CPU kernels for it)")
    try:
        config = AutoConfig.from_pretrained(path)
        if f.load_sharded:
            # no weights in memory yet: AutoTP fills each rank's slice from the checkpoint files
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            ds_kwargs["checkpoint"] = {"type": "ds_model", "version": 1.0, "checkpoints": checkpoint_files(path)}
            ds_kwargs["base_dir"] = ""
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as exc:
        raise ModelNotFoundError(f"could not load the target {f.path!r}: {exc}") from exc
    engine = deepspeed.init_inference(model.eval(), **ds_kwargs)
    module = engine.module
    if f.load_sharded:
        rebuild_buffers(module, dev)
        if getattr(config, "tie_word_embeddings", False):
            module.tie_weights()
    tokenizer = load_tokenizer(path, f.path) if f.with_tokenizer else None
    vocab = max(len(tokenizer), config.vocab_size) if tokenizer is not None else config.vocab_size
    runner = HFCausalLM(module, vocab)
    log.info("tensor-parallel rank %d/%d ready on %s (%s)", f.rank, f.world_size, dev, f.dtype)
    if f.rank == 0:
        return TPLeaderModel(runner, TPGroup(0, f.world_size, dev)), tokenizer
    return runner, None


def rebuild_buffers(model, device: torch.device) -> None:
    """Recompute the non-persistent buffers (rotary ``inv_freq`` and the like) of a model built on the meta
    device: they are not in the checkpoint, and moving a meta model to a device leaves them uninitialised.
    Each module holding some is rebuilt from its ``config`` on the CPU and its buffers copied over."""
    for name, mod in model.named_modules():
        names = [b for b in getattr(mod, "_non_persistent_buffers_set", ()) if getattr(mod, b, None) is not None]
        if not names:
            continue
        try:
            fresh = type(mod)(mod.config)
        except Exception as exc:  # noqa: BLE001 - an architecture this rule does not cover
            raise RuntimeError(f"cannot rebuild the buffers {names} of {name or 'the model'} "
                               f"({type(mod).__name__}) after sharded loading: {exc}; use load_sharded=False") from exc
        for b in names:
            setattr(mod, b, getattr(fresh, b).to(device))


def rank_group(f: TPModelFactory) -> TPGroup:
    return TPGroup(f.rank, f.world_size, _device_for(f.device))
