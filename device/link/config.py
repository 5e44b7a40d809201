"""``[link]``: the MQTT link, its durable spool, and command intake.

:meth:`LinkConfig.validate` holds the rules across keys: the broker URL, the TLS files it needs (read, so a
missing or unreadable file shows when the config is loaded, not when the link starts), the password file (read
as the link reads it: :func:`device.link.url.read_password`),
the topic prefix (the topic tree's own rule) and the order of the reconnect delays.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.configschema import setting
from device.link.errors import BrokerUrlError
from device.link.url import TlsFiles, parse_broker_url, tls_problem
from device.link.wire import Topics

# The key each TLS file is read from, for url.tls_problem's roles.
_TLS_KEYS = {"url": "link.broker", "ca": "link.ca_file", "cert": "link.cert_file", "key": "link.key_file"}


@dataclass(frozen=True)
class LinkConfig:
    """``[link]``: the MQTT link."""

    broker: str = setting(
        "", "Broker URL: mqtt://host:1883 or mqtts://host:8883 (mutual TLS); empty runs without a link.")
    protocol: str = setting("5", "MQTT protocol version.", choices=("5", "3.1.1"))
    prefix: str = setting("", "Topic prefix; empty means fieldnode/v1/<device id>.")
    ca_file: str = setting("", "CA certificate (PEM) that signed the broker's certificate; required for mqtts.")
    cert_file: str = setting("", "This board's client certificate (PEM), for mutual TLS.")
    key_file: str = setting("", "This board's client key (PEM), for mutual TLS.")
    username: str = setting("", "Username; empty sends none (with mutual TLS the certificate is the identity).")
    password_file: str = setting("", "File holding the password (never the password itself in the config); one "
                                     "trailing line ending is not part of it, spaces are.")
    keepalive_s: int = setting(30, "MQTT keepalive.", minimum=5, maximum=3600)
    backoff_min_s: float = setting(0.5, "First reconnect delay; doubles per failure, with jitter.",
                                   minimum=0.05, maximum=600)
    backoff_max_s: float = setting(60.0, "Reconnect delay cap.", minimum=0.1, maximum=3600)
    inflight: int = setting(64, "QoS 1 messages published and not yet acknowledged, at most.", minimum=1,
                            maximum=65535)
    ack_timeout_s: float = setting(
        30.0, "A result in flight this long without its PUBACK resets the connection (the spool replays it); until "
              "acknowledgements flow again the link reports itself unhealthy.", minimum=1, maximum=3600)
    spool_commit_ms: int = setting(
        2000, "Spool commits start as soon as a result arrives (group commit); acknowledged messages are deleted "
              "with the next commit, or alone after this long. A crash may replay what was acknowledged this long "
              "before it (consumers drop duplicates by id).", minimum=1, maximum=10000)
    spool_max_mb: float = setting(64.0, "Spool budget on disk (rows, indexes and WAL); past it telemetry, then the "
                                        "oldest results, are dropped.", minimum=0.1, maximum=65536)
    spool_max_age_h: float = setting(168.0, "Messages older than this are dropped.", minimum=0.01, maximum=87600)
    trust_dir: str = setting("/etc/fieldnode/trust", "Operator public keys (*.pub) allowed to sign privileged "
                                                     "commands.", pattern=r"(?s).*\S.*", expect="a directory path")
    envelope_max_ttl_s: float = setting(600.0, "Signed envelopes may expire at most this far ahead.",
                                        minimum=1, maximum=86400)
    envelope_skew_s: float = setting(30.0, "Clock skew allowed when checking envelope expiry.", minimum=0,
                                     maximum=3600)
    max_payload_kb: float = setting(16.0, "Largest command payload accepted.", minimum=0.5, maximum=1024)
    commands_burst: int = setting(20, "Commands accepted in a burst (rate limit).", minimum=1, maximum=10000)
    commands_per_s: float = setting(5.0, "Sustained commands per second (rate limit).", minimum=0.01,
                                    maximum=10000)
    dedupe_window_s: float = setting(300.0, "A repeated request_id within this window gets the cached reply.",
                                     minimum=0, maximum=86400)

    def validate(self) -> list[tuple[str, str]]:
        """The rules no single key can check; the config loader runs this after the per-key checks.

        It reads no file, so every tool can load a board's config whoever runs it; whether the files can be read
        is :meth:`file_problems`, which ``fieldnode run`` and ``fieldnode config check`` ask.

        Returns:
            ``(key path, message)`` per problem: a malformed broker URL; TLS files that do not fit the URL or are
            not paired (see :func:`device.link.url.tls_problem`); a prefix that is not a topic-tree prefix;
            ``backoff_min_s`` above ``backoff_max_s``.
        """
        problems = []
        url = self._url(problems)
        if url is not None:
            found = tls_problem(url, self.tls(), read_files=False)
            if found is not None:
                problems.append((_TLS_KEYS[found[0]], found[1]))
        if self.prefix:
            try:
                Topics(self.prefix)  # the topic tree's rule, not a second copy of it
            except BrokerUrlError as exc:
                problems.append(("link.prefix", str(exc)))
        if self.backoff_min_s > self.backoff_max_s:
            problems.append(("link.backoff_min_s", f"must not be above link.backoff_max_s "
                                                   f"({self.backoff_max_s:g}), got {self.backoff_min_s:g}"))
        return problems

    def file_problems(self) -> list[tuple[str, str]]:
        """Files the link needs that cannot be read by whoever asks: a TLS file missing, unreadable, not a
        regular file or an encrypted key, or the password file. Only with a broker (no broker, no link)."""
        problems: list[tuple[str, str]] = []
        url = self._url(problems)
        if url is None:
            return []
        found = tls_problem(url, self.tls())
        if found is not None:
            problems.append((_TLS_KEYS[found[0]], found[1]))
        if self.password_file:
            from device.link.url import PasswordFileError, read_password

            try:
                read_password(self.password_file)
            except PasswordFileError as exc:
                problems.append(("link.password_file", str(exc)))
        return problems

    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_file, self.cert_file, self.key_file)

    def _url(self, problems: list):
        if not self.broker:
            return None
        try:
            return parse_broker_url(self.broker)
        except BrokerUrlError as exc:
            problems.append(("link.broker", str(exc)))
            return None
