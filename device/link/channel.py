"""The link's command channel: commands in, replies out, every queue bounded and results first.

A command flood must not cost the board memory or its results, and a hostile Response Topic must not cost it the
connection. So:

* **Intake** (network thread, :meth:`CommandChannel.offer`): the MQTT 5 Response Topic is checked against the
  wire contract (:meth:`device.link.wire.Topics.reply_topic_problem`) before anything else; a topic the board will
  not publish to (a wildcard, ``$``, one of the board's own topics...) makes the command ``bad_reply_topic``: it
  does not run, and its refusal goes to ``<prefix>/reply``. Commands wait in a queue of ``queue_size``; past it,
  they are dropped and counted (``commands_dropped``). An operator's signed command has a lane of its own: an
  envelope that a trusted key signed, unexpired, for this board, whose nonce is new
  (:meth:`device.link.commands.Dispatcher.signed_lane`), waits in a queue of ``signed_queue`` that the command
  thread serves first, so a flood of unsigned, badly signed or replayed commands, which fills the shared queue,
  cannot keep it out (``signed_received``, ``signed_dropped``).
* **The command thread** (:meth:`serve`) runs the dispatcher. A reply to a command that ran is sent at QoS 1 (the
  dispatcher's rate limit bounds how many). A refusal (anything that did not run: malformed, over the rate limit,
  unauthorized, a bad reply topic) or a de-duplicated repeat is sent at QoS 0 within the refusal budget, a token
  bucket of ``refusal_budget = (burst, per second)``; past it, it is not answered (``replies_dropped``), so a
  flood of refused commands costs neither memory nor bandwidth. Replies wait in a queue of ``reply_queue``; past
  it, they are dropped and counted too. A signed-lane command's reply is always sent (at QoS 1) and has
  ``signed_queue`` more places in the reply queue: the flood's replies never crowd it out.
* **Publishing** (network thread, :meth:`pump`, called after the spool's results): at most ``reply_inflight``
  QoS 1 replies are unacknowledged, in a window of their own (paho's in-flight limit is the results' window plus
  this one), so results never wait behind replies. A reply paho refuses is lost, the connection is not.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.clock import SYSTEM_CLOCK
from device.link.errors import BadReplyTopic
from device.link.wire import Topics

log = logging.getLogger(__name__)


class CommandChannel:
    """Bounded command intake, the command thread's loop, and reply publishing for one :class:`Link`.

    Counters are each written by one thread only (intake and publishing on the network thread, replies queued or
    dropped on the command thread), so they need no lock.

    Args:
        dispatcher: Runs commands (:class:`device.link.commands.Dispatcher`).
        topics: The board's topics.
        v5: MQTT 5 (Response Topic and Correlation Data) or 3.1.1 (replies on ``<prefix>/reply``).
        wake: Called when a reply is queued (wakes the network thread).
        clock: ``monotonic()`` for the refusal budget.
        queue_size: Most commands waiting for the command thread.
        reply_queue: Most replies waiting for the network thread.
        reply_inflight: Most QoS 1 replies awaiting PUBACK.
        refusal_budget: ``(burst, per_s)`` of refusal replies.
        signed_queue: Most signed-lane commands waiting (and the reply queue's extra places for their replies).
    """

    def __init__(self, dispatcher, topics: Topics, *, v5: bool, wake: Callable[[], None] = lambda: None,
                 clock=SYSTEM_CLOCK, queue_size: int = 64, reply_queue: int = 64, reply_inflight: int = 16,
                 refusal_budget: tuple[int, float] = (10, 1.0), signed_queue: int = 16) -> None:
        burst, per_s = refusal_budget
        if not (queue_size >= 1 and reply_queue >= 1 and reply_inflight >= 1 and burst >= 0 and per_s >= 0
                and signed_queue >= 1):
            raise ValueError("need queue_size, reply_queue, reply_inflight, signed_queue >= 1 and a refusal budget "
                             ">= 0")
        self.dispatcher, self.topics, self.v5, self._wake, self.clock = dispatcher, topics, v5, wake, clock
        self.queue_size, self.reply_queue, self.reply_inflight = queue_size, reply_queue, reply_inflight
        self.signed_queue = signed_queue
        self._burst, self._per_s = float(burst), float(per_s)
        self._tokens, self._refilled_at = float(burst), clock.monotonic()
        # (name, payload, response, correlation, problem, signed, group): the signed lane is served first
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._signed: collections.deque = collections.deque()
        self._stopping = False
        self._replies: collections.deque = collections.deque()  # (topic, body, properties, qos); bounded below
        self._inflight: set[int] = set()  # paho mids of QoS 1 replies
        self.counters = {"commands_received": 0, "commands_dropped": 0, "commands_queue_peak": 0, "bad_reply_topic": 0,
                         "group_commands": 0, "group_ignored": 0,
                         "signed_received": 0, "signed_dropped": 0,
                         "replies": 0, "replies_failed": 0, "replies_dropped": 0, "replies_queue_peak": 0}

    def status(self) -> dict:
        """Counters and current queue lengths."""
        return {**self.counters, "commands_queued": len(self._commands), "signed_queued": len(self._signed),
                "replies_queued": len(self._replies)}

    # ---------------------------------------------------------------------------------------- network thread

    def offer(self, name: str, payload: bytes, response: object, correlation: bytes | None,
              group: str | None = None) -> None:
        """Queues one command (from ``on_message``; ``group``: it came on that group's command topic); drops it when
        the queue is full. Never raises."""
        problem = None
        if self.v5 and response is not None:
            problem = self.topics.reply_topic_problem(response)
            if problem is not None:
                self.counters["bad_reply_topic"] += 1
                log.debug("command %s: refused reply topic %.80r: %s", name, response, problem)
        signed = problem is None and self.dispatcher.signed_lane(name, payload, group)
        lane, room = (self._signed, self.signed_queue) if signed else (self._commands, self.queue_size)
        with self._cond:
            full = len(lane) >= room
            if not full:
                lane.append((name, payload, response, correlation, problem, signed, group))
                depth = len(self._commands)
                self._cond.notify()
        if full:
            self.counters["signed_dropped" if signed else "commands_dropped"] += 1
            return
        self.counters["signed_received" if signed else "commands_received"] += 1
        if depth > self.counters["commands_queue_peak"]:
            self.counters["commands_queue_peak"] = depth

    def pump(self, client: mqtt.Client) -> None:
        """Publishes queued replies: QoS 0 ones at once, QoS 1 ones within their in-flight window."""
        while self._replies:
            topic, body, props, qos = self._replies[0]
            if qos and len(self._inflight) >= self.reply_inflight:
                return
            self._replies.popleft()
            try:
                info = client.publish(topic, body, qos=qos, properties=props)
            except ValueError as exc:  # paho refuses the topic or payload: the reply is lost, the link is not
                self.counters["replies_failed"] += 1
                log.debug("reply to %.80r not published: %s", topic, exc)
                continue
            if info.rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                self.counters["replies_failed"] += 1
                continue
            self.counters["replies"] += 1
            if qos:
                self._inflight.add(info.mid)

    def acknowledged(self, mid: int) -> bool:
        """Whether ``mid`` was a QoS 1 reply (its window slot is free again)."""
        if mid in self._inflight:
            self._inflight.discard(mid)
            return True
        return False

    def reset(self) -> None:
        """The connection is gone: replies in flight died with paho's client."""
        self._inflight.clear()

    # ---------------------------------------------------------------------------------------- command thread

    def serve(self) -> None:
        """The command thread's loop: dispatch, decide what is answered, queue the reply. Ends on :meth:`stop`."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._signed or self._commands or self._stopping)
                if self._signed:
                    item = self._signed.popleft()
                elif self._commands:
                    item = self._commands.popleft()
                else:
                    return
            try:
                self._serve_one(*item)
            except Exception:  # the dispatcher never raises; this is the last line of defence
                log.exception("command %r failed in the link", item[0])

    def stop(self) -> None:
        """Ends :meth:`serve` (after the commands already queued)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _serve_one(self, name: str, payload: bytes, response: object, correlation: bytes | None,
                   problem: str | None, signed: bool, group: str | None = None) -> None:
        if problem is not None:
            shown = response[:80] if isinstance(response, str) else response
            reply = self.dispatcher.refuse(name, payload, BadReplyTopic(
                f"the board does not publish replies to response topic {shown!r}: {problem}; the refusal goes "
                f"to {self.topics.reply}"))
        else:
            # Own-topic commands keep the two-argument call (wrappers of handle() in tests and tools see no change).
            reply = (self.dispatcher.handle(name, payload) if group is None
                     else self.dispatcher.handle(name, payload, group))
        limited = (reply.refused or reply.cached) and not signed  # the signed lane holds few, all authentic
        if limited and not self._spend():
            self.counters["replies_dropped"] += 1
            return
        if len(self._replies) >= self.reply_queue + (self.signed_queue if signed else 0):
            self.counters["replies_dropped"] += 1
            return
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            if correlation is not None:
                props.CorrelationData = correlation
        topic = response if (self.v5 and response and problem is None) else self.topics.reply
        self._replies.append((topic, reply.body, props, 0 if limited else 1))
        if len(self._replies) > self.counters["replies_queue_peak"]:
            self.counters["replies_queue_peak"] = len(self._replies)
        self._wake()

    def _spend(self) -> bool:
        """Takes a token from the refusal budget."""
        now = self.clock.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled_at) * self._per_s)
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
