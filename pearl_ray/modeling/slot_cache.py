"""A preallocated KV store with one row per slot, seen by a transformers model as its ``Cache``.

Layout: per decoder layer, keys and values ``[rows, kv_heads, length, head_dim]`` in the model's dtype and on
its device (allocated at the first write, when the layer's head count and size are known: a tensor-parallel
rank holds only its share of the heads). Row ``r`` holds one sequence at positions ``0 .. n_r - 1`` in order,
so a key's index along ``length`` is its position in the sequence. The owner (``modeling.batched``) keeps
the integer lengths ``n_r``; the store itself only writes and hands out views.

- **Writes at per-row positions.** A forward feeds ``B`` rows, each right-padded to ``T`` columns; row ``b``
  starts at ``start[b]`` (its length before the forward). Every column is written at ``start[b] + j``: the
  real tokens extend the row, the padding lands past its new length, where nothing reads it (it is
  overwritten by the row's next tokens).
- **Rollback** is the owner lowering ``n_r``; what lies past it is stale and masked out.
- **Attention** covers each row's live positions through a mask built from the positions and the real token
  counts (``slot_mask``), never from holes: a row has none.
- **Capacity.** All rows have the same capacity ``length`` (one rectangle): the ``BatchedLM`` protocol does
  not tell the cache a request's reservation at join, and a rectangle lets a forward over rows
  ``0 .. B-1`` attend through a plain view, ``keys[:B, :, :L]``, with no gather. ``reserve`` sizes the store
  once; otherwise it grows on demand (rows doubling, length by half again, rounded up to ``LENGTH_STEP``, the
  growth stopping at the model's context), which copies it once per growth, so it stops growing after
  warm-up and is never reallocated after that.

What one forward attends to is set before it (``bind``):

- ``"rows"``: rows ``0 .. B-1`` of the store (a decoding forward; rows without a feed are all padding);
- ``"row"``: one row ``r`` (a prompt chunk on a slot's own row);
- ``"new"``: only the forward's own keys (a prompt pass of rows that start empty, any rows of the store).

The same code runs eagerly and under ``torch.compile(fullgraph=True)``: the store's shapes are fixed between
growths, the bound attributes are plain ints, strings and tensors, and the writes are in place.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

LENGTH_STEP = 64
"""The store's capacity per row grows in multiples of this many positions."""


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values in the store (see the module docstring)."""

    is_compileable = True
    is_sliding = False  # windows live in the masks: every layer keeps every position

    def __init__(self, store: "SlotStore"):
        super().__init__()
        self.store = store

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.heads = key_states.shape[1]
        self.k_dim, self.v_dim = key_states.shape[-1], value_states.shape[-1]
        self.keys, self.values = self._alloc(self.store.rows, self.store.length)
        self.is_initialized = True

    def _alloc(self, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.zeros((rows, self.heads, length, self.k_dim), dtype=self.dtype, device=self.device)
        values = torch.zeros((rows, self.heads, length, self.v_dim), dtype=self.dtype, device=self.device)
        if self.store.static_addresses:  # CUDA graphs read the store in place instead of copying it per replay
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        return keys, values

    def resize(self, rows: int, length: int) -> None:
        """Reallocate to ``[rows, heads, length, dim]``, keeping what the old tensors held."""
        if not self.is_initialized:
            return
        keys, values = self._alloc(rows, length)
        r, n = min(rows, self.keys.shape[0]), min(length, self.keys.shape[2])
        keys[:r, :, :n] = self.keys[:r, :, :n]
        values[:r, :, :n] = self.values[:r, :, :n]
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's ``[B, heads, T, dim]`` keys and values at each row's positions; return what
        its queries attend to (the bound mode's view)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.store
        index = s.flat.get(self.heads)
        if index is None:  # the first forward (the layer was just allocated)
            index = s.flat[self.heads] = flat_index(s.row_index, s.pos, self.heads, self.keys.shape[2])
        # one copy per layer: rows of head_dim values into the flattened store (cheaper than indexing it 4D)
        self.keys.view(-1, self.k_dim).index_copy_(0, index, key_states.reshape(-1, self.k_dim))
        self.values.view(-1, self.v_dim).index_copy_(0, index, value_states.reshape(-1, self.v_dim))
        if s.mode == "new":
            return key_states, value_states
        if s.mode == "row":
            return (self.keys[s.first_row: s.first_row + 1, :, : s.kv_len],
                    self.values[s.first_row: s.first_row + 1, :, : s.kv_len])
        return self.keys[: s.batch, :, : s.kv_len], self.values[: s.batch, :, : s.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.kv_len, 0

    def get_seq_length(self) -> int:
        return 0  # rows differ: callers pass position_ids and 4D masks, which is all the model needs

    def get_max_length(self) -> int:
        return self.store.length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a slot store rolls back per row: lower the owner's row length instead")


class SlotStore(Cache):
    """The store: one ``SlotLayer`` per decoder layer, a capacity (``rows`` x ``length`` positions) and
    what the next forward attends to (``bind``)."""

    def __init__(self, num_layers: int, rows: int = 1, length: int = LENGTH_STEP, max_length: int | None = None,
                 static_addresses: bool = False):
        self.rows, self.length = max(1, rows), _round_up(max(1, length))
        self.max_length = max_length
        """Growth stops here (the model's context): a longer row is sized to what it needs, no more."""
        self.static_addresses = static_addresses
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.reallocations = 0
        self.bind("new", torch.zeros(1, dtype=torch.long), torch.zeros((1, 1), dtype=torch.long), 1)

    def bind(self, mode: str, row_index: torch.Tensor, pos: torch.Tensor, kv_len: int, first_row: int = 0) -> None:
        """Set what the next forward writes and reads: ``row_index [B]`` the store row of each batch row,
        ``pos [B, T]`` the position each of its columns is written at (its length before the forward, plus
        the column), ``kv_len`` the key positions its queries span (the mask's last dimension). ``mode``:
        "rows" (``row_index`` is ``0 .. B-1``), "row" (one row, ``first_row``) or "new"."""
        if mode not in ("rows", "row", "new"):
            raise ValueError(f"unknown slot store mode {mode!r}")
        self.mode, self.row_index, self.pos, self.kv_len = mode, row_index, pos, int(kv_len)
        self.batch, self.first_row = int(pos.shape[0]), int(first_row)
        # where each (row, head, column) goes in a layer's store viewed as [rows * heads * length, dim], per
        # head count (what every layer of that count shares this forward)
        self.flat = {}
        for layer in self.layers:
            if layer.is_initialized and layer.heads not in self.flat:
                self.flat[layer.heads] = flat_index(row_index, pos, layer.heads, self.length)

    def ensure(self, rows: int, length: int) -> bool:
        """Make room for ``rows`` rows of ``length`` positions; True when the store was reallocated."""
        if rows <= self.rows and length <= self.length:
            return False
        new_rows = max(rows, 2 * self.rows) if rows > self.rows else self.rows
        new_len = self.length
        if length > self.length:
            grown = self.length + self.length // 2
            new_len = _round_up(max(length, min(grown, self.max_length or grown)))
        self._resize(new_rows, new_len)
        return True

    def reserve(self, rows: int, length: int) -> None:
        """Size the store for ``rows`` rows of ``length`` positions now (exactly, never smaller than it is)."""
        rows, length = max(rows, self.rows), max(_round_up(length), self.length)
        if (rows, length) != (self.rows, self.length):
            self._resize(rows, length)

    def _resize(self, rows: int, length: int) -> None:
        with torch.inference_mode():
            for layer in self.layers:
                layer.resize(rows, length)
        if any(layer.is_initialized for layer in self.layers):
            self.reallocations += 1
        self.rows, self.length = rows, length

    def tensors(self) -> list[torch.Tensor]:
        """Every allocated key and value tensor (for memory accounting and checks)."""
        return [t for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_per_position(self) -> int:
        """Bytes one cached position costs over all layers (0 before the first write)."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in self.tensors())


def slot_mask(pos: torch.Tensor, fed: torch.Tensor, kv_len: int, windows: dict[str, int | None],
              float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """4D attention masks ``[B, 1, T, kv_len]`` (True / 0.0: attend) for a forward over the slot store, one
    per layer type in ``windows`` (type -> window, None for full attention).

    ``pos [B, T]``: the position of each column (``start[b] + j``, ``start`` being the row's length before
    the forward); ``fed [B]``: the row's real tokens this forward, in its first columns (the rest is
    padding). Key index ``k`` is position ``k`` of the row. A real query sees ``k <= q``
    (and ``q - k < window`` on a sliding layer): the row's earlier positions and this forward's tokens up
    to itself, never a stale entry past the row's length. A padding query sees key 0 only, so that no
    query row is empty (an empty row makes attention NaN, and the NaN would reach the store through the
    padding's own keys); its output is discarded. ``float_dtype``: additive masks of that dtype (eager
    attention) instead of booleans (sdpa).

    Example: a row of 3 positions fed 1 token, padded to 2 columns, window 2, keys up to 5::

        pos = [[3, 4]]   fed = [1]   ->   [[0, 0, 1, 1, 0],     (q = 3 sees positions 2 and 3)
                                         [1, 0, 0, 0, 0]]    (padding: key 0)
    """
    device = pos.device
    cols = torch.arange(pos.shape[1], device=device)
    keys = torch.arange(kv_len, device=device)
    real = cols[None, :] < fed[:, None]  # [B, T]
    behind = pos[:, :, None] - keys[None, None, :]  # [B, T, K]
    seen = real[:, :, None] & (behind >= 0)
    pad = (~real)[:, :, None] & (keys == 0)[None, None, :]
    out = {}
    for kind, window in windows.items():
        mask = ((seen if window is None else seen & (behind < window)) | pad)[:, None]
        if float_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=float_dtype, device=device).masked_fill(
                ~mask, torch.finfo(float_dtype).min)
        out[kind] = mask
    return out


def _round_up(n: int) -> int:
    return -(-n // LENGTH_STEP) * LENGTH_STEP


def flat_index(row_index: torch.Tensor, pos: torch.Tensor, heads: int, length: int) -> torch.Tensor:
    """``[B * heads * T]``: the index, in a ``[rows, heads, length, dim]`` store viewed as ``[-1, dim]``, of
    each entry of a ``[B, heads, T, dim]`` tensor written at store row ``row_index[b]``, position
    ``pos[b, t]``, in that tensor's own order (b, then head, then t).

    Example: row_index = [1], pos = [[4, 5]], 2 heads, length 8 -> [20, 21, 28, 29]
    """
    h = torch.arange(heads, device=pos.device)
    return ((row_index[:, None, None] * heads + h[None, :, None]) * length + pos[:, None, :]).reshape(-1)
