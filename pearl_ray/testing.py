"""Toy models for tests and examples: a tabular LM over a tiny vocabulary and tiny random transformers models
(Llama and the other families of ``TINY_FAMILIES``).

``TabularLM`` implements ``core.sides.CausalLM`` with logits that depend on the last two tokens, so exact
continuation distributions can be enumerated; its "cache" is the list of fed ids, so crop is exact.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from .core.sampling import warp_probs


class TabularLM:
    def __init__(self, vocab_size: int = 6, seed: int = 0, sharpness: float = 1.5, max_context: int = 4096,
                 table: torch.Tensor | None = None):
        self.vocab_size = vocab_size
        self.max_context = max_context
        if table is None:
            g = torch.Generator().manual_seed(seed)
            table = torch.randn(vocab_size, vocab_size, vocab_size, generator=g) * sharpness
        self.table = table  # [prev, cur, next] logits
        self.ids: list[int] = []
        self.num_forwards = 0

    def reset(self) -> None:
        self.ids = []

    @property
    def cache_len(self) -> int:
        return len(self.ids)

    def logits_at(self, ids: list[int]) -> torch.Tensor:
        """Next-token logits after the sequence ``ids``."""
        prev = ids[-2] if len(ids) >= 2 else 0
        return self.table[prev, ids[-1]].clone()

    def forward(self, token_ids: list[int], num_logits: int) -> torch.Tensor:
        if not token_ids or num_logits > len(token_ids):
            raise ValueError("bad forward")
        self.num_forwards += 1
        self.ids.extend(token_ids)
        n = len(self.ids)
        return torch.stack([self.logits_at(self.ids[: n - num_logits + 1 + j]) for j in range(num_logits)])

    def crop(self, length: int) -> None:
        if length > len(self.ids):
            raise ValueError("crop past the end")
        self.ids = self.ids[:length]

    def continuation_probs(self, prompt: list[int], length: int, temperature: float, top_k: int = 0,
                           top_p: float = 1.0) -> dict[tuple[int, ...], float]:
        """Exact joint distribution of the next ``length`` tokens under the warped model (enumeration)."""
        out = {}
        for cont in itertools.product(range(self.vocab_size), repeat=length):
            prob, seq = 1.0, list(prompt)
            for tok in cont:
                p = warp_probs(self.logits_at(seq), temperature, top_k, top_p)[tok].item()
                prob *= p
                if prob == 0.0:
                    break
                seq.append(tok)
            if prob > 0:
                out[cont] = prob
        return out


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3_text")
"""The families ``save_tiny_model`` builds (transformers ``model_type`` names)."""


def tiny_config(family: str = "llama", vocab_size: int = 96, hidden_size: int = 32, num_layers: int = 2,
                window: int | None = None, max_position_embeddings: int = 256, eos_token_id: int = 2,
                layer_types: list[str] | None = None, **overrides):
    """A tiny transformers config of ``family`` (4 query heads of 8 dims, 2 key/value heads). ``window``: the
    sliding window of Mistral / Phi-3 (all layers) or of Gemma-2/3's sliding layers (Gemma needs one);
    ``layer_types``: Gemma's layer pattern (default: sliding and full alternating, sliding first);
    ``overrides``: any other config field (e.g. Gemma-2's ``final_logit_softcapping``)."""
    from transformers import AutoConfig

    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, got {family!r}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=max_position_embeddings, eos_token_id=eos_token_id, bos_token_id=1,
              pad_token_id=0, tie_word_embeddings=False)
    if family in ("qwen3", "gemma2", "gemma3_text"):
        kw["head_dim"] = hidden_size // 4  # their default head_dim is not hidden / heads
    if family in ("mistral", "phi3"):
        kw["sliding_window"] = window
    elif family in ("gemma2", "gemma3_text"):
        if window is None:
            raise ValueError(f"{family} has sliding layers: give it a window")
        kw["sliding_window"] = window
        kw["query_pre_attn_scalar"] = hidden_size // 4
        kw["layer_types"] = layer_types or [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    elif window is not None:
        raise ValueError(f"tiny {family} models have no sliding window")
    return AutoConfig.for_model(family, **{**kw, **overrides})


def save_tiny_model(path: str | Path, family: str = "llama", seed: int = 0, tokenizer_dir: str | Path | None = None,
                    **config) -> Path:
    """Build a tiny random model of ``family`` (``tiny_config``'s arguments) in float32 and save it, plus a
    tokenizer if given, for the real loader."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **config)
    torch.manual_seed(seed)  # model init only; never used inside generation
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # sharpen the random logits so greedy paths are not near-ties
        model.get_output_embeddings().weight.mul_(8.0)
    path = Path(path)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return path


def save_tiny_llama(path: str | Path, seed: int = 0, vocab_size: int = 96, hidden_size: int = 32,
                    num_layers: int = 2, tokenizer_dir: str | Path | None = None, max_position_embeddings: int = 256,
                    eos_token_id: int = 2) -> Path:
    """Build a tiny random Llama in float32 and save it (plus a tokenizer if given) for the real loader."""
    return save_tiny_model(path, "llama", seed, tokenizer_dir, vocab_size=vocab_size, hidden_size=hidden_size,
                           num_layers=num_layers, max_position_embeddings=max_position_embeddings,
                           eos_token_id=eos_token_id)


CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")


def make_word_tokenizer(path: str | Path, words: list[str], chat_template: str | None = None) -> Path:
    """A tiny word-level tokenizer (built offline with ``tokenizers``) saved for AutoTokenizer; optionally
    with a chat template (e.g. ``CHAT_TEMPLATE``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    path = Path(path)
    fast.save_pretrained(path)
    return path


class SlowLM(TabularLM):
    """A tabular LM whose forwards take ``delay_s`` (sleeping), optionally only from the ``after``-th call on.

    Used to make rounds long enough to see overlap, and to provoke timeouts."""

    def __init__(self, base: TabularLM, delay_s: float, after: int = 0):
        super().__init__(base.vocab_size, table=base.table, max_context=base.max_context)
        self.delay_s, self.after, self.calls = delay_s, after, 0

    def forward(self, token_ids, num_logits):
        import time

        self.calls += 1
        if self.calls > self.after:
            time.sleep(self.delay_s)
        return super().forward(token_ids, num_logits)


class FlakyLM(TabularLM):
    """A tabular LM that refuses to load (in the worker that unpickles it) once ``marker`` exists: a draft
    whose restarts keep failing."""

    def __init__(self, base: TabularLM, marker: str):
        super().__init__(base.vocab_size, table=base.table, max_context=base.max_context)
        self.marker = marker

    def __setstate__(self, state):
        import os

        if os.path.exists(state["marker"]):
            raise RuntimeError(f"model refuses to load: {state['marker']} exists")
        self.__dict__.update(state)


class BrokenLM(TabularLM):
    """A tabular LM whose forwards raise from the ``after``-th call on (each copy counts its own): a draft
    that breaks in the middle of a request."""

    def __init__(self, base: TabularLM, after: int):
        super().__init__(base.vocab_size, table=base.table, max_context=base.max_context)
        self.after, self.calls = after, 0

    def forward(self, token_ids, num_logits):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError(f"draft forward {self.calls} failed (broken after {self.after})")
        return super().forward(token_ids, num_logits)


class FaultyLM(TabularLM):
    """A tabular LM that fails the requests whose prompt starts with ``marker``, and only those: the fault
    injection of the per-request failure tests. Each slot of the batched loop holds its own copy
    (``core.sides.PerSlotLM``), whose first forward is its request's prompt pass:

    - ``fault="nan"``: from that request's ``after``-th forward on (1: the prompt pass), its logits are NaN;
    - ``fault="oom"``: its prompt pass raises ``torch.OutOfMemoryError`` (a prompt too long for the device).

    Other requests get exactly ``base``'s logits, and ``marker`` requests up to the fault too. ``delay_s``: each
    forward sleeps that long (rounds long enough for requests to share them in tests over Ray)."""

    def __init__(self, base: TabularLM, marker: list[int], fault: str = "nan", after: int = 1, delay_s: float = 0.0):
        if fault not in ("nan", "oom"):
            raise ValueError(f"fault must be 'nan' or 'oom', got {fault!r}")
        super().__init__(base.vocab_size, table=base.table, max_context=base.max_context)
        self.marker, self.fault, self.after, self.delay_s = list(marker), fault, after, delay_s
        self.doomed, self.calls = False, 0

    def reset(self) -> None:
        super().reset()
        self.doomed, self.calls = False, 0

    def forward(self, token_ids, num_logits):
        if not self.ids:  # a prompt pass: whose request is this?
            self.doomed, self.calls = list(token_ids[: len(self.marker)]) == self.marker, 0
        self.calls += 1
        if self.delay_s:
            import time

            time.sleep(self.delay_s)
        if self.doomed and self.fault == "oom" and not self.ids:
            raise torch.OutOfMemoryError(f"injected: no memory for the prompt pass of {len(token_ids)} tokens")
        logits = super().forward(token_ids, num_logits)
        if self.doomed and self.fault == "nan" and self.calls >= self.after:
            logits = torch.full_like(logits, float("nan"))
        return logits
