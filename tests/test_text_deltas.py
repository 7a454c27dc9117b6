"""Streamed text deltas cost O(new tokens) per step (``engine.TextDeltas``) and add up to the full decode."""

import random

from transformers import AutoTokenizer

from pearl_ray.core.stopping import cut_at_stop
from pearl_ray.engine import TextDeltas
from pearl_ray.modeling.default_pair import draft_dir


class CountingTokenizer:
    """The real SmolLM2 tokenizer (byte-level BPE, multi-byte characters split across tokens), counting
    how many ids each decode reads."""

    def __init__(self):
        self.tok = AutoTokenizer.from_pretrained(str(draft_dir()))
        self.widths = []

    def decode(self, ids, skip_special_tokens=True):
        self.widths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_deltas_add_up_to_the_full_decode_and_read_a_short_window():
    tok = CountingTokenizer()
    text = ("Grüße aus Zürich! 東京の天気は晴れです。 Emoji: 🚀🌧️ and code: def f(x): return x ** 2\n" * 6)
    ids = tok.tok(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    for stops in ((), ("return x",), ("\n\n", "晴れ")):
        d, out, at = TextDeltas(tok, stops), "", 0
        tok.widths.clear()
        while at < len(ids):
            step = rng.randint(1, 5)
            out += d.push(ids[at: at + step])
            at += step
        full = cut_at_stop(tok.tok.decode(ids, skip_special_tokens=True), stops)
        assert full.startswith(out) and len(full) - len(out) <= max((len(s) for s in stops), default=1) + 2
        if not stops:
            assert len(full) - len(out) <= 2
        # a short window of ids per step (longer only while a character is split over tokens), never the
        # whole output: the ids decoded over the stream grow linearly with its length
        assert max(tok.widths) <= 40 and sum(tok.widths) <= 12 * len(ids), (max(tok.widths), sum(tok.widths))
        for s in stops:
            assert s not in out
