"""Every MQTT client fieldnode opens is made here: the board's link, the update delivery, ``fieldnode send`` (and
diag's broker check, which uses its session) and ``fieldnode repo serve``.

1. :func:`read_password` reads a password file, the one way every part reads it: exactly one trailing line ending
   (``\\n`` or ``\\r\\n``, which editors add) is not part of the password; everything else is, spaces included. A
   file that is not UTF-8, is larger than :data:`MAX_PASSWORD_BYTES` or is not a regular file is refused with a
   :class:`PasswordFileError` naming it.
2. :class:`Endpoint` is where and as whom to connect: the broker URL, its TLS files, username and password, and
   the protocol version. :meth:`Endpoint.from_link_config` builds it from ``[link]`` (reading the password file).
3. :func:`new_client` makes a paho 2 client (``CallbackAPIVersion.VERSION2``) for an endpoint, with TLS and the
   credentials applied, and :meth:`Client.open` connects it. Under MQTT 5 every CONNECT it sends (paho's own
   reconnects included) announces the client's **Maximum Packet Size**, so the broker drops a larger packet
   instead of sending it: no peer can make a fieldnode client read more than it asked for. MQTT 3.1.1 has no such
   property; callers that allow it check sizes themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.link.url import BrokerUrl, TlsFiles, apply_tls, check_tls, parse_broker_url, read_password

if TYPE_CHECKING:
    from paho.mqtt.reasoncodes import ReasonCode

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
MQTT_MAX_PACKET = 268_435_455  # the largest packet MQTT can express (the property's upper bound)


class LinkLogin(Protocol):
    """What :meth:`Endpoint.from_link_config` reads of a ``[link]`` section (:class:`device.link.config.LinkConfig`,
    which imports this module, so it is named by its shape rather than imported)."""

    @property
    def broker(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def ca_file(self) -> str: ...
    @property
    def cert_file(self) -> str: ...
    @property
    def key_file(self) -> str: ...
    @property
    def username(self) -> str: ...
    @property
    def password_file(self) -> str: ...


@dataclass(frozen=True)
class Endpoint:
    """A broker and how to log in to it.

    Attributes:
        url: The broker (``mqtt://`` or ``mqtts://``).
        tls: TLS files for ``mqtts://`` (checked against the URL when the endpoint is made).
        username: MQTT username, or None for none.
        password: Its password (from :func:`read_password`), or None for none.
        protocol: ``"5"`` or ``"3.1.1"``.
    """

    url: BrokerUrl
    tls: TlsFiles = TlsFiles()
    username: str | None = None
    password: str | None = None
    protocol: str = "5"

    def __post_init__(self) -> None:
        if isinstance(self.url, str):
            object.__setattr__(self, "url", parse_broker_url(self.url))
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be '5' or '3.1.1', got {self.protocol!r}")
        check_tls(self.url, self.tls)

    @property
    def v5(self) -> bool:
        """True for MQTT 5."""
        return self.protocol == "5"

    @classmethod
    def from_link_config(cls, link: LinkLogin, url: BrokerUrl | str | None = None) -> Endpoint:
        """The endpoint of a board's ``[link]`` section: its broker (or ``url``, same credentials), TLS files,
        username and password file.

        Raises:
            PasswordFileError: ``link.password_file`` cannot be used (see :func:`read_password`).
            BrokerUrlError: The URL is malformed or the TLS files do not fit it.
        """
        password = read_password(link.password_file) if link.password_file else None
        return cls(url if url is not None else link.broker, TlsFiles(link.ca_file, link.cert_file, link.key_file),
                   link.username or None, password, link.protocol)


class Client(mqtt.Client):
    """A paho client made by :func:`new_client`; :meth:`open` connects it to its endpoint.

    Attributes:
        endpoint: Where it connects.
        max_packet: The Maximum Packet Size it announces (MQTT 5).
    """

    endpoint: Endpoint
    max_packet: int

    def connect_properties(self) -> Properties | None:
        """The CONNECT properties: Maximum Packet Size under MQTT 5, None under 3.1.1."""
        if not self.endpoint.v5:
            return None
        props = Properties(PacketTypes.CONNECT)
        props.MaximumPacketSize = self.max_packet  # the broker drops larger packets instead of sending them
        return props

    def open(self, keepalive_s: int, *, asynchronous: bool = False) -> None:
        """Connects (blocking until the TCP and TLS handshakes are done, or in paho's thread with ``asynchronous``).

        The CONNECT carries :meth:`connect_properties` and (MQTT 5) Clean Start; paho keeps them for its own
        reconnects.

        Raises:
            OSError: (blocking only) Unreachable, refused, TLS failed, timed out; ``ValueError`` from paho for a
                bad host or port.
        """
        url = self.endpoint.url
        kw = {"clean_start": True, "properties": self.connect_properties()} if self.endpoint.v5 else {}
        if asynchronous:
            self.connect_async(url.host, url.port, keepalive_s, **kw)
        else:
            self.connect(url.host, url.port, keepalive_s, **kw)


def new_client(endpoint: Endpoint, client_id: str, *, max_packet: int,
               reconnect_on_failure: bool = False) -> Client:
    """A paho 2 client for ``endpoint``: VERSION2 callbacks, TLS and credentials applied, not yet connected.

    Args:
        endpoint: The broker and the login.
        client_id: The MQTT client id (passed by keyword to paho).
        max_packet: The largest packet this client accepts, announced on every MQTT 5 CONNECT.
        reconnect_on_failure: Let paho's loop reconnect by itself. fieldnode's long-lived clients make a fresh
            client per connection instead (paho #785), so this stays False except for a short-lived helper.

    Returns:
        The client; connect it with :meth:`Client.open`.

    Raises:
        ValueError: ``max_packet`` is not a packet size MQTT can express.
        BrokerUrlError: The TLS files do not load (see :func:`device.link.url.apply_tls`).
    """
    if isinstance(max_packet, bool) or not isinstance(max_packet, int) or not 1 <= max_packet <= MQTT_MAX_PACKET:
        raise ValueError(f"max_packet must be 1..{MQTT_MAX_PACKET} bytes, got {max_packet!r}")
    kw = {} if endpoint.v5 else {"clean_session": True}
    c = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=PROTOCOLS[endpoint.protocol],
               reconnect_on_failure=reconnect_on_failure, **kw)
    c.endpoint, c.max_packet = endpoint, max_packet
    if endpoint.url.tls:
        apply_tls(c, endpoint.tls)
    if endpoint.username is not None:
        c.username_pw_set(endpoint.username, endpoint.password)
    return c


def disconnect_reason(flags: mqtt.DisconnectFlags, reason_code: ReasonCode, *, keepalive_s: int,
                      net_error: str | None = None) -> str:
    """Why a connection ended, for people (paho's own words are often "Unspecified error").

    Args:
        flags: paho's ``DisconnectFlags`` from ``on_disconnect``.
        reason_code: Its reason code.
        keepalive_s: The connection's keepalive (named when it ran out).
        net_error: paho's first socket error of the connection (from ``on_log``), if any.

    Returns:
        The broker's DISCONNECT reason, a keepalive that ran out, ``"network error: ..."``, or ``"the broker
        closed the connection"``.
    """
    if getattr(flags, "is_disconnect_packet_from_server", False):
        return f"the broker disconnected this client ({reason_code})"
    if getattr(reason_code, "getName", lambda: "")() == "Keep alive timeout":
        return f"no answer from the broker within the keepalive ({keepalive_s} s)"
    if net_error:
        return f"network error: {net_error}"
    return "the broker closed the connection"
