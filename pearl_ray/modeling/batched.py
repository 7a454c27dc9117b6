"""A KV cache with one slot per request, and one forward over many slots: ``core.sides.BatchedLM`` for
Hugging Face causal LMs (Llama, Qwen2/3, Mistral, Phi-3, Gemma-2/3 families: any model that takes
``position_ids`` and ready-made 4D masks, per layer type where it has sliding-window layers; see
``modeling.families``), in float32 or bfloat16, on CPU or CUDA.

Cache design: a preallocated store (``modeling.slot_cache.SlotStore``), one row per slot.

- A slot takes the lowest free row when it first appears and keeps it until ``release``. The row holds the
  slot's sequence at positions ``0 .. n - 1`` in order; ``n`` (``cache_len``) is an integer kept here.
- A forward writes each row's new keys at its own positions (``start + j``); a rollback (``crop``) lowers
  ``n``. A join or a leave touches only its own row: nothing is concatenated, gathered or compacted.
- Decoding rows run as one forward over store rows ``0 .. B-1`` (``B`` = the highest row fed, plus one), each
  row's tokens right-padded to the widest feed. A row with nothing to feed that forward is all padding; its
  padding is written past its length, where nothing reads it. Attention reads a view of the store, each
  query masked to its own row's positions (``slot_cache.slot_mask``, which also applies sliding windows), so
  it spans the longest live row and no holes.
- New slots' prompts run apart from the decoding rows: those that join in the same forward together
  (right-padded; groups keep the padding within ``prefill_pad_ratio`` of their real tokens), attending to
  their own new keys only, which are written into their rows.
- A prompt fed in chunks (a feed that asks for no logits, ``num_logits == 0``, on a slot not yet decoding)
  is *staged*: each chunk runs as a forward of that row alone, so a chunk never pads the decoding rows (nor
  they it). The slot's first feed that asks for logits ends its prompt; from then on it decodes with the
  others.

Capacity: every row has the same number of positions (the store is a rectangle; ``slot_cache`` says why).
The store grows on demand, or is sized once with ``reserve`` (or the ``rows`` / ``max_len`` arguments);
after that it is never reallocated. Memory: ``2 * layers * kv_heads * head_dim * bytes`` per position
(SmolLM2-135M in fp32: 46 KB; the 4-layer draft: 6 KB) times rows times positions per row.
``cache_bytes`` is what the store holds, ``held_positions`` what the live rows use.

Compiled forwards (``enable_compile``): decoding forwards are padded to (rows, width) buckets and run through
``torch.compile(fullgraph=True)`` over the whole store length, so each bucket is one static graph (on CUDA,
``mode="reduce-overhead"`` captures it as a CUDA graph). Prompt passes, chunks and feeds wider than the
largest bucket stay eager.

The slow references: ``PerSlotLM`` (in ``core.batch``, one single-request ``CausalLM`` per slot), and in the
tests the earlier ``DynamicCache`` slot cache (``tests/dynamic_slot_cache.py``).
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .families import MASK_IMPLEMENTATIONS, check_model, logits_transform
from .hf import PREFILL_MIN_TOKENS, ModelRunner, _threads
from .slot_cache import LENGTH_STEP, SlotStore, slot_mask

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Compiled decoding forwards pad their rows up to one of these counts (more rows run eagerly)."""
WIDTH_BUCKETS = (1, 2, 4, 8, 16)
"""Compiled decoding forwards pad their width (tokens per row) up to one of these (wider ones run eagerly)."""


