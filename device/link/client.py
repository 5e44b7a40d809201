"""The MQTT link: the spool's messages out, commands in, the board's state retained.

Threads and ownership:

* **The network thread** (``link``; ours, not paho's ``loop_start``) owns the paho client. Every paho call
  happens on it, so no paho state is shared between threads. It connects, publishes the spool's committed
  messages in id order with at most ``inflight`` unacknowledged, publishes command replies, and on PUBACK
  acknowledges the message to the spool, which deletes it at its next commit.
* **It sleeps**: paho is driven through its external-loop calls (``loop_read``/``loop_write``/``loop_misc``)
  from one ``poll`` over the MQTT socket and a wake-up descriptor (:class:`device.threads.Waker`). The spool
  sets it when new rows are durable, the command thread when a reply is queued, :meth:`Link.refresh_birth` and
  :meth:`Link.stop` too. Otherwise the thread wakes for the socket, for the keepalive (at most every
  :data:`IDLE_WAKE_S`, so the watchdog sees it turn) and for the oldest result's ``ack_timeout_s``; it reads the
  spool only when the spool has committed past what it fetched.
* **Reconnects**: when the connection drops (or never comes up), the client is discarded and a fresh one
  is made after an exponential backoff with jitter, capped at ``backoff_max_s``. A fresh client per
  connection avoids paho's own reconnect path (paho #785: no reconnect after a long outage with
  ``loop_start``) and its in-memory resend queue (lost on a process death anyway): the spool is the only
  queue, and after every connect the link replays it from the start. A message whose PUBACK was lost is
  therefore published twice; consumers drop duplicates by the message ``id``. No topic aliases are used
  (paho #893).
* **The command thread** runs the :class:`device.link.commands.Dispatcher` on each command message (a
  slow command never stalls the network) and hands the reply back to the network thread, through the bounded
  queues of :class:`device.link.channel.CommandChannel`: a flood of commands costs neither memory nor results,
  and a Response Topic the board will not publish to is refused without touching the connection.
* **Inbound size**: the client comes from :mod:`device.link.mqttclient`; under MQTT 5 its CONNECT carries Maximum
  Packet Size (``max_payload`` plus headroom for the topic and properties), so the broker drops an oversized command
  before it reaches the board. MQTT 3.1.1 has no such property: there the dispatcher refuses it
  (``payload_too_large``) after paho has read it.
* **Acknowledgements that stop**: a broker under load can stop acknowledging while the connection stays up (a
  flood of commands filled its queue for this client, and the results' PUBACKs never came). A message in flight
  longer than ``ack_timeout_s`` resets the session: the client is dropped and a fresh one replays the spool
  (consumers drop the duplicates by ``id``). From that moment until a PUBACK arrives again the link reports
  itself unhealthy (:attr:`Link.healthy`, ``status()["acks_stalled"]``), so the agent's status and watchdog
  see it.
* **The journal** says each change once: the disconnect with a readable reason (what the broker said, "the
  broker closed the connection", "network error: ..."), the reconnect with how long the board was offline and
  how many messages wait in the spool, and when that backlog has been delivered.
* **Producers** (the agent's loops) call :meth:`Link.publish_result` / ``publish_event`` /
  ``publish_telemetry``: a spool ``put``, no I/O on their thread. Nothing is published before it is
  committed to disk.

State topic: ``online`` (retained) after each connect, with the birth information; ``offline`` on a clean
:meth:`Link.stop`; ``lost`` is the last will the broker publishes when the board vanishes. All three carry the
connection's ``session`` number, and the link heals its own retained state: it subscribes to it and publishes
``online`` again over a ``lost`` or ``offline`` of an older session (:mod:`device.link.presence`).

Groups: for each of the board's groups (:class:`device.link.groups.Groups`) the link subscribes to
``fieldnode/v1/group/<group>/cmd/+`` and hands what comes there to the command channel marked with its group (the
dispatcher then requires an envelope bound to that group). When the groups change, the network thread
unsubscribes and subscribes at its next turn; a command still arriving for a group the board has left is ignored
(not answered, counted ``group_ignored``).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from device.clock import SYSTEM_CLOCK, backoff_delay
from device.link import presence
from device.link.channel import CommandChannel
from device.link.errors import ConnectError
from device.link.spool.spool import Kind, Spool
from device.link import wire
from device.link.wire import GroupTopics, Topics, default_prefix
from device.link.mqttclient import Client, Endpoint, disconnect_reason, new_client
from device.link.url import TlsFiles, parse_broker_url
from device.threads import Thread, Waker

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]
_READ_AHEAD = 512  # spool messages fetched per read
DEFAULT_MAX_PAYLOAD = 16384  # the dispatcher's default
# Room in an inbound packet besides the payload: fixed header, topic, packet id and properties (a Response Topic of
# up to wire.MAX_REPLY_TOPIC_BYTES, Correlation Data, expiry). A command needing more is dropped by the broker.
PACKET_HEADROOM = 4096
REPLY_INFLIGHT = 16  # QoS 1 replies awaiting PUBACK, in a window apart from the results'
DEFAULT_ACK_TIMEOUT_S = 30.0
IDLE_WAKE_S = 5.0  # the longest the network thread sleeps with nothing to do (a keepalive/4 is shorter below 20 s)


def _json(obj) -> bytes:
    """Every payload the board publishes: the wire contract's encoding."""
    return wire.encode(obj, default=str)


