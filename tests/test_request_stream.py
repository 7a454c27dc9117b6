"""``runtime.leader_loop.RequestStream``: what the target leader's loop thread hands one caller. Tokens go out
as rounds commit them; with ``hold_s`` (a caller that wants the result, not each round's tokens) they go out
at most once per ``hold_s`` after the first, and the final result never waits for the hold."""

import threading
import time

import pytest

from pearl_ray.core.batch import Event
from pearl_ray.errors import TargetUnavailable
from pearl_ray.runtime.leader_loop import RequestStream


def _feed(stream: RequestStream, rounds: int, every_s: float) -> threading.Thread:
    """A stand-in for the loop thread: one token per round, then the final event."""
    def run():
        for i in range(rounds):
            time.sleep(every_s)
            stream.push(Event(None, [i]))
        stream.push(Event(None, [], finished=True, output_ids=list(range(rounds))))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _drain(stream: RequestStream, hold_s: float) -> list:
    items = []
    while not isinstance(items[-1] if items else None, dict):
        items.append(stream.next_item(30.0, hold_s))
    return items


def test_without_a_hold_every_round_goes_out_on_its_own():
    stream = RequestStream()
    _feed(stream, 6, 0.02).join()  # everything is in before the caller reads: one list, then the result
    assert _drain(stream, 0.0) == [[0, 1, 2, 3, 4, 5], {"token_ids": [0, 1, 2, 3, 4, 5], "stats": None}]
    live = RequestStream()
    _feed(live, 6, 0.05)
    items = _drain(live, 0.0)
    assert sum(items[:-1], []) == list(range(6)) and len(items) >= 4  # a reader that keeps up: ~one per round


def test_a_hold_gathers_rounds_after_the_first_and_the_result_does_not_wait():
    stream = RequestStream()
    _feed(stream, 12, 0.02)
    t0 = time.monotonic()
    items = _drain(stream, 30.0)
    took = time.monotonic() - t0
    # the first round's tokens at once, the other eleven gathered until the result came, then the result
    assert [len(x) for x in items[:-1]] == [1, 11] and sum(items[:-1], []) == list(range(12))
    assert items[-1]["token_ids"] == list(range(12))
    assert took < 10.0, "the final result waited for the 30 s hold"


def test_a_hold_still_sends_gathered_tokens_once_it_has_passed():
    stream = RequestStream()
    _feed(stream, 10, 0.05)  # ~0.5 s of rounds
    items = _drain(stream, 0.12)
    tokens = [x for x in items[:-1]]
    assert sum(tokens, []) == list(range(10))
    assert 3 <= len(tokens) <= 7, tokens  # ~one list per 0.12 s, not one per round, not one in all


def test_the_hold_never_outlasts_the_timeout():
    stream = RequestStream()
    stream.push(Event(None, [1]))
    assert stream.next_item(5.0, 60.0) == [1]
    with pytest.raises(TargetUnavailable, match="produced nothing"):
        stream.next_item(0.2, 60.0)
