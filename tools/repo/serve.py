"""``fieldnode repo serve DIR --broker URL``: answers the boards' MQTT chunk requests for a repository.

The protocol is in :mod:`device.update.mqttfetch`. The server subscribes with the MQTT 5 shared subscription
``$share/<group>/<root>/req``: every ``serve`` process of the same group (on this machine or others, each with a
copy of the public directories) gets a share of the requests, and the broker moves the share of a server that
goes away to the others.

What it serves and how:

* Only ``metadata/``, ``targets/`` and ``grants/`` of ``DIR``; a path with ``..``, an absolute path, or one whose
  real location (symbolic links resolved) leaves its public directory is refused (400, or 404 when a link points
  out), so ``keys/`` and ``staged/`` stay private whatever a request says.
* One response per request, at most the requested length (capped at :data:`MAX_CHUNK`), read with a seek: a
  large target is never held in memory.
* Its client comes from :mod:`device.link.mqttclient` and announces a Maximum Packet Size of
  :data:`REQUEST_MAX_PACKET` (a request is a short JSON object), so no peer makes it read a large packet.
* Answers go only to response topics under ``<root>/resp/``: a request cannot make the server publish repository
  bytes onto another topic (a board's command topic, say). Requests without a response topic or correlation data
  are dropped.

It runs until SIGTERM or SIGINT, logs one line of counts per ``--stats-s`` seconds (default 60) on stderr, and
returns the totals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections import Counter

from device.link.url import TlsFiles, check_tls, parse_broker_url
from device.update.errors import RepositoryError
from device.update.mqttfetch import CHUNK, DEFAULT_ROOT, MAX_CHUNK, check_path

DEFAULT_GROUP = "fieldnode-repo"
REQUEST_MAX_PACKET = 64 * 1024  # a request: a path, two numbers, a response topic and correlation data


def _say(text: str) -> None:
    print(f"repo serve: {text}", file=sys.stderr, flush=True)


def read_chunk(repo_dir: str, path: object, offset: object, length: object) -> tuple[int, int, bytes]:
    """The answer to one request: ``(status, size, payload)`` (see :mod:`device.update.mqttfetch`).

    Args:
        repo_dir: The repository directory. path, offset, length: As the request says (untrusted).
    """
    problem = check_path(path)
    if problem is not None:
        return 400, -1, problem.encode()
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return 400, -1, b"offset: expected a non-negative integer"
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        return 400, -1, b"length: expected a positive integer"
    top = os.path.realpath(os.path.join(repo_dir, path.split("/")[0]))
    real = os.path.realpath(os.path.join(repo_dir, *path.split("/")))
    if not real.startswith(top + os.sep):  # a symbolic link out of the public directory
        return 404, -1, f"{path}: no such file".encode()
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO must not hang the server
    except OSError:
        return 404, -1, f"{path}: no such file".encode()
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            return 404, -1, f"{path}: no such file".encode()
        if offset > st.st_size:
            return 416, st.st_size, f"{path}: offset {offset} is past its end ({st.st_size} bytes)".encode()
        fh.seek(offset)
        return 200, st.st_size, fh.read(min(length, MAX_CHUNK))


class Server:
    """One ``repo serve`` process: a paho client on the shared subscription, answering in its network thread.

    Args:
        repo_dir: The repository (checked to be one). broker_url: ``mqtt(s)://HOST[:PORT]``. tls: Its TLS files.
        group: The shared-subscription group. root: The topic root. client_id: MQTT client id (default
            ``repo-serve-<host>-<pid>``).

    Raises:
        RepositoryError: ``repo_dir`` is not a repository, or the broker URL or TLS files are wrong.
    """

    def __init__(self, repo_dir: str, broker_url: str, *, tls: TlsFiles | None = None, group: str = DEFAULT_GROUP,
                 root: str = DEFAULT_ROOT, client_id: str = "") -> None:
        from device.link.errors import BrokerUrlError
        from tools.repo.meta import Repository

        Repository(repo_dir)  # a RepositoryError (repository_error) for a directory that is not one
        self.repo_dir = os.path.abspath(repo_dir)
        self.tls = tls or TlsFiles()
        try:
            self.url = parse_broker_url(broker_url)
            check_tls(self.url, self.tls)
        except BrokerUrlError as exc:
            raise RepositoryError(f"serve: {exc}") from exc
        if not group or any(c in group for c in "+#/$\x00"):
            raise RepositoryError(f"serve: --group {group!r} must be a non-empty name without '+', '#', '/' or '$'")
        if not root.strip("/") or any(c in root for c in "+#\x00") or root.startswith("$"):
            raise RepositoryError(f"serve: --root {root!r} must be a plain topic (no '+', '#' or leading '$')")
        self.root = root.strip("/")
        self.group = group
        self.subscription = f"$share/{group}/{self.root}/req"
        self.client_id = client_id or f"repo-serve-{socket.gethostname()}-{os.getpid()}"
        self.counts: Counter = Counter()
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = None

    def start(self) -> None:
        """Connects (paho's thread reconnects and re-subscribes after an outage)."""
        from device.link.errors import BrokerUrlError
        from device.link.mqttclient import Endpoint, new_client

        try:
            # A server, not a board: paho's own reconnect keeps it subscribed after an outage.
            c = new_client(Endpoint(self.url, self.tls), self.client_id, max_packet=REQUEST_MAX_PACKET,
                           reconnect_on_failure=True)
        except BrokerUrlError as exc:
            raise RepositoryError(f"serve: {exc}") from exc
        c.reconnect_delay_set(0.2, 10)
        c.on_connect, c.on_subscribe, c.on_message = self._on_connect, self._on_subscribe, self._on_message
        c.on_disconnect = self._on_disconnect
        self._client = c
        c.open(30, asynchronous=True)
        c.loop_start()

    def stop(self) -> None:
        """Disconnects and stops paho's thread."""
        c, self._client = self._client, None  # first: a clean stop is not a lost link
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the shared subscription is in place."""
        return self._subscribed.wait(timeout)

    # Callbacks run in paho's thread; an exception there would kill it, so each one is contained.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            _say(f"broker {self.url} refused the connection: {reason_code}")
            return
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        if reason_code_list and not reason_code_list[0].is_failure:
            _say(f"serving {self.repo_dir} on {self.url} as {self.subscription}")
            self._subscribed.set()
        else:
            _say(f"broker {self.url} refused the subscription {self.subscription}: {reason_code_list}")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._subscribed.clear()
        if self._client is not None:
            _say(f"link to {self.url} lost ({reason_code}); reconnecting")

    def _on_message(self, client, userdata, message) -> None:
        try:
            self._answer(client, message)
        except Exception as exc:  # never kill paho's thread; the board times out and asks again
            with self._lock:
                self.counts["error"] += 1
            _say(f"request on {message.topic} failed: {type(exc).__name__}: {exc}")

    def _answer(self, client, message) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = getattr(message, "properties", None)
        topic = getattr(props, "ResponseTopic", "") or ""
        cid = getattr(props, "CorrelationData", b"") or b""
        if not topic.startswith(self.root + "/resp/") or any(c in topic for c in "+#\x00") or not cid:
            with self._lock:
                self.counts["dropped"] += 1
            return
        try:
            req = json.loads(bytes(message.payload))
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
            status, size, data = read_chunk(self.repo_dir, req.get("path"), req.get("offset", 0),
                                            req.get("length", CHUNK))
        except ValueError as exc:  # JSON and UTF-8 errors
            status, size, data = 400, -1, f"request: {exc}".encode()
        out = Properties(PacketTypes.PUBLISH)
        out.CorrelationData = bytes(cid)
        out.UserProperty = [("status", str(status)), ("size", str(size))]
        client.publish(topic, data, qos=1, properties=out)
        with self._lock:
            self.counts[str(status)] += 1
            self.bytes_sent += len(data) if status == 200 else 0

    def totals(self) -> dict:
        """``{"requests": N, "status": {"200": n, ...}, "bytes": B}`` so far."""
        with self._lock:
            status = dict(self.counts)
            return {"requests": sum(v for k, v in status.items() if k.isdigit()), "status": status,
                    "bytes": self.bytes_sent}


def serve(repo_dir: str, broker_url: str, *, tls: TlsFiles | None = None, group: str = DEFAULT_GROUP,
          root: str = DEFAULT_ROOT, stats_s: float = 60.0, stop: threading.Event | None = None) -> dict:
    """Runs a :class:`Server` until SIGTERM/SIGINT (or ``stop`` is set); logs counts every ``stats_s`` seconds.

    Returns:
        The totals (:meth:`Server.totals`) plus ``subscription`` and ``broker``.

    Raises:
        RepositoryError: As :class:`Server`.
    """
    server = Server(repo_dir, broker_url, tls=tls, group=group, root=root)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        next_log = time.monotonic() + stats_s
        while not stop.wait(max(0.0, min(1.0, next_log - time.monotonic()))):
            if time.monotonic() >= next_log:
                t = server.totals()
                _say(f"{t['requests']} request(s) {json.dumps(t['status'], sort_keys=True)}, {t['bytes']} bytes")
                next_log += stats_s
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {**server.totals(), "subscription": server.subscription, "broker": str(server.url)}
