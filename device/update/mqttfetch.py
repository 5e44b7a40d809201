"""Update delivery over MQTT: the board asks for a repository file in chunks, ``fieldnode repo serve`` answers.

The protocol (MQTT 5 request/response, QoS 1 both ways):

* A **request** is a PUBLISH to ``<root>/req`` (default root :data:`DEFAULT_ROOT`) whose payload is the JSON
  object ``{"path": "metadata/timestamp.json", "offset": N, "length": L}`` (``path`` relative to the repository,
  under ``metadata/``, ``targets/`` or ``grants/``), with the properties Response Topic
  (``<root>/resp/<identity>/<nonce>``, this board's own) and Correlation Data (a fresh id per request).
* The **response** goes to that topic with the same Correlation Data. Its payload is the raw bytes
  ``[offset, offset + L)`` of the file (shorter at its end, empty at it), and two user properties say what they
  are: ``status`` (``200``; ``404`` no such file; ``400`` a malformed request or a path outside the repository's
  public directories; ``416`` an offset past the end) and ``size`` (the file's total length, with 200 and 416).
  An error response's payload is a short UTF-8 reason.

Every ``repo serve`` process subscribes with the shared subscription ``$share/<group>/<root>/req``, so the broker
hands each request to one of them: several servers on several machines share a fleet's load, and a server that
goes away leaves the others answering.

Which side checks what: the bytes that arrive are only bytes. Metadata goes through python-tuf
(:class:`MqttFetcher` is its fetcher; a missing file is ``DownloadHTTPError(..., 404)``, which is what ends the
root walk), targets through :func:`device.update.fetch.download_target` (:class:`MqttSource` is its
``RangeSource``: resumable by chunk offset, capped, hashed, verified). A broker restart loses the requests in
flight: :class:`MqttTransport` raises :class:`MqttTransportError` (a ``ConnectionError``) and reconnects as the
board's link does (a fresh client per connection after a backoff with jitter, sleeping on the clock seam); the
fetcher and the source ask again from the same offset once the link is back (``retries`` times), and past that the
download resumes from the partial file as after any dropped connection.

The board announces a Maximum Packet Size on every connection (the transport's ``max_chunk`` plus headroom), so a
hostile or broken server's oversized answer is dropped by the broker and never read: the request goes unanswered
and fails like a lost one, within the transport's timeout.

A board names an MQTT repository ``mqtt://HOST[:PORT]/<root>`` (or ``mqtts://``): see :func:`transport_for`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import threading
from typing import Iterator
from urllib.parse import unquote

from paho.mqtt.client import MQTT_LOG_ERR
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from device.clock import SYSTEM_CLOCK, backoff_delay
from device.link.mqttclient import Endpoint, disconnect_reason, new_client
from device.link.url import read_password
from device.link.url import BrokerUrl, TlsFiles, parse_broker_url
from device.threads import Thread

log = logging.getLogger(__name__)

DEFAULT_ROOT = "fieldnode/v1/repo"
CHUNK = 64 * 1024
MAX_CHUNK = 1024 * 1024  # the server's cap on one response, whatever a request asks
# Room in an answer besides its bytes: fixed header, the response topic (added per transport), correlation data and
# the status/size user properties.
RESPONSE_HEADROOM = 1024
PUBLIC_DIRS = ("metadata", "targets", "grants")
SCHEMES = ("mqtt", "mqtts")


class MqttTransportError(ConnectionError):
    """A request got no answer: the broker is unreachable, the link dropped while waiting, or no server
    answered in time. Retriable: ask again (from the same offset) once the link is back."""


def check_path(path: object) -> str | None:
    """Why ``path`` is not a repository file a board may ask for, or None (shared by board and server).

    A path is ``/``-separated and relative, its first part one of :data:`PUBLIC_DIRS`, with no empty, ``.`` or
    ``..`` part, no backslash and no control character.
    """
    if not isinstance(path, str) or not path:
        return "path: expected a non-empty string"
    if len(path) > 1024:
        return "path: longer than 1024 characters"
    if any(ord(c) < 0x20 or c in "\\\x7f" for c in path):
        return "path: control characters or a backslash"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"path {path!r}: absolute, or with an empty, '.' or '..' part"
    if parts[0] not in PUBLIC_DIRS or len(parts) < 2:
        return f"path {path!r}: not under {', '.join(d + '/' for d in PUBLIC_DIRS)}"
    return None


def split_repository_url(url: str) -> tuple[BrokerUrl, str]:
    """``mqtt(s)://HOST[:PORT][/<root>]`` as ``(broker URL, topic root)``; the root defaults to
    :data:`DEFAULT_ROOT`.

    Raises:
        device.link.errors.BrokerUrlError: Not an MQTT URL, or a malformed broker part or root (wildcards).
    """
    from device.link.errors import BrokerUrlError

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise BrokerUrlError(f"repository URL {url!r}: expected mqtt://HOST[:PORT]/<topic root> or mqtts://...")
    authority, slash, root = rest.partition("/")
    root = unquote(root).strip("/") or DEFAULT_ROOT
    if any(c in root for c in "+#\x00") or root.startswith("$") or "//" in root:
        raise BrokerUrlError(f"repository URL {url!r}: topic root {root!r} must be a plain topic (no '+', '#', "
                             f"'$' or empty level)")
    return parse_broker_url(f"{scheme}://{authority}"), root


class MqttTransport:
    """One board-side MQTT connection that asks repository files in chunks (see the module docstring).

    Its network thread (started by :meth:`start`, or on first use) connects, subscribes to the response topic and
    waits; when the connection drops (or never comes up) the client is discarded and a fresh one is made after an
    exponential backoff with jitter, as the board's link does (a fresh client per connection: paho #785). Deadlines
    and the backoff's sleeps go through ``clock`` (:mod:`device.clock`). Every CONNECT announces Maximum Packet
    Size :attr:`max_packet` (``max_chunk`` plus headroom): the broker drops a larger answer instead of sending it,
    so a hostile server cannot make the board read more than it asked for; that request goes unanswered and fails
    as any lost request does.

    Args:
        broker_url: ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.
        tls: TLS files for ``mqtts://``.
        username: MQTT username (empty: none). password: Its password (:func:`device.link.url.read_password`).
        root: The topic root the servers listen under.
        identity: Names this board's response topics (``<root>/resp/<identity>/<nonce>``): with a broker ACL, the
            board's certificate identity, so ``pattern read <root>/resp/%u/#`` lets it read its own answers only.
        client_id: MQTT client id (default ``<identity>-repo-<random>``).
        timeout_s: Longest wait for the link and for each answer.
        keepalive_s: MQTT keepalive. reconnect: ``(min, max)`` seconds of the reconnect backoff.
        history: How many recent ``(path, offset)`` requests :attr:`history` keeps (for diagnostics).
        max_chunk: The most bytes one answer may carry; a longer request is shortened to it.
        clock: Time source of the deadlines and the sleeps. rng: Randomness of the backoff's jitter.
    """

    def __init__(self, broker_url: str, *, tls: TlsFiles | None = None, username: str = "",
                 password: str | None = None, root: str = DEFAULT_ROOT, identity: str = "board", client_id: str = "",
                 timeout_s: float = 30.0, keepalive_s: int = 30, reconnect: tuple = (0.2, 10.0), history: int = 256,
                 max_chunk: int = CHUNK, clock=SYSTEM_CLOCK, rng: random.Random | None = None) -> None:
        self.url = parse_broker_url(broker_url)
        self.tls = tls or TlsFiles()
        self.endpoint = Endpoint(self.url, self.tls, username or None, password if username else None)
        self.root = root.strip("/")
        nonce = os.urandom(6).hex()
        self.client_id = client_id or f"{identity}-repo-{nonce}"
        self.response_topic = f"{self.root}/resp/{identity}/{nonce}"
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1:
            raise ValueError(f"max_chunk must be a positive number of bytes, got {max_chunk!r}")
        self.max_chunk = max_chunk
        self.max_packet = max_chunk + RESPONSE_HEADROOM + len(self.response_topic.encode())
        self.history: collections.deque = collections.deque(maxlen=history)
        self.clock = clock
        self.connects = 0  # connections that came up, each with a fresh client
        self.answers = 0  # messages the broker delivered on the response topic (matched to a request or not)
        self._reconnect = reconnect
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._ready = False  # connected and subscribed to the response topic
        self._generation = 0  # bumped on every disconnect: a request waiting across it is lost
        self._pending: dict = {}
        self._unheard: set = set()  # mids the broker acknowledged with "no matching subscribers"
        self._client = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._net_error: str | None = None
        self._came_up = False  # this connection got as far as its subscription
        self._ids = 0

    # -- connection ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the network thread (idempotent); the first connection may still be under way when it returns."""
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = Thread(target=self._run, name="update-mqtt", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Disconnects and stops the network thread (safe to call twice); waiting requests fail."""
        with self._cond:
            thread, self._thread = self._thread, None
            self._closing = True
            self._ready = False
            self._generation += 1
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(30.0)

    @property
    def client(self):
        """The paho client of the current connection (a new one after each reconnect), or None."""
        return self._client

    @property
    def ready(self) -> bool:
        """Connected and subscribed to the response topic."""
        return self._ready

    def wait_ready(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for :attr:`ready` (starting the transport); returns it."""
        self.start()
        with self._cond:
            return self._cond.wait_for(lambda: self._ready, timeout)

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        failures = 0
        while not self._closing:
            connected = self._connect()
            if connected is None:
                failures += 1
            else:
                client, generation = connected
                with self._cond:  # until this connection ends, or close()
                    self._cond.wait_for(lambda: self._closing or self._generation != generation)
                    served = self._came_up
                self._drop(client)
                failures = 1 if served else failures + 1  # a refused login backs off like an unreachable broker
            if not self._closing:
                self._pause(backoff_delay(failures - 1, *self._reconnect, self._rng))

    def _connect(self):
        """``(client, generation)``: a fresh client, connecting in paho's thread; None when the attempt failed."""
        try:
            c = new_client(self.endpoint, self.client_id, max_packet=self.max_packet)
            c.on_connect, c.on_disconnect, c.on_subscribe = self._on_connect, self._on_disconnect, self._on_subscribe
            c.on_message, c.on_publish, c.on_log = self._on_message, self._on_publish, self._on_log
            self._net_error = None
            with self._cond:
                generation, self._client, self._came_up = self._generation, c, False
            c.open(self.keepalive_s)  # TCP and TLS handshakes here; the CONNACK arrives in paho's thread
            c.loop_start()
        except Exception as exc:  # OSError, ssl.SSLError, a TLS file that no longer loads
            with self._cond:
                self._client = None
            log.warning("repository broker %s: cannot connect (%s: %s); retrying", self.url, type(exc).__name__, exc)
            return None
        return c, generation

    def _drop(self, client) -> None:
        """Ends one connection: a clean DISCONNECT when closing, then paho's thread stopped."""
        with self._cond:
            self._client = None
            self._ready = False
        try:
            client.disconnect()
        except Exception:  # already gone
            pass
        client.loop_stop()

    def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds`` on the clock, in short steps so that :meth:`close` need not wait for it."""
        end = self.clock.monotonic() + seconds
        while not self._closing:
            left = end - self.clock.monotonic()
            if left <= 0:
                return
            self.clock.sleep(min(left, 0.1))

    # Callbacks run in paho's thread: they only record and notify (an exception there would kill the thread).
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("repository broker %s refused the connection: %s", self.url, reason_code)
            self._lost(client)
            return
        self.connects += 1
        client.subscribe(self.response_topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        ok = bool(reason_code_list) and not reason_code_list[0].is_failure
        if not ok:
            log.warning("repository broker %s refused the subscription to %s: %s", self.url, self.response_topic,
                        reason_code_list)
        with self._cond:
            if client is self._client:
                self._ready = ok
                self._came_up = self._came_up or ok
                self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._closing:
            log.info("repository broker %s: %s; reconnecting", self.url,
                     disconnect_reason(flags, reason_code, keepalive_s=self.keepalive_s, net_error=self._net_error))
        self._lost(client)

    def _lost(self, client) -> None:
        with self._cond:
            if client is self._client or self._client is None:
                self._ready = False
                self._generation += 1
                self._cond.notify_all()

    def _on_log(self, client, userdata, level, buf) -> None:
        if level == MQTT_LOG_ERR and self._net_error is None:
            self._net_error = buf

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code == 16:  # MQTT 5 PUBACK "No matching subscribers": no server listens, fail fast
            with self._cond:
                self._unheard.add(mid)
                self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        self.answers += 1
        props = getattr(message, "properties", None)
        cid = bytes(getattr(props, "CorrelationData", b"") or b"")
        with self._cond:
            if cid in self._pending:
                self._pending[cid] = (props, bytes(message.payload))
                self._cond.notify_all()

    # -- requests -----------------------------------------------------------------------------------------

    def request(self, path: str, offset: int = 0, length: int = CHUNK) -> tuple[int, int, bytes]:
        """Asks for ``length`` bytes (at most ``max_chunk``) of the repository file ``path`` from ``offset``.

        Returns:
            ``(status, size, data)``: the server's status (200, 400, 404, 416), the file's total length (-1 when
            not known) and the bytes (an error's reason for a status other than 200).

        Raises:
            MqttTransportError: No link within ``timeout_s``, the link dropped while waiting, or no answer in time
                (an answer larger than :attr:`max_packet` is dropped by the broker, so it never arrives either).
            ValueError: ``path`` is not one a server would answer (:func:`check_path`).
        """
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        problem = check_path(path)
        if problem is not None:
            raise ValueError(problem)
        self.start()
        deadline = self.clock.monotonic() + self.timeout_s

        def left() -> float:
            return max(0.0, deadline - self.clock.monotonic())

        with self._cond:
            if not self._cond.wait_for(lambda: self._ready, left()):
                raise MqttTransportError(f"no link to the repository broker {self.url} within {self.timeout_s:g} s")
            self._ids += 1
            cid = f"{self._ids}-{os.urandom(4).hex()}".encode()
            self._pending[cid] = None
            generation, client = self._generation, self._client
        self.history.append((path, offset))
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.response_topic
        props.CorrelationData = cid
        body = json.dumps({"path": path, "offset": int(offset), "length": min(int(length), self.max_chunk)}).encode()
        mid = -1
        try:
            mid = client.publish(f"{self.root}/req", body, qos=1, properties=props).mid
            with self._cond:
                self._cond.wait_for(lambda: self._pending.get(cid) is not None or self._generation != generation
                                    or mid in self._unheard, left())
                answer = self._pending.get(cid)
                unheard = mid in self._unheard
        finally:
            with self._cond:
                self._pending.pop(cid, None)
                self._unheard.discard(mid)
        if answer is None:
            why = ("no repository server listens" if unheard else "the link dropped"
                   if self._generation != generation else
                   f"no answer in {self.timeout_s:g} s (an answer over this board's limit of {self.max_packet} "
                   f"bytes is dropped by the broker)")
            raise MqttTransportError(f"{path} from byte {offset}: {why} (repository broker {self.url})")
        rprops, data = answer
        user = dict(getattr(rprops, "UserProperty", None) or [])
        try:
            status, size = int(user.get("status", "")), int(user.get("size", "-1"))
        except ValueError:
            raise MqttTransportError(f"{path}: an answer without a numeric status/size ({user})") from None
        return status, size, data


def _chunks(transport: MqttTransport, path: str, offset: int, chunk: int, retries: int) -> Iterator[bytes]:
    """The bytes of ``path`` from ``offset`` to its end, one request per chunk; a lost request is asked again
    from the same offset up to ``retries`` times in a row; 404/403 become ``DownloadHTTPError``."""
    failures = 0
    while True:
        try:
            status, size, data = transport.request(path, offset, chunk)
        except MqttTransportError as exc:
            failures += 1
            if failures > retries:
                raise
            log.info("%s; asking again from byte %d", exc, offset)
            transport.clock.sleep(min(2.0, 0.25 * failures))  # a server re-subscribing after a broker restart
            continue
        failures = 0
        if status == 416:  # nothing past the offset: the caller checks the length
            return
        if status != 200:
            reason = data.decode("utf-8", "replace")[:200]
            raise DownloadHTTPError(f"{path}: the repository server answered {status} ({reason})", status)
        if data:
            yield data
            offset += len(data)
        if not data or (size >= 0 and offset >= size):
            return


class MqttFetcher(FetcherInterface):
    """python-tuf's fetcher for metadata over MQTT (a missing file is ``DownloadHTTPError(..., 404)``).

    Args:
        transport: The :class:`MqttTransport`. chunk_size: Bytes per request. retries: Requests lost to the
            link asked again in a row before giving up.
    """

    def __init__(self, transport: MqttTransport, chunk_size: int = CHUNK, retries: int = 3) -> None:
        self.transport = transport
        self.chunk_size = chunk_size
        self.retries = retries

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = repository_path(url, self.transport.root)
        return _chunks(self.transport, path, 0, self.chunk_size, self.retries)


class MqttSource:
    """A :class:`~device.update.fetch.RangeSource` over MQTT: targets and grants from an offset, in chunks.

    Args:
        transport: The :class:`MqttTransport`. chunk_size: Bytes per request. retries: As :class:`MqttFetcher`.
    """

    def __init__(self, transport: MqttTransport, chunk_size: int = CHUNK, retries: int = 3) -> None:
        self.transport = transport
        self.chunk_size = chunk_size
        self.retries = retries

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        path = repository_path(url, self.transport.root)
        return _chunks(self.transport, path, offset, self.chunk_size, self.retries)


def repository_path(url: str, root: str) -> str:
    """The repository-relative path a URL names: ``mqtt(s)://HOST[:PORT]/<root>/<path>`` or a bare ``<path>``.

    Raises:
        DownloadHTTPError: (404) A URL under another topic root, or a path a server would refuse.
    """
    text = url
    if "://" in url:
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in SCHEMES:
            raise DownloadHTTPError(f"{url}: not an mqtt:// or mqtts:// URL", 404)
        text = unquote(rest.partition("/")[2])
        prefix = root.strip("/") + "/"
        if not text.startswith(prefix):
            raise DownloadHTTPError(f"{url}: not under the repository's topic root {root!r}", 404)
        text = text[len(prefix):]
    problem = check_path(text)
    if problem is not None:
        raise DownloadHTTPError(f"{url}: {problem}", 404)
    return text


def transport_for(url: str, cfg=None, *, identity: str = "", timeout_s: float | None = None) -> MqttTransport:
    """The :class:`MqttTransport` for an ``update.repository`` of the form ``mqtt(s)://HOST[:PORT]/<root>``.

    The TLS files, username and password file come from the board's ``[link]`` section (the same broker
    credentials as the link); the identity (response topics) is the board's device id.

    Args:
        url: The repository URL. cfg: The board's configuration (None: no TLS files, no credentials).
        identity: Overrides the device id. timeout_s: Overrides ``update.timeout_s``.

    Raises:
        device.link.errors.BrokerUrlError: A malformed URL, TLS files that do not fit it, a password file that cannot
            be used (:class:`device.link.url.PasswordFileError`).
    """
    broker, root = split_repository_url(url)
    tls, username, password = TlsFiles(), "", None
    if cfg is not None:
        link = cfg.link
        tls = TlsFiles(link.ca_file, link.cert_file, link.key_file)
        username = link.username
        if link.password_file:
            password = read_password(link.password_file)  # as the link reads it (a PasswordFileError otherwise)
        if not identity:
            from device import config as config_mod

            identity = config_mod.device_id(cfg)
        if timeout_s is None:
            timeout_s = cfg.update.timeout_s
    return MqttTransport(str(broker), tls=tls, username=username, password=password, root=root,
                         identity=identity or "board", timeout_s=timeout_s or 30.0)
