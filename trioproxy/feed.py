"""The live feed: every usage record, as it is written, to WebSocket subscribers of ``/_/live``.

``Broadcaster.publish`` is called with each batch by the telemetry writer (the same
hook as the metrics), so the request path never waits for a subscriber. Each
subscriber has its own bounded buffer; a subscriber that falls that far behind is
dropped (its channel closed, counted) rather than ever slowing the gateway or
holding memory for it. Events are JSON text messages::

    {"type": "record", "record": {...one usage record, as in the JSONL log...}}
    {"type": "upstream", "upstream": "ollama", "healthy": false, "circuit": "open",
     "reason": "connect refused", "ts": 1764000000.123}

Upstream events come from ``watch_upstreams``, a service task that looks at every
upstream's health and circuit state four times a second and publishes what changed
(a removed upstream: ``"removed": true``). A new subscriber first gets the current
state of every upstream, then the changes.

Several workers (``serve --workers N``): a WebSocket lands on one worker, but the feed
must show them all. There each worker's feed is fed instead by ``follow_usage_files``,
which reads every worker's usage file back while someone is subscribed (at most
``FOLLOW_S`` plus ``telemetry.flush_ms`` behind); with telemetry off, a worker's feed
carries its own records only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from attrs import frozen

from .logview import Follower
from .telemetry import Record, encode_record

if TYPE_CHECKING:
    from .services import Services

#: Events a subscriber may fall behind before it is dropped, at least (``server.main`` gives it
#: two of the writer's batches, ``2 * telemetry.batch_max``: they are published in bursts).
SUBSCRIBER_BUFFER = 256
#: Seconds between two looks at the upstreams' health and circuits (state-change events).
UPSTREAM_POLL_S = 0.25
#: Seconds between two reads of the usage files (several workers, while someone is subscribed).
FOLLOW_S = 0.1


@frozen
class FeedStatistics:
    subscribers: int
    published: int
    dropped_subscribers: int


class Broadcaster:
    """Fan-out of events to subscribers, each through its own bounded memory channel [no I/O]."""

    def __init__(self, *, buffer: int = SUBSCRIBER_BUFFER) -> None:
        self._buffer = buffer
        self._subscribers: set[trio.MemorySendChannel[str]] = set()
        self._published = 0
        self._dropped = 0
        #: The last upstream event of each upstream: what a new subscriber is told first.
        self.upstreams: dict[str, str] = {}

    def subscribe(self) -> trio.MemoryReceiveChannel[str]:
        """A new subscriber's end, holding the upstreams' current state; closing it ends the subscription."""
        send, receive = trio.open_memory_channel[str](self._buffer + len(self.upstreams))
        for event in self.upstreams.values():
            send.send_nowait(event)
        self._subscribers.add(send)
        return receive

    def unsubscribe(self, receive: trio.MemoryReceiveChannel[str]) -> None:
        receive.close()  # its send end then fails and is removed on the next publish

    @property
    def subscribed(self) -> bool:
        return bool(self._subscribers)

    def publish(self, batch: list[Record]) -> None:
        """Send each record to every subscriber; never blocks, never raises."""
        if self._subscribers:
            self.publish_events([_event(rec) for rec in batch])

    def publish_events(self, events: list[str]) -> None:
        """Send encoded events to every subscriber; never blocks, never raises."""
        for send in list(self._subscribers):
            try:
                for event in events:
                    send.send_nowait(event)
            except trio.WouldBlock:  # too slow: dropped, never waited for
                self._dropped += 1
                self._subscribers.discard(send)
                send.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):  # gone
                self._subscribers.discard(send)
        self._published += len(events)

    def statistics(self) -> FeedStatistics:
        return FeedStatistics(len(self._subscribers), self._published, self._dropped)


def _event(rec: Record) -> str:
    return '{"type":"record","record":' + encode_record(rec).decode().rstrip("\n") + "}"


def upstream_states(services: Services) -> dict[str, dict[str, Any]]:
    """Each upstream's health and circuit, as the feed reports them."""
    now = trio.current_time()
    states = {}
    for uid, rt in services.runtimes.items():
        described = services.board.describe(uid)
        states[uid] = {
            "healthy": rt.healthy,
            "circuit": rt.breaker.snapshot(now).state,
            "reason": described["reason"] if not rt.healthy else "",
        }
    return states


async def watch_upstreams(feed: Broadcaster, services: Services, *, interval: float = UPSTREAM_POLL_S) -> None:
    """Publish each change of an upstream's health or circuit state (until cancelled)."""
    last: dict[str, dict[str, Any]] = {}
    while True:
        current = upstream_states(services)
        events = []
        for uid, state in current.items():
            if last.get(uid) != state:
                events.append((uid, {"type": "upstream", "upstream": uid, **state, "ts": round(time.time(), 3)}))
        for uid in last.keys() - current.keys():  # removed by a reload
            events.append((uid, {"type": "upstream", "upstream": uid, "removed": True, "ts": round(time.time(), 3)}))
        if events:
            texts = []
            for uid, event in events:
                text = json.dumps(event, separators=(",", ":"))
                texts.append(text)
                if event.get("removed"):
                    feed.upstreams.pop(uid, None)
                else:
                    feed.upstreams[uid] = text
            feed.publish_events(texts)
        last = current
        await trio.sleep(interval)


def _record_event(rec: dict[str, Any]) -> str:
    return json.dumps({"type": "record", "record": rec}, separators=(",", ":"))


async def follow_usage_files(feed: Broadcaster, directory: Path, *, interval: float = FOLLOW_S) -> None:
    """Feed ``feed`` with every record the usage files in ``directory`` gain (all workers), until cancelled.

    Reads records only while someone is subscribed; otherwise it only notes where the
    files end (a listing and a stat), so a new subscriber gets everything written since.
    File access runs in a worker thread.
    """
    follower = Follower(directory)
    while True:
        if feed.subscribed:
            entries = await trio.to_thread.run_sync(lambda: list(follower.read_new()))
            if entries:
                feed.publish_events([_record_event(entry.rec) for entry in entries])
        else:
            await trio.to_thread.run_sync(follower.read_last, 0, lambda rec: True)  # skip to the end
        await trio.sleep(interval)


def parse_event(text: str) -> dict[str, object]:
    """Decode one feed event (clients and tests)."""
    event = json.loads(text)
    if not isinstance(event, dict):
        raise ValueError("a feed event is a JSON object")
    return event
