"""``trioproxy.hypercorn_app``: the app call's inbox behaves as trio's memory channel, and the notice.

The inbox is checked against ``trio.open_memory_channel`` itself: hypothesis writes random
programs of sends, receives and cancellations, each run step by step on both (every task
blocked before the next step, so a cancellation always finds its task waiting), and what
completed at each step, with what, must be the same. (Hypercorn's own use of it, under concurrency and with bodies in many pieces, is
covered through the real server in test_hypercorn_fast.py and the gateway's tests.)
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trioproxy.hypercorn_app import AppInbox, DisconnectNotice

Op = tuple[str, int]
#: ("send", message), ("receive", 0), ("cancel", which of the tasks started so far, modulo),
#: ("take", 0): receive_nowait, from the test's own task.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 99)),
        st.tuples(st.just("receive"), st.just(0)),
        st.tuples(st.just("cancel"), st.integers(0, 20)),
        st.tuples(st.just("take"), st.just(0)),
    ),
    max_size=25,
)


async def _run(program: list[Op], send: Any, receive: Any, take: Any) -> list[list[tuple[int, str, Any]]]:
    """Each step's completions, as (task number, how, value), in a canonical order."""
    steps: list[list[tuple[int, str, Any]]] = []
    done: list[tuple[int, str, Any]] = []
    scopes: list[trio.CancelScope] = []

    async def task(number: int, scope: trio.CancelScope, op: Op) -> None:
        with scope:
            value = await (send(op[1]) if op[0] == "send" else receive())
            done.append((number, "done", value))
            return
        done.append((number, "cancelled", None))

    async with trio.open_nursery() as nursery:
        for op in program:
            if op[0] == "cancel":
                if scopes:
                    scopes[op[1] % len(scopes)].cancel()
            elif op[0] == "take":
                done.append((-1, "took", take()))
            else:
                scopes.append(trio.CancelScope())
                nursery.start_soon(task, len(scopes) - 1, scopes[-1], op)
            await trio.testing.wait_all_tasks_blocked()
            steps.append(sorted(done))
            done.clear()
        nursery.cancel_scope.cancel()
    steps.append(sorted(done))
    return steps


@settings(max_examples=300, deadline=None)
@given(program=OPS, capacity=st.integers(0, 3))
def test_the_inbox_does_what_trios_memory_channel_does(program: list[Op], capacity: int) -> None:
    async def both() -> tuple[Any, Any]:
        send_channel, receive_channel = trio.open_memory_channel[int](capacity)
        def take_from_channel() -> int | None:
            try:
                return receive_channel.receive_nowait()
            except trio.WouldBlock:
                return None

        expected = await _run(program, send_channel.send, receive_channel.receive, take_from_channel)
        inbox = AppInbox(capacity)
        return expected, await _run(program, inbox.send, inbox.receive, inbox.receive_nowait)

    expected, got = trio.run(both)
    assert got == expected


async def test_first_in_first_out_and_a_full_inbox_makes_the_sender_wait() -> None:
    inbox = AppInbox(2)
    await inbox.send("a")
    await inbox.send("b")
    sent = trio.Event()

    async def third() -> None:
        await inbox.send("c")
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()  # two buffered: the third waits for room
        assert await inbox.receive() == "a"
        await trio.testing.wait_all_tasks_blocked()
        assert sent.is_set()
    assert [await inbox.receive(), await inbox.receive()] == ["b", "c"]


async def test_a_cancelled_call_takes_and_leaves_nothing() -> None:
    inbox = AppInbox(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.send("lost")
    assert scope.cancelled_caught
    await inbox.send("kept")
    with trio.CancelScope() as scope:
        scope.cancel()
        await inbox.receive()
    assert scope.cancelled_caught
    assert await inbox.receive() == "kept"  # the cancelled receive took nothing, the cancelled send left nothing


async def test_receive_yields_even_when_it_need_not_wait_and_send_only_when_it_waits() -> None:
    inbox = AppInbox(1)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await inbox.send("x")  # room for it: no schedule point, so the other task has not run yet
        assert ran == []
        with trio.testing.assert_checkpoints():
            assert await inbox.receive() == "x"
    await inbox.send("y")
    taken: list[str] = []

    async def take_once_blocked() -> None:
        await trio.testing.wait_all_tasks_blocked()
        taken.append(await inbox.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take_once_blocked)
        with trio.testing.assert_checkpoints():  # the inbox is full: this send waits for that receive
            await inbox.send("z")
    assert taken == ["y"] and inbox.receive_nowait() == "z"


def test_a_notice_calls_its_subscriber_once_when_fired_or_at_once_if_fired_before() -> None:
    calls: list[str] = []
    notice = DisconnectNotice()
    notice.subscribe(lambda: calls.append("first"))
    assert calls == [] and not notice.closed
    notice.fire()
    assert calls == ["first"] and notice.closed
    notice.fire()  # (Hypercorn closes a stream once; a second firing calls nobody)
    assert calls == ["first"]
    notice.subscribe(lambda: calls.append("late"))
    assert calls == ["first", "late"]  # subscribed after the stream closed: told at once


def test_an_unsubscribed_callback_is_not_called() -> None:
    calls: list[str] = []
    notice = DisconnectNotice()
    notice.subscribe(lambda: calls.append("x"))
    notice.unsubscribe()
    notice.fire()
    assert calls == [] and notice.closed
