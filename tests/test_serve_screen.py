"""moderation.screened, the one place both APIs hold a reply back until it ends (a guard judges
it, or a tool call is read from it), on scripted events: no model, no server."""

import asyncio

import pytest

from herd.engine import Event
from herd.serve.errors import APIError
from herd.serve.moderation import screened


class Guard:
    """Flags any reply holding "bad"; remembers what it was asked."""

    def __init__(self):
        self.asked = []

    async def flags_reply(self, messages, reply):
        self.asked.append((messages, reply))
        return "bad" in reply


async def scripted(events):
    for i, ev in events:
        yield i, ev, None


def run(events, guard=None, conversations=(), hold=False):
    async def collect():
        return [(i, text, reason) async for i, _, text, reason in screened(scripted(events), guard,
                                                                            list(conversations), hold)]

    return asyncio.run(collect())


# two choices, interleaved; choice 1's reply is "a bad one"
EVENTS = [(0, Event("Hel", [1])), (1, Event("a ", [2])), (0, Event("lo", [3], finish_reason="stop")),
          (1, Event("bad ", [4])), (1, Event("one", [5], finish_reason="length"))]


def test_without_a_guard_or_hold_each_piece_passes_as_it_comes():
    assert run(EVENTS) == [(0, "Hel", None), (1, "a ", None), (0, "lo", "stop"), (1, "bad ", None),
                           (1, "one", "length")]


def test_held_replies_come_whole_with_their_finish_reason():
    assert run(EVENTS, hold=True) == [(0, "", None), (1, "", None), (0, "Hello", "stop"), (1, "", None),
                                      (1, "a bad one", "length")]


def test_a_guard_judges_each_whole_reply_against_its_own_conversation():
    guard = Guard()
    asked = [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    assert run(EVENTS, guard, asked)[2:] == [(0, "Hello", "stop"), (1, "", None), (1, "", "content_filter")]
    assert guard.asked == [(asked[0], "Hello"), (asked[1], "a bad one")]


def test_a_failed_generation_is_a_500():
    with pytest.raises(APIError) as e:
        run([(0, Event("x", [1])), (0, Event("", [], finish_reason="error", error="out of memory"))], hold=True)
    assert (e.value.status, e.value.message) == (500, "generation failed: out of memory")