class BatchedHFCausalLM(ModelRunner):
    """Implements ``core.sides.BatchedLM`` over one transformers causal LM (shared with other runners).

    ``rows`` / ``max_len``: the store's first size (it grows on demand past it)."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None,
                 pad_id: int = 0, prefill_pad_ratio: float = 1.25, rows: int = 1, max_len: int = LENGTH_STEP):
        super().__init__(model, vocab_size, draft_to_target)
        self.layout = check_model(model)
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in MASK_IMPLEMENTATIONS:
            raise UnsupportedModelError(f"model family {self.layout.family!r}: the slot cache gives the model 4D "
                                        f"attention masks it builds itself; load it with attn_implementation "
                                        f"'sdpa' or 'eager', not {impl!r}")
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        self._transform = logits_transform(model.config)
        # masks: boolean for sdpa, additive in the model's dtype for eager
        self._mask_dtype = next(model.parameters()).dtype if impl == "eager" else None
        self.pad_id, self.prefill_pad_ratio = pad_id, prefill_pad_ratio
        self.prefill_threads: int | None = None
        self.to_host = True  # False: logits stay on the device (a tensor-parallel follower discards them)
        self.forwards = 0
        self.last_shape = (0, 0, 0)
        """(rows, width, key positions) of the last decoding forward (prompt passes and chunks excluded)."""
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.store = SlotStore(layers, rows, max_len, max_length=self.max_context + LENGTH_STEP)
        self.compiled = None
        self.compiled_forwards = 0  # decoding forwards that ran compiled
        self.clear()

    # -- bookkeeping -------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every slot (the store keeps its memory)."""
        self.row_of: dict[int, int] = {}  # slot -> its store row
        self.lens: list[int] = []  # store row -> positions it holds (rows past the list hold none)
        self.staged: set[int] = set()  # slots still reading their prompt in chunks

    @property
    def slots(self) -> list[int]:
        return list(self.row_of)

    def cache_len(self, slot: int) -> int:
        row = self.row_of.get(slot)
        return 0 if row is None else self.lens[row]

    def crop(self, slot: int, length: int) -> None:
        row = self.row_of.get(slot)
        if row is None:
            if length:
                raise ValueError(f"slot {slot} holds nothing; cannot crop it to {length}")
            return
        if not 0 <= length <= self.lens[row]:
            raise ValueError(f"cannot crop slot {slot} of {self.lens[row]} positions to {length}")
        if length == 0:
            self.release(slot)
        else:
            self.lens[row] = length

    def release(self, slot: int) -> None:
        row = self.row_of.pop(slot, None)
        if row is not None:
            self.lens[row] = 0
            self.staged.discard(slot)

    def reserve(self, rows: int, max_len: int) -> None:
        """Size the store now for ``rows`` slots of ``max_len`` positions each, so that it is not reallocated
        while requests within that run (a larger one still grows it)."""
        self.store.reserve(rows, max_len)

    def held_positions(self) -> int:
        """Positions the live slots hold (what the KV budget counts), however large the store is."""
        return sum(self.lens[r] for r in self.row_of.values())

    def cache_bytes(self) -> int:
        """Bytes the store holds (allocated once; see ``reserve``)."""
        return self.store.nbytes()

    def _take_row(self, slot: int) -> int:
        used = set(self.row_of.values())
        row = 0
        while row in used:
            row += 1
        if row >= len(self.lens):
            self.lens.extend([0] * (row + 1 - len(self.lens)))
        self.lens[row] = 0
        self.row_of[slot] = row
        return row

    def _map_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vocab.map_in(ids) if self.vocab is not None else ids

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [1, n, hidden]: AutoTP's sharded LM head (LmHeadLinearAllreduce) slices a 3-d input
        logits = self.head(hidden.unsqueeze(0))[0].float()
        if self._transform is not None:  # what the family's ForCausalLM does after its head (Gemma's soft-cap)
            logits = self._transform(logits)
        return self.vocab.map_out(logits) if self.vocab is not None else logits

    # -- forwards ----------------------------------------------------------------------------------------
    def forward(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        """``feeds``: slot -> (new token ids, how many of the last positions need logits). Decoding slots run
        as one padded forward; new slots' prompts run apart (grouped), and a feed with 0 logits to a slot
        not yet decoding is a prompt chunk, run on its row alone (module docstring). Returns slot -> fp32
        logits ``[num_logits, vocab]`` on the host, for the slots that asked for logits."""
        for s, (ids, k) in feeds.items():
            if not ids or not 0 <= k <= len(ids):
                raise ValueError(f"slot {s}: a forward needs >= 1 token and 0..len(ids) logits, got {len(ids)}, {k}")
        live, staged, fresh = {}, {}, {}
        for s, f in feeds.items():
            if s in self.row_of and s not in self.staged:
                live[s] = f
            elif s in self.staged or f[1] == 0:
                staged[s] = f
            else:
                fresh[s] = f
        for s in (*staged, *fresh):  # rows for the newcomers before any forward (the decoding rows pad them)
            if s not in self.row_of:
                self._take_row(s)
                if feeds[s][1] == 0:
                    self.staged.add(s)
        out: dict[int, torch.Tensor] = {}
        if live:
            out.update(self._decode(live))
        for s, (ids, k) in staged.items():
            out.update(self._forward("row", [self.row_of[s]], [ids], {0: (s, k)}))
            if k:
                self.staged.discard(s)
        for group in prefill_groups({s: len(ids) for s, (ids, _) in fresh.items()}, self.prefill_pad_ratio):
            picks = {b: (s, fresh[s][1]) for b, s in enumerate(group)}
            out.update(self._forward("new", [self.row_of[s] for s in group], [fresh[s][0] for s in group], picks))
        self.forwards += 1
        return out

    def _decode(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        """The decoding slots' forward over store rows ``0 .. B-1`` (rows not fed are padding)."""
        slot_at = {self.row_of[s]: s for s in feeds}
        rows = max(slot_at) + 1
        width = max(len(ids) for ids, _ in feeds.values())
        compiled = self.compiled is not None and rows <= ROW_BUCKETS[-1] and width <= WIDTH_BUCKETS[-1]
        if compiled:
            rows, width = _bucket(rows, ROW_BUCKETS), _bucket(width, WIDTH_BUCKETS)
        ids = [feeds[slot_at[r]][0] if r in slot_at else [] for r in range(rows)]
        picks = {r: (s, feeds[s][1]) for r, s in slot_at.items()}
        return self._forward("rows", list(range(rows)), ids, picks, width, compiled)

    def _forward(self, mode: str, rows: list[int], ids: list[list[int]], picks: dict[int, tuple[int, int]],
                 width: int | None = None, compiled: bool = False) -> dict[int, torch.Tensor]:
        """One forward of the store rows ``rows`` (mode as in ``SlotStore.bind``), fed ``ids[b]`` each, right-
        padded to ``width`` (default: the widest). ``picks``: batch row -> (slot, how many last positions of
        its feed need logits). Returns slot -> logits for the picks that ask for some."""
        fed = [len(x) for x in ids]
        width = width or max(fed)
        x, fed_t = self._bind(mode, rows, ids, width, compiled)
        step = self.compiled if compiled else self._step
        self.compiled_forwards += compiled
        index, spans = [], []
        for b, (slot, k) in sorted(picks.items()):
            if k:
                index.extend(range(b * width + fed[b] - k, b * width + fed[b]))
                spans.append((slot, k))
        # prompt passes and chunks may borrow threads (``prefill_threads``); decoding rows never do
        threads = self.prefill_threads if mode != "rows" and sum(fed) >= PREFILL_MIN_TOKENS else None
        with torch.inference_mode(), _threads(threads):
            hidden = step(x, fed_t)
            logits = None
            if index:
                flat = hidden.reshape(len(rows) * width, hidden.shape[-1])
                logits = self._logits(flat.index_select(0, torch.tensor(index, device=hidden.device)))
                logits = logits.cpu() if self.to_host else logits
        for r, n in zip(rows, fed):
            self.lens[r] += n
        out, at = {}, 0
        for slot, k in spans:
            out[slot] = logits[at: at + k]
            at += k
        return out

    def _bind(self, mode: str, rows: list[int], ids: list[list[int]], width: int, compiled: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room in the store, bind the forward to it (``SlotStore.bind``) and build ``_step``'s inputs:
        the ids ``[B, width]`` (right-padded) and the real tokens per row ``[B]``. Row lengths are unchanged
        (``_forward`` adds the fed tokens once the forward has run)."""
        fed = [len(x) for x in ids]
        if len(self.lens) < max(rows) + 1:
            self.lens.extend([0] * (max(rows) + 1 - len(self.lens)))
        start = [self.lens[r] for r in rows]
        # room for every column, padding included (it is written past each row's length)
        self.store.ensure(max(rows) + 1, max(start) + width)
        if mode == "new":
            kv_len = width
        elif compiled:  # the whole store: one static shape per bucket
            kv_len = self.store.length
        else:
            kv_len = max(s + f for s, f in zip(start, fed))
        dev = self.device
        x = self._map_ids(torch.tensor([t + [self.pad_id] * (width - len(t)) for t in ids], dtype=torch.long).to(dev))
        pos = (torch.tensor(start, dtype=torch.long)[:, None] + torch.arange(width)).to(dev)
        self.store.bind(mode, torch.tensor(rows, dtype=torch.long).to(dev), pos, kv_len, rows[0])
        if mode == "rows":
            self.last_shape = (len(rows), width, kv_len)
        return x, torch.tensor(fed, dtype=torch.long).to(dev)

    def _step(self, ids: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
        """The decoder over the bound store: ``ids [B, T]`` (right-padded), ``fed [B]`` real tokens per row ->
        hidden states ``[B, T, hidden]``. Graph-safe: what ``enable_compile`` compiles."""
        store = self.store
        masks = slot_mask(store.pos, fed, store.kv_len, self.layout.windows, self._mask_dtype)
        mask = masks if len(masks) > 1 else next(iter(masks.values()))  # a dict for hybrid models (Gemma, Qwen2)
        return self.base(input_ids=ids, attention_mask=mask, position_ids=store.pos, past_key_values=store,
                         use_cache=True).last_hidden_state

    def enable_compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """Run decoding forwards through ``torch.compile(fullgraph=True)``, padded to (rows, width) buckets
        (``ROW_BUCKETS`` x ``WIDTH_BUCKETS``; one graph each). ``mode``: torch.compile's, default
        "reduce-overhead" (CUDA graphs) on CUDA with the inductor backend, the default elsewhere."""
        if self.device.type == "cuda":
            if backend == "inductor":
                mode = mode or "reduce-overhead"
            self.store.static_addresses = True  # the graphs read and write the store where it is
            for t in self.store.tensors():
                torch._dynamo.mark_static_address(t)
        # one graph per bucket, store size and model (all compile this one method): raise dynamo's limit on
        # graphs per function to match
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), 8 * len(ROW_BUCKETS) * len(WIDTH_BUCKETS)))
        self.compiled = torch.compile(self._step, fullgraph=True, dynamic=False, mode=mode, backend=backend)


def prefill_groups(lens: dict[int, int], pad_ratio: float) -> list[list[int]]:
    """Split new slots (slot -> prompt length) into prompt passes run together: longest first, a group
    grows while its padded size (members x longest) stays within ``pad_ratio`` x its real tokens."""
    order = sorted(lens, key=lambda s: -lens[s])
    groups: list[list[int]] = []
    for s in order:
        g = groups[-1] if groups else None
        if g is not None and (len(g) + 1) * lens[g[0]] <= pad_ratio * (sum(lens[x] for x in g) + lens[s]):
            g.append(s)
        else:
            groups.append([s])
    return groups


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(b for b in buckets if b >= n)
