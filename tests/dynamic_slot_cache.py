"""The slot cache as it was before the preallocated store (``modeling.slot_cache``): one transformers
``DynamicCache`` shared by every slot, concatenated at each forward, joins concatenated in, leaves
index-selected out, rollbacks left as masked holes until a compaction. Kept here only as a slow reference
for the tests (tests/test_slot_cache.py compares logits and greedy tokens with it); nothing in
``pearl_ray`` uses it.

Layout: row ``r`` of the shared cache's ``[rows, kv_heads, L, head_dim]`` tensors belongs to one slot and
holds *physical* positions; ``phys[slot]`` lists the physical index of each logical position and
``valid [rows, L]`` marks the live entries. Keys carry their rotary position, so only the mask matters.
"""

from __future__ import annotations

import torch

from pearl_ray.modeling.batched import BatchedHFCausalLM, prefill_groups
from pearl_ray.modeling.families import check_model, full_cache, logits_transform
from pearl_ray.modeling.hf import PREFILL_MIN_TOKENS, ModelRunner, _threads, crop_to


class DynamicSlotLM(ModelRunner):
    """``core.sides.BatchedLM`` over a shared DynamicCache (the earlier slot cache; the tests' reference)."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None,
                 compact_ratio: float = 0.5, compact_min: int = 64, pad_id: int = 0,
                 prefill_pad_ratio: float = 1.25):
        super().__init__(model, vocab_size, draft_to_target)
        self.layout = check_model(model)
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        self._transform = logits_transform(model.config)
        self._config = model.config
        # sliding layers: the masks are built here (boolean for sdpa, additive in the model's dtype for eager)
        eager = getattr(model.config, "_attn_implementation", None) == "eager"
        self._mask_dtype = next(model.parameters()).dtype if eager else None
        self.compact_ratio, self.compact_min, self.pad_id = compact_ratio, compact_min, pad_id
        self.prefill_threads: int | None = None
        self.prefill_pad_ratio = prefill_pad_ratio
        self.to_host = True  # False: logits stay on the device (a tensor-parallel follower discards them)
        self.forwards = 0
        self.compactions = 0
        self.clear()

    # -- bookkeeping -------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.cache = full_cache(self._config)
        self.rows: list[int] = []  # slot id of each row
        self.phys: dict[int, list[int]] = {}  # slot -> physical index of each logical position
        self.valid = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.staged: dict[int, object] = {}  # slot -> its own DynamicCache while its prompt comes in chunks

    @property
    def slots(self) -> list[int]:
        return list(self.rows) + list(self.staged)

    @property
    def physical_len(self) -> int:
        return int(self.valid.shape[1])

    def cache_len(self, slot: int) -> int:
        if slot in self.staged:
            return int(self.staged[slot].get_seq_length())
        return len(self.phys.get(slot, ()))

    def crop(self, slot: int, length: int) -> None:
        if slot in self.staged:
            current = self.cache_len(slot)
            if not 0 <= length <= current:
                raise ValueError(f"cannot crop slot {slot} of {current} positions to {length}")
            if length == 0:
                self.release(slot)
            else:
                crop_to(self.staged[slot], length)
            return
        phys = self.phys.get(slot)
        if phys is None:
            if length:
                raise ValueError(f"slot {slot} holds nothing; cannot crop it to {length}")
            return
        if not 0 <= length <= len(phys):
            raise ValueError(f"cannot crop slot {slot} of {len(phys)} positions to {length}")
        if length == len(phys):
            return
        if length == 0:
            self.release(slot)
            return
        row = self.rows.index(slot)
        self.valid[row, phys[length:]] = False
        del phys[length:]

    def release(self, slot: int) -> None:
        if self.staged.pop(slot, None) is not None or slot not in self.phys:
            return
        row = self.rows.index(slot)
        del self.phys[slot]
        self.rows.pop(row)
        if not self.rows:
            self.clear()
            return
        keep = torch.tensor([r for r in range(len(self.rows) + 1) if r != row], device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, keep)
            layer.values = layer.values.index_select(0, keep)
        self.valid = self.valid.index_select(0, keep)

    # the same ids in and logits out as the store's runner
    _map_ids = BatchedHFCausalLM._map_ids
    _logits = BatchedHFCausalLM._logits

    # -- forwards ----------------------------------------------------------------------------------------
    def forward(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        """``feeds``: slot -> (new token ids, how many of the last positions need logits). Slots not yet in
        the cache are prefilled on their own and merged in; the others run as one padded forward. A feed
        with 0 logits to a slot not in the shared cache is a prompt chunk: it goes to the slot's staged
        cache (module docstring). Returns slot -> fp32 logits ``[num_logits, vocab]`` on the host, for the
        slots that asked for logits."""
        out: dict[int, torch.Tensor] = {}
        for s, (ids, k) in feeds.items():
            if not ids or not 0 <= k <= len(ids):
                raise ValueError(f"slot {s}: a forward needs >= 1 token and 0..len(ids) logits, got {len(ids)}, {k}")
        staged = {s: f for s, f in feeds.items() if s not in self.phys and (s in self.staged or f[1] == 0)}
        fresh = {s: f for s, f in feeds.items() if s not in self.phys and s not in staged}
        live = {s: f for s, f in feeds.items() if s in self.phys}
        if live:
            out.update(self._forward_rows(live))
        for s, (ids, k) in staged.items():
            out.update(self._extend_staged(s, ids, k))
        for group in prefill_groups({s: len(ids) for s, (ids, _) in fresh.items()}, self.prefill_pad_ratio):
            out.update(self._prefill({s: fresh[s] for s in group}))
        self.forwards += 1
        self._maybe_compact()
        return out

    def _extend_staged(self, slot: int, token_ids: list[int], num_logits: int) -> dict[int, torch.Tensor]:
        """One forward of ``slot`` alone on its staged cache (made on its first chunk). With ``num_logits``
        > 0 the slot's prompt is complete: its logits come back and its cache joins the shared one."""
        cache = self.staged.get(slot)
        if cache is None:
            cache = self.staged[slot] = full_cache(self._config)
        x = self._map_ids(torch.tensor([token_ids], dtype=torch.long).to(self.device))
        extra = {}
        if self.layout.sliding:  # one contiguous row: the masks of ``slot_masks`` at its logical positions
            past, n = int(cache.get_seq_length()), len(token_ids)
            pos = torch.arange(past, past + n, device=self.device)[None]
            valid = torch.ones((1, past + n), dtype=torch.bool, device=self.device)
            extra = {"attention_mask": self._attention(valid, pos), "position_ids": pos}
        threads = self.prefill_threads if len(token_ids) >= PREFILL_MIN_TOKENS else None
        with torch.inference_mode(), _threads(threads):
            hidden = self.base(input_ids=x, past_key_values=cache, use_cache=True, **extra).last_hidden_state
            logits = self._logits(hidden[0, len(token_ids) - num_logits:]) if num_logits else None
        if logits is None:
            return {}
        del self.staged[slot]
        self._merge([slot], cache, [int(cache.get_seq_length())])
        return {slot: logits.cpu() if self.to_host else logits}

    def _prefill(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        """Prompt passes of new slots as one forward: right-padded to the longest (a pad position attends to
        its row's real tokens, so nothing is fully masked), the pads' entries left as holes."""
        slots = list(feeds)
        lens = [len(feeds[s][0]) for s in slots]
        width = max(lens)
        ids = torch.full((len(slots), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(slots), width), dtype=torch.bool)
        for r, s in enumerate(slots):
            ids[r, : lens[r]] = torch.tensor(feeds[s][0], dtype=torch.long)
            mask[r, : lens[r]] = True
        cache = full_cache(self._config)
        x = self._map_ids(ids.to(self.device))
        if self.layout.sliding:
            pos = torch.arange(width).expand(len(slots), width).to(self.device)
            extra = {"attention_mask": self._attention(mask.to(self.device), pos), "position_ids": pos}
        else:
            extra = {} if len(slots) == 1 else {"attention_mask": mask.to(self.device)}
        threads = self.prefill_threads if sum(lens) >= PREFILL_MIN_TOKENS else None
        with torch.inference_mode(), _threads(threads):
            hidden = self.base(input_ids=x, past_key_values=cache, use_cache=True, **extra).last_hidden_state
            logits = self._logits(torch.cat([hidden[r, n - feeds[s][1]: n] for r, (s, n) in enumerate(zip(slots, lens))]))
        self._merge(slots, cache, lens)
        logits = logits.cpu() if self.to_host else logits
        out, at = {}, 0
        for s in slots:
            out[s] = logits[at: at + feeds[s][1]]
            at += feeds[s][1]
        return out

    def _merge(self, slots: list[int], cache, lens: list[int]) -> None:
        """Append the rows of ``cache`` (one per slot, its first ``lens[i]`` positions live) to the slot cache."""
        length = self.physical_len
        width = max(length, cache.layers[0].keys.shape[2])
        rows = torch.zeros((len(slots), width), dtype=torch.bool, device=self.device)
        for r, n in enumerate(lens):
            rows[r, :n] = True
        if not self.rows:
            for dst, src in zip(self.cache.layers, cache.layers):
                dst.lazy_initialization(src.keys, src.values)
                dst.keys, dst.values = src.keys, src.values
            self.valid = rows
        else:
            for dst, src in zip(self.cache.layers, cache.layers):
                dst.keys = torch.cat([_pad_len(dst.keys, width), _pad_len(src.keys, width)])
                dst.values = torch.cat([_pad_len(dst.values, width), _pad_len(src.values, width)])
            old = torch.zeros((len(self.rows), width), dtype=torch.bool, device=self.device)
            old[:, :length] = self.valid
            self.valid = torch.cat([old, rows])
        for s, n in zip(slots, lens):
            self.rows.append(s)
            self.phys[s] = list(range(n))

    def _forward_rows(self, feeds: dict[int, tuple[list[int], int]]) -> dict[int, torch.Tensor]:
        width = max(len(ids) for ids, _ in feeds.values())
        rows = len(self.rows)
        length = self.physical_len
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((rows, width), dtype=torch.long)
        new_valid = torch.zeros((rows, width), dtype=torch.bool)
        for r, slot in enumerate(self.rows):
            n0 = len(self.phys[slot])
            pos[r] = n0  # pad positions: any in-range value (they are masked out and their outputs unused)
            feed = feeds.get(slot)
            if feed is None:
                continue
            t = len(feed[0])
            ids[r, width - t:] = torch.tensor(feed[0], dtype=torch.long)
            pos[r, width - t:] = torch.arange(n0, n0 + t)
            new_valid[r, width - t:] = True
        mask = torch.cat([self.valid, new_valid.to(self.device)], dim=1)
        x = self._map_ids(ids.to(self.device))
        pos = pos.to(self.device)
        with torch.inference_mode():
            hidden = self.base(input_ids=x, attention_mask=self._attention(mask, pos), position_ids=pos,
                               past_key_values=self.cache, use_cache=True).last_hidden_state
            picks, spans = [], []
            for r, slot in enumerate(self.rows):
                feed = feeds.get(slot)
                if feed is None or not feed[1]:
                    continue
                picks.append(hidden[r, width - feed[1]:])
                spans.append((slot, feed[1]))
            logits = self._logits(torch.cat(picks)) if picks else None
            logits = logits.cpu() if (self.to_host and logits is not None) else logits
        self.valid = mask
        for r, slot in enumerate(self.rows):
            feed = feeds.get(slot)
            if feed is not None:
                t = len(feed[0])
                self.phys[slot].extend(range(length + width - t, length + width))
        out, at = {}, 0
        for slot, k in spans:
            out[slot] = logits[at: at + k]
            at += k
        return out

    def _attention(self, valid: torch.Tensor, pos: torch.Tensor):
        """What the model gets as ``attention_mask`` for keys ``valid [rows, K]`` (the last ``T`` columns this
        forward's own tokens) and queries at logical positions ``pos [rows, T]``. Full attention only: ``valid``
        itself (transformers adds causality by physical index, which within a row is the logical order). With
        sliding layers: ``slot_masks``, one 4D mask per layer type (a dict for hybrid models, as Gemma's and
        Qwen2's decoders take it)."""
        if not self.layout.sliding:
            return valid
        masks = slot_masks(valid, pos, self.layout.windows, self._mask_dtype)
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _maybe_compact(self) -> None:
        length = self.physical_len
        if not self.rows or length < self.compact_min:
            return
        live = max(len(p) for p in self.phys.values())
        if length - live >= self.compact_ratio * length:
            self.compact()

    def compact(self) -> None:
        """Gather every row back to its live positions, in logical order (frees the holes)."""
        if not self.rows:
            return
        width = max(len(self.phys[s]) for s in self.rows)
        index = torch.zeros((len(self.rows), width), dtype=torch.long)
        valid = torch.zeros((len(self.rows), width), dtype=torch.bool)
        for r, slot in enumerate(self.rows):
            p = self.phys[slot]
            index[r, : len(p)] = torch.tensor(p, dtype=torch.long)
            valid[r, : len(p)] = True
            self.phys[slot] = list(range(len(p)))
        index = index.to(self.device)
        for layer in self.cache.layers:
            shape = layer.keys.shape
            gather = index[:, None, :, None].expand(shape[0], shape[1], width, shape[3])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
        self.valid = valid.to(self.device)
        self.compactions += 1

    def cache_bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2
                   for cache in (self.cache, *self.staged.values()) for layer in cache.layers
                   if getattr(layer, "keys", None) is not None and layer.keys.numel())