class Link:
    """One board's MQTT connection.

    Args:
        broker: Broker URL (``mqtt://`` or ``mqtts://``).
        device_id: This board's id (also the MQTT client id).
        spool: The durable spool; the link publishes what it holds and acknowledges it.
        prefix: Topic prefix; empty means ``fieldnode/v1/<device_id>``.
        protocol: ``"5"`` or ``"3.1.1"``.
        tls: CA, client certificate and key for ``mqtts``.
        username: Optional username.
        password: Optional password (from :func:`device.link.url.read_password`); None or empty: none.
        keepalive_s: MQTT keepalive.
        backoff: ``(min, max)`` reconnect delay in seconds.
        inflight: Most QoS 1 messages awaiting PUBACK.
        dispatcher: Runs commands; None ignores ``cmd/`` messages.
        birth: Returns the ``online`` state payload's extra fields (version, models, backend...).
        clock: Time source (timestamps; waits use events).
        on_event: ``on_event(kind, data)`` for link events (connected, disconnected, refused publishes).
        rng: Random source for the backoff jitter.
        max_payload: Largest command payload in bytes; the MQTT 5 Maximum Packet Size is this plus
            ``PACKET_HEADROOM`` and the prefix. Default: the dispatcher's ``max_payload``.
        refusal_budget: ``(burst, per_s)`` of replies to refused or repeated commands (sent at QoS 0); past it
            they are not answered (see :mod:`device.link.channel`).
        ack_timeout_s: A result in flight this long without its PUBACK resets the session (see the module
            docstring).
        session_path: The session counter's file (:class:`device.link.presence.SessionCounter`); None counts in
            memory.
        groups: The board's groups (:class:`device.link.groups.Groups`), whose command topics the link subscribes
            to; None: none.
    """

    def __init__(self, broker: str, device_id: str, spool: Spool, *, prefix: str = "", protocol: str = "5",
                 tls: TlsFiles = TlsFiles(), username: str = "", password: str | None = None, keepalive_s: int = 30,
                 backoff: tuple[float, float] = (0.5, 60.0), inflight: int = 64, dispatcher=None,
                 birth: Callable[[], dict] | None = None, clock=SYSTEM_CLOCK, on_event: EventSink | None = None,
                 rng: random.Random | None = None, max_payload: int | None = None,
                 refusal_budget: tuple[int, float] = (10, 1.0), ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S,
                 session_path: str | None = None, groups=None):
        self.url = parse_broker_url(broker)
        if protocol not in ("5", "3.1.1"):
            raise ValueError(f"protocol must be '5' or '3.1.1', got {protocol!r}")
        self.endpoint = Endpoint(self.url, tls, username or None, password or None, protocol)  # checks the TLS files
        if not ack_timeout_s > 0:
            raise ValueError(f"ack_timeout_s must be a positive number of seconds, got {ack_timeout_s!r}")
        self.ack_timeout_s = float(ack_timeout_s)
        self.device_id = device_id
        self.topics = Topics(prefix or default_prefix(device_id))
        self.spool = spool
        self.protocol = protocol
        self.tls = tls
        self.username, self.password = username, password
        self.keepalive_s = keepalive_s
        self.backoff_min, self.backoff_max = backoff
        self.inflight_limit = inflight
        self.dispatcher = dispatcher
        if max_payload is None:
            max_payload = getattr(dispatcher, "max_payload", DEFAULT_MAX_PAYLOAD)
        if not isinstance(max_payload, int) or max_payload < 1:
            raise ValueError(f"max_payload must be a positive number of bytes, got {max_payload!r}")
        self.max_packet = max_payload + PACKET_HEADROOM + len(self.topics.prefix.encode("utf-8"))
        self._birth = birth or (lambda: {})
        self._rebirth = False
        self.sessions = presence.SessionCounter(session_path, clock)
        self.session: int | None = None  # the session of the current (or last) connection
        self.groups = groups
        self._subscribed_groups: frozenset[str] = frozenset()  # the group topics of this connection
        self._regroup = False  # the groups changed: the network thread subscribes at its next turn
        if groups is not None:
            groups.on_change(lambda _groups: self._groups_changed())
        self.clock = clock
        self._on_event = on_event
        self.on_turn: Callable[[], None] | None = None  # called at each turn of the network thread (the watchdog)
        self._rng = rng or random.Random()
        self._client: Client | None = None
        self._connected = False
        self._lost: str | None = None
        self._net_error: str | None = None  # paho's first socket error of this connection (the disconnect's cause)
        self._inflight: dict[int, tuple[int, float]] = {}  # paho mid -> (spool id, monotonic publish time), in order
        self._resetting = False
        self._ack_stall_since: float | None = None  # monotonic time the acknowledgements were found stopped
        self._offline_since: float | None = None  # monotonic; None while connected or before the first attempt
        self._draining: tuple[int, int, float] | None = None  # (last id waiting, how many, monotonic start)
        self._cursor = 0  # highest spool id fetched for publishing
        self._at_end = False  # the last read found everything committed past the cursor
        self._read_mark = -1  # the spool's readable_mark before that read
        self._ahead: collections.deque = collections.deque()  # fetched, not yet published
        self._acked: list[int] = []  # PUBACKed this loop iteration; handed to the spool in one call
        self.channel = None if dispatcher is None else CommandChannel(
            dispatcher, self.topics, v5=protocol == "5", wake=self._wake_up, clock=clock,
            reply_inflight=REPLY_INFLIGHT, refusal_budget=refusal_budget)
        self._stop = threading.Event()
        self._waker: Waker | None = None  # made by start(), closed by stop()
        self._connected_event = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failures = 0
        self.counters = {"connects": 0, "disconnects": 0, "connect_failures": 0, "published": 0, "acked": 0,
                         "refused": 0, "ack_timeouts": 0, "state_healed": 0}
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self._refused_topics: set[str] = set()

    # ------------------------------------------------------------------------------------------ producers

    def publish_result(self, model: str, result: dict) -> int:
        """Spools a result on ``results/<model>``; its payload carries the message ``id``. Returns the id."""
        topic = self.topics.results(model)
        return self.spool.put(Kind.RESULT, topic, lambda mid: _json({"id": mid, **result}))

    def publish_event(self, kind: str, data: dict) -> int:
        """Spools an event (governor changes, update progress, faults) on ``events``."""
        return self.spool.put(Kind.EVENT, self.topics.events,
                              lambda mid: _json({"id": mid, "kind": kind, "time": self.clock.time(), **data}))

    def publish_telemetry(self, data: dict) -> int:
        """Spools a telemetry summary (dropped first when the spool is over budget)."""
        return self.spool.put(Kind.TELEMETRY, self.topics.telemetry,
                              lambda mid: _json({"id": mid, "time": self.clock.time(), **data}))

    def _groups_changed(self) -> None:
        self._regroup = True
        self.refresh_birth()  # the retained state lists the groups

    def refresh_birth(self) -> None:
        """Publishes the retained ``online`` state again with a fresh birth (from the network thread, at its next
        turn): the agent calls it once the runtime has started, since the link comes up before the model."""
        self._rebirth = True
        self._wake_up()

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts the network and command threads (connecting in the background)."""
        if self._threads:
            return
        self._stop.clear()
        self._offline_since = self.clock.monotonic()
        self._waker = Waker()
        self.spool.on_durable(self._wake_up)  # new rows to publish wake the network thread
        loops = [(self._run, "link")] + ([(self.channel.serve, "link-cmd")] if self.channel is not None else [])
        for target, name in loops:
            t = Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        """Publishes ``offline`` (retained), disconnects cleanly (no last will) and joins the threads."""
        if not self._threads:
            return
        self._stop_timeout = timeout
        self._stop.set()
        self._wake_up()
        if self.channel is not None:
            self.channel.stop()
        for t in self._threads:
            t.join(timeout + 5.0)
        self._threads = []
        self.spool.off_durable(self._wake_up)
        waker, self._waker = self._waker, None
        if waker is not None:
            waker.close()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected_event.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def healthy(self) -> bool:
        """False from the moment results in flight went unacknowledged past ``ack_timeout_s`` until a PUBACK
        arrives again (the link resets its session meanwhile). A link that is merely offline is healthy: its
        state is :attr:`connected`."""
        return self._ack_stall_since is None

    def status(self) -> dict:
        """The link for ``status``: the broker and connection, counters, ``healthy`` and ``acks_stalled`` (with
        ``ack_stall_s``, seconds since the acknowledgements stopped), the command channel's queues."""
        stall = self._ack_stall_since
        return {"broker": str(self.url), "protocol": self.protocol, "prefix": self.topics.prefix,
                "connected": self._connected, "connected_since": self.connected_since,
                "last_error": self.last_error, "inflight": len(self._inflight), "max_packet": self.max_packet,
                "healthy": stall is None, "acks_stalled": stall is not None,
                "ack_stall_s": None if stall is None else round(max(0.0, self.clock.monotonic() - stall), 3),
                "ack_timeout_s": self.ack_timeout_s, "session": self.session,
                "session_problem": self.sessions.problem, "groups": sorted(self._subscribed_groups),
                **self.counters, **(self.channel.status() if self.channel is not None else {}),
                "commands": self.dispatcher.counters if self.dispatcher is not None else None}

    # ------------------------------------------------------------------------------------ network thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.on_turn is not None:
                self.on_turn()
            try:
                if self._client is None and not self._connect():
                    self._backoff_wait()
                    continue
                rc = self._turn()
                if self._acked:  # PUBACKs that arrived in this loop, even if the connection then dropped
                    self.spool.ack(self._acked)
                    self._acked = []
                if rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._lost is None:
                    self._lost = f"network error: {self._net_error or mqtt.error_string(rc)}"
                if self._lost is not None:
                    self._drop_client(self._lost)
                    self._backoff_wait()
                    continue
                if self._connected:
                    self._pump()
            except Exception as exc:  # never let the network thread die: record, drop, retry
                log.exception("link network thread error")
                self._drop_client(f"{type(exc).__name__}: {exc}")
                self._backoff_wait()
        self._shutdown()

    def _turn(self) -> mqtt.MQTTErrorCode:
        """One wait and paho's work after it: what :meth:`paho.mqtt.client.Client.loop` does, but the wait also ends on
        the wake-up descriptor and lasts until the next deadline instead of a fixed few milliseconds."""
        c = self._client
        sock = c.socket()
        if sock is None:
            return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS bytes already read from the socket
        _, readable, writable = self._waker.wait(0.0 if pending else self._sleep_s(), sock, write=c.want_write())
        if readable or pending:
            rc = c.loop_read()
            if rc or c.socket() is None:
                return rc
        if writable or c.want_write():  # what the callbacks of this read queued (a SUBSCRIBE, the birth) goes now
            rc = c.loop_write()
            if rc or c.socket() is None:
                return rc
        return c.loop_misc()

    def _sleep_s(self) -> float:
        """Until the next deadline: the keepalive's check, or the oldest result's acknowledgement timeout."""
        wait = min(IDLE_WAKE_S, self.keepalive_s / 4.0)
        if self._inflight and self._lost is None:
            sent = next(iter(self._inflight.values()))[1]
            wait = min(wait, sent + self.ack_timeout_s - self.clock.monotonic() + 0.001)
        return max(0.0, wait)

    def _new_client(self) -> Client:
        c = new_client(self.endpoint, self.device_id, max_packet=self.max_packet)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_publish = self._cb_publish
        c.on_message = self._cb_message
        c.on_log = self._cb_log
        c.suppress_exceptions = True  # belt and braces: every callback below also catches everything itself
        # Results and replies have windows of their own; paho's is their sum (plus the state message), and its
        # queue can never grow past that: our windows bound it, and a publish past it fails instead of queueing.
        window = self.inflight_limit + REPLY_INFLIGHT + 2
        c.max_inflight_messages_set(window)
        c.max_queued_messages_set(window)
        # A new session per connection attempt, persisted before the will that carries it reaches the broker.
        self.session = self.sessions.next()
        c.will_set(self.topics.state, _json(presence.will(self.device_id, self.session, self._groups_now())), qos=1,
                   retain=True)
        return c

    def _connect(self) -> bool:
        self._lost = None
        self._net_error = None
        try:
            c = self._new_client()
            c.open(self.keepalive_s)  # MQTT 5: announces max_packet, so the broker drops larger commands
        except Exception as exc:  # OSError, ssl.SSLError, socket.timeout, ValueError from paho
            err = ConnectError(f"cannot connect to {self.url}: {type(exc).__name__}: {exc}")
            self._note_failure(str(err))
            return False
        self._client = c
        return True

    def _note_failure(self, reason: str) -> None:
        self.counters["connect_failures"] += 1
        self._failures += 1
        self._ack_stall_since = None  # offline now: `connected` says so; acks cannot come until it is back
        if reason != self.last_error:
            log.warning("link: %s", reason)
        self.last_error = reason

    def _backoff_wait(self) -> None:
        """Sleeps out the reconnect backoff; only a stop ends it early (new rows wait for the connection)."""
        end = time.monotonic() + backoff_delay(self._failures - 1, self.backoff_min, self.backoff_max, self._rng)
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._waker.wait(left)

    def _wake_up(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.set()

    def _drop_client(self, reason: str) -> None:
        c, self._client = self._client, None
        was = self._connected
        self._connected = False
        self._connected_event.clear()
        self._inflight.clear()
        self._ahead.clear()
        if self.channel is not None:
            self.channel.reset()
        if c is not None and self._resetting:
            try:
                c.disconnect()
                c.loop_write()
            except Exception:  # the connection is going anyway
                pass
        self._resetting = False
        if c is not None:
            try:
                c.socket() and c.socket().close()
            except Exception:  # already closed
                pass
        if was:
            self.counters["disconnects"] += 1
            self._failures = 1
            self.connected_since = None
            self._offline_since = self.clock.monotonic()
            self._draining = None
            self.last_error = reason
            self._emit("link_disconnected", {"reason": reason})
            log.warning("link: lost the connection to %s: %s", self.url, reason)
        else:
            self._note_failure(reason)

    def _publish_birth(self, client: mqtt.Client) -> None:
        self._rebirth = False
        birth = presence.online(self.device_id, self.session, self.clock.time(), self._birth())
        client.publish(self.topics.state, _json(birth), qos=1, retain=True)

    def _pump(self) -> None:
        c = self._client
        if self._regroup and self._connected:
            self._subscribe_groups(c)
        if self._rebirth and self._connected:
            self._publish_birth(c)
        self._pump_results(c)  # results first: replies never hold them up
        if self.channel is not None and self._lost is None:
            self.channel.pump(c)
        self._check_acks()

    def _check_acks(self) -> None:
        """Resets the session when the oldest result in flight has waited past ``ack_timeout_s``; notes when the
        backlog waiting at the connect has been delivered."""
        if self._draining is not None:
            last, count, since = self._draining
            oldest_sid = next(iter(self._inflight.values()))[0] if self._inflight else None
            fetched_all = self._cursor >= last or (self._at_end and not self._ahead)
            if fetched_all and (oldest_sid is None or oldest_sid > last):
                self._draining = None
                log.info("link: the backlog of %d message(s) is delivered (%.1f s after the connect)", count,
                         self.clock.monotonic() - since)
        if not self._inflight:
            self._ack_stall_since = None  # nothing awaits an acknowledgement: nothing can be stalled
            return
        now = self.clock.monotonic()
        waited = now - next(iter(self._inflight.values()))[1]
        if waited <= self.ack_timeout_s or self._lost is not None:
            return
        self.counters["ack_timeouts"] += 1
        if self._ack_stall_since is None:
            self._ack_stall_since = now
        self._resetting = True  # a clean DISCONNECT: the broker must not publish the last will for a reset
        self._lost = (f"no PUBACK from the broker for {waited:.0f} s with {len(self._inflight)} message(s) in flight "
                      f"(link.ack_timeout_s {self.ack_timeout_s:g}); resetting the session")

    def _pump_results(self, c: mqtt.Client) -> None:
        room = self.inflight_limit - len(self._inflight)
        while room > 0:
            if not self._ahead:
                mark = self.spool.readable_mark
                if self._at_end and mark == self._read_mark:
                    return  # nothing committed since the last read reached the end: no query (the spool wakes us)
                # Fetch well ahead of the window: a read waits while the spool commits (an fsync), so fewer,
                # larger reads keep the pipe full.
                limit = max(room, _READ_AHEAD)
                fetched = self.spool.batch(self._cursor, limit)
                self._at_end = len(fetched) < limit  # a short read had everything committed before it
                self._read_mark = mark
                if not fetched:
                    return
                self._cursor = fetched[-1].id
                self._ahead.extend(fetched)
            if not self._publish_ahead(c, room):
                return
            room = self.inflight_limit - len(self._inflight)

    def _publish_ahead(self, c: mqtt.Client, room: int) -> bool:
        """Publishes fetched messages while there is room; False when paho refused one (the connection goes)."""
        while room > 0 and self._ahead:
            m = self._ahead[0]
            info = c.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
            if info.rc != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost = f"publish refused by the client: {mqtt.error_string(info.rc)}"
                return False
            self._ahead.popleft()
            room -= 1
            self.counters["published"] += 1
            if m.qos == 0:
                self._acked.append(m.id)
            else:
                self._inflight[info.mid] = (m.id, self.clock.monotonic())
        return True

    def _shutdown(self) -> None:
        c = self._client
        if self._acked:
            self.spool.ack(self._acked)
            self._acked = []
        if c is None:
            return
        if self._connected:
            info = c.publish(self.topics.state, _json(presence.offline(self.device_id, self.session, self.clock.time(),
                                                                       self._groups_now())), qos=1, retain=True)
            deadline = self.clock.monotonic() + getattr(self, "_stop_timeout", 5.0)
            while not info.is_published() and self._lost is None and self.clock.monotonic() < deadline:
                c.loop(timeout=0.05)
            c.disconnect()
            for _ in range(5):
                if c.loop(timeout=0.05) != mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        self._client = None
        self._connected = False

    # ---------------------------------------------------------------------- paho callbacks (net thread)

    def _cb_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self._lost = f"connection refused by the broker: {reason_code}"
                return
            self._connected = True
            self._cursor = 0  # replay the spool from the start: anything unacknowledged goes again
            self._at_end = False
            self._inflight.clear()
            self._ahead.clear()
            self.counters["connects"] += 1
            self.connected_since = self.clock.time()
            self.last_error = None
            self._failures = 0
            self._note_connected()
            client.subscribe(self.topics.cmd_filter, qos=1)
            self._subscribed_groups = frozenset()
            self._subscribe_groups(client)
            self._publish_birth(client)
            # After the birth: the retained state the broker sends back at once is this connection's online.
            client.subscribe(self.topics.state, qos=1)
            dropped = self.spool.pop_dropped()
            if any(dropped.values()):
                self.publish_event("spool_dropped", {"dropped": dropped})
            self._emit("link_connected", {"broker": str(self.url), "connects": self.counters["connects"]})
            self._connected_event.set()
        except Exception:
            log.exception("link on_connect failed")
            self._lost = "on_connect failed"

    def _note_connected(self) -> None:
        """Logs the connect: how long the board was offline and how much waits in the spool."""
        now = self.clock.monotonic()
        st = self.spool.stats()
        waiting = st["messages"] + st["pending"]
        offline = "" if self._offline_since is None else f" after {now - self._offline_since:.1f} s offline"
        first = self.counters["connects"] == 1
        self._offline_since = None
        log.info("link: connected to %s%s, %d message(s) waiting", self.url,
                 " (first connect)" if first else offline, waiting)
        self._draining = (self.spool.durable_id, waiting, now) if waiting else None

    def _cb_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if self._lost is None:
                self._lost = disconnect_reason(flags, reason_code, keepalive_s=self.keepalive_s,
                                               net_error=self._net_error)
        except Exception:  # an exception here would end paho's loop call mid-packet
            log.exception("link on_disconnect failed")
            self._lost = "disconnected"

    def _cb_log(self, client, userdata, level, buf) -> None:
        if level == mqtt.MQTT_LOG_ERR and self._net_error is None:
            self._net_error = buf  # the first error is the cause; later ones are paho noticing the dead socket

    def _cb_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            entry = self._inflight.pop(mid, None)
            if entry is None:
                if self.channel is not None and self.channel.acknowledged(mid):  # a reply; else the state message
                    self._ack_stall_since = None  # acknowledgements flow (again)
                return
            self._ack_stall_since = None
            sid = entry[0]
            if reason_code is not None and getattr(reason_code, "is_failure", False):
                self.counters["refused"] += 1  # the broker will never take it (ACL): retrying would block the queue
                self._emit_refused(sid, str(reason_code))
            else:
                self.counters["acked"] += 1
            self._acked.append(sid)
        except Exception:
            log.exception("link on_publish failed")

    def _emit_refused(self, sid: int, reason: str) -> None:
        if reason not in self._refused_topics:
            self._refused_topics.add(reason)
            log.warning("link: the broker refused message %d: %s (check its ACL)", sid, reason)

    def _cb_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic == self.topics.state:
                self._check_state(bytes(msg.payload))
                return
            group = None
            name = self.topics.command_name(msg.topic)
            if name is None:
                parsed = GroupTopics.parse(msg.topic)
                if parsed is None or self.channel is None:
                    return
                group, name = parsed
                if self.groups is None or group not in self.groups:
                    self.channel.counters["group_ignored"] += 1  # left the group since: no reply, nothing runs
                    return
                self.channel.counters["group_commands"] += 1
            if self.channel is None:
                return
            props = getattr(msg, "properties", None)
            response = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            self.channel.offer(name, bytes(msg.payload), response, correlation, group)
        except Exception:
            log.exception("link on_message failed")

    def _check_state(self, payload: bytes) -> None:
        """A message on the board's own state topic: an older session's ``lost`` or ``offline`` is healed."""
        if self._connected and self.session is not None and presence.needs_heal(payload, self.session):
            self.counters["state_healed"] += 1
            log.info("link: the retained state was replaced by an older session's (%.80r); publishing online again",
                     payload)
            self._rebirth = True

    def _groups_now(self) -> tuple[str, ...]:
        return tuple(self.groups.current) if self.groups is not None else ()

    def _subscribe_groups(self, client: mqtt.Client) -> None:
        """Subscribes to the command topics of the groups in force, and unsubscribes from the ones left."""
        self._regroup = False
        want = frozenset(self._groups_now())
        gone, new = self._subscribed_groups - want, want - self._subscribed_groups
        if gone:
            client.unsubscribe([GroupTopics.cmd_filter(g) for g in sorted(gone)])
        for g in sorted(new):
            client.subscribe(GroupTopics.cmd_filter(g), qos=1)
        self._subscribed_groups = want

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:
                log.exception("link event listener failed on %s", kind)
