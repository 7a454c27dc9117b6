"""A KV cache with one slot per request, and one forward over many slots: ``core.batch.BatchedLM`` for
Hugging Face causal LMs (Llama, Qwen2, Mistral families: any model that takes ``position_ids`` and a 2D
padding mask), in float32 or bfloat16, on CPU or CUDA.

Cache design (chosen for needing only standard transformers APIs):

- One ``DynamicCache`` shared by every live slot; row ``r`` of its ``[rows, kv_heads, L, head_dim]``
  tensors belongs to one slot. A row holds *physical* positions; each slot keeps the list of physical
  indices of its logical positions (``phys``) and a validity mask ``valid [rows, L]`` marks which physical
  entries are live. Rotary embeddings are applied before keys are cached, so a key carries its logical
  position and attention does not care where it sits physically: only the mask matters.
- A forward appends the same number ``T`` of physical positions to every row: each slot's new tokens are
  left-padded to ``T`` (a row with nothing to do this forward gets ``T`` pad positions). The 2D
  ``attention_mask`` is ``valid`` plus the new tokens' validity; ``position_ids`` are the slots' logical
  positions. Left padding puts every slot's last real token at column ``T - 1``, and the LM head runs only
  on the rows each slot asked for (hidden states are gathered first).
- Rollback (``crop``) only clears mask bits; ``release`` drops the slot's row (no fully masked row is
  ever fed, which would make attention NaN). New slots' prompts are prefilled apart from the decoding rows,
  those that join in the same forward together (right-padded; groups keep the padding within
  ``prefill_pad_ratio`` of their real tokens), and their keys merged in as new rows. When masked holes pass ``compact_ratio`` of the physical length
  (and ``compact_min`` positions), the rows are gathered back to their live positions.
- A prompt fed in chunks (a feed that asks for no logits, ``num_logits == 0``, on a slot not yet in the
  shared cache) builds up in a *staged* cache of its own, one forward per chunk over that slot alone, so
  a chunk never pads the decoding rows (nor they it). The slot's first feed that asks for logits runs on
  the staged cache too and then merges it in as a new row.

Memory per slot: ``2 * layers * kv_heads * head_dim * bytes`` per physical position (SmolLM2-135M in
fp32: 2 * 30 * 3 * 64 * 4 = 46 KB per position, 11 MB for 250 positions; the 4-layer draft: 6 KB), times
the physical length ``L``, which is the longest slot plus at most ``compact_ratio`` of holes. A packed
(varlen) layout would save the padding and holes, but needs a varlen attention kernel that transformers'
CPU attention does not have.

``PerSlotLM`` (in ``core.batch``) is the slow reference: one single-request ``CausalLM`` per slot.
"""

from __future__ import annotations

import torch

from .hf import PREFILL_MIN_TOKENS, ModelRunner, _threads, crop_to


class BatchedHFCausalLM(ModelRunner):
    """Implements ``core.batch.BatchedLM`` over one transformers causal LM (shared with other runners)."""

    def __init__(self, model, vocab_size: int | None = None, draft_to_target: list[int] | None = None,
                 compact_ratio: float = 0.5, compact_min: int = 64, pad_id: int = 0,
                 prefill_pad_ratio: float = 1.25):
        from transformers import DynamicCache

        super().__init__(model, vocab_size, draft_to_target)
        cfg = model.config
        self.base = model.get_decoder()
        self.head = model.get_output_embeddings()
        if self.base is None or self.head is None:
            raise TypeError(f"{type(model).__name__} has no decoder/LM head split (get_decoder, get_output_embeddings)")
        probe = DynamicCache(config=cfg)
        kinds = {type(layer).__name__ for layer in probe.layers}
        if kinds - {"DynamicLayer"}:
            raise TypeError(f"batched slots need full-attention cache layers, {type(model).__name__} has {sorted(kinds)}")
        self._cache_cls, self._config = DynamicCache, cfg
        self.compact_ratio, self.compact_min, self.pad_id = compact_ratio, compact_min, pad_id
        self.prefill_threads: int | None = None
        self.prefill_pad_ratio = prefill_pad_ratio
        self.to_host = True  # False: logits stay on the device (a tensor-parallel follower discards them)
        self.forwards = 0
        self.compactions = 0
        self.clear()

    # -- bookkeeping -------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.cache = self._cache_cls(config=self._config)
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

    def _map_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.vocab.map_in(ids) if self.vocab is not None else ids

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [1, n, hidden]: AutoTP's sharded LM head (LmHeadLinearAllreduce) slices a 3-d input
        logits = self.head(hidden.unsqueeze(0))[0].float()
        return self.vocab.map_out(logits) if self.vocab is not None else logits

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
            cache = self.staged[slot] = self._cache_cls(config=self._config)
        x = self._map_ids(torch.tensor([token_ids], dtype=torch.long).to(self.device))
        threads = self.prefill_threads if len(token_ids) >= PREFILL_MIN_TOKENS else None
        with torch.inference_mode(), _threads(threads):
            hidden = self.base(input_ids=x, past_key_values=cache, use_cache=True).last_hidden_state
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
        cache = self._cache_cls(config=self._config)
        x = self._map_ids(ids.to(self.device))
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
        with torch.inference_mode():
            hidden = self.base(input_ids=x, attention_mask=mask, position_ids=pos.to(self.device),
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


def _pad_len(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad ``[rows, heads, L, dim]`` along L to ``width`` (zeros: finite, and masked out)."""
    if t.shape[2] == width:
        return t
    pad = torch.zeros((t.shape[0], t.shape[1], width - t.shape[2], t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=2)