def slot_masks(valid: torch.Tensor, pos: torch.Tensor, windows: dict[str, int | None],
               float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """4D attention masks ``[rows, 1, T, K]`` (True / 0.0: attend) for a forward over the slot cache, one per
    layer type in ``windows`` (type -> window, None for full attention).

    ``valid [rows, K]``: which key entries are live, the last ``T`` columns being this forward's own tokens;
    ``pos [rows, T]``: the queries' logical positions. A row's live entries are its logical positions in
    order, so a key's logical position is the number of live entries before it. Query ``q`` sees live key
    ``k`` when ``0 <= q - k`` (and ``q - k < window`` on a sliding layer). A padding query (its own column not
    live) also sees itself, so that no query row is empty: an empty row would make attention NaN there, and
    the NaN would reach the cache through that position's keys and values. ``float_dtype``: additive masks
    of that dtype (eager attention) instead of booleans (sdpa).

    Example: one row whose cache holds logical positions 0, 1, 2 with a hole (a rolled-back entry) between
    1 and 2, and one new token at position 3::

        valid = [[1, 1, 0, 1, 1]]   pos = [[3]]   window 2   ->   [[0, 0, 0, 1, 1]]
    """
    rows, width = valid.shape
    t = pos.shape[1]
    kpos = valid.long().cumsum(1) - 1  # [rows, K]
    behind = pos[:, :, None] - kpos[:, None, :]  # [rows, T, K]
    seen = valid[:, None, :] & (behind >= 0)
    own = torch.zeros_like(seen)
    own[:, :, width - t:] = torch.diag_embed(~valid[:, width - t:])
    out = {}
    for kind, window in windows.items():
        mask = (seen if window is None else seen & (behind < window)) | own
        mask = mask[:, None]
        if float_dtype is not None:
            mask = torch.zeros(mask.shape, dtype=float_dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(float_dtype).min)
        out[kind] = mask
    return out


def _pad_len(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad ``[rows, heads, L, dim]`` along L to ``width`` (zeros: finite, and masked out)."""
    if t.shape[2] == width:
        return t
    pad = torch.zeros((t.shape[0], t.shape[1], width - t.shape[2], t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=2)
