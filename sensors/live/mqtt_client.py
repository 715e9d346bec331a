"""MQTT connection settings and a configured paho client, shared by the MQTT
source (edgefuse.sensors.live.mqtt_source) and the decision sink (runtime.sinks).

paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2``. Reconnects are paho's:
``loop_start()`` runs a network thread that reconnects with an exponential
delay from reconnect_min_s doubling up to reconnect_max_s (reset after each
successful CONNACK). Sessions start clean unless the caller asks for a
persistent one (``session_expiry_s`` > 0, the MQTT source's
``persistent_session``); whoever subscribes does it in on_connect, every time.

Every client says why it is not connected: ``client.status.last_error`` is a
short sentence naming the cause of the last failed attempt (unknown CA,
hostname mismatch, expired certificate, a TLS handshake against a plain port
or the reverse, connection refused, timeout, DNS, the broker's CONNACK
refusal), None once connected. The first failure of each kind is logged at
WARNING at once, then at most once a minute (runtime.ratelimit). paho hands
on_connect_fail no exception, so ``Client.reconnect`` catches it on the way.
"""
from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefuse.sensors.live.credentials import read_secret, secret_file
from edgefuse.runtime.core.errors import ConfigError
from edgefuse.runtime.core.ratelimit import WarnLimiter

log = logging.getLogger(__name__)

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# The role whose connection uses ``client_id`` unchanged; other roles append "-<role>".
PRIMARY_ROLE = "source"
MAX_CLIENT_ID = 128
MAX_SESSION_EXPIRY_S = 7 * 24 * 3600


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect. Secrets are specs (file path or credential:NAME).

    Client ids: one per connection, because a broker keeps one session per id
    and a second connection with the same id takes the first one over (two
    of ours would knock each other off in a loop). ``client_id`` unset: each
    connection is ``edgefuse-<role>-<hostname>-<pid>`` (role ``source`` or
    ``decisions``). ``client_id`` set: the MQTT sensor source connects as
    ``client_id`` itself (the id its persistent session is kept under) and
    every other connection appends its role, so the decision publisher is
    ``<client_id>-decisions``. Broker ACLs that match client ids must allow
    both. Two daemons on one broker need two different ``client_id`` values.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""          # see the class docstring: "" -> edgefuse-<role>-<host>-<pid>
    protocol: str = "5"          # "5" or "3.1.1"
    keepalive_s: int = 30
    username: str | None = None
    password_secret: str | None = None   # spec of the file holding the password
    tls_ca_file: str | None = None       # enables TLS; spec of the CA bundle
    tls_cert_file: str | None = None     # client certificate (mutual TLS)
    tls_key_file: str | None = None      # its private key (a spec too)
    reconnect_min_s: float = 0.5
    # Reconnect delays double from min to max; a short cap bounds what an outage costs
    # after the broker is back (a 30 s cap once took 12 s to notice a returned broker).
    reconnect_max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt protocol must be one of {sorted(PROTOCOLS)}, "
                              f"found {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt port must be 1..65535, found {self.port!r}")
        if not 5 <= self.keepalive_s <= 3600:
            raise ConfigError(f"mqtt keepalive_s must be 5..3600, found {self.keepalive_s!r}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s <= 3600:
            raise ConfigError("mqtt reconnect delays must satisfy 0 < reconnect_min_s <= "
                              f"reconnect_max_s <= 3600, found {self.reconnect_min_s!r}, "
                              f"{self.reconnect_max_s!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("mqtt tls_cert_file and tls_key_file go together; give both or neither")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ConfigError("mqtt client certificates need tls_ca_file to verify the broker")
        if self.password_secret is not None and self.username is None:
            raise ConfigError("mqtt password_secret needs a username")
        if len(self.client_id) > MAX_CLIENT_ID or not self.client_id.isprintable():
            raise ConfigError(f"mqtt client_id must be at most {MAX_CLIENT_ID} printable "
                              f"characters, found {self.client_id!r}")

    def resolved_client_id(self, role: str) -> str:
        """The id of the connection of ``role`` (see the class docstring)."""
        if not self.client_id:
            return f"edgefuse-{role}-{socket.gethostname()}-{os.getpid()}"
        return self.client_id if role == PRIMARY_ROLE else f"{self.client_id}-{role}"


def load_secrets(settings: MqttSettings) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context the settings name.

    ConfigError (one line, naming the key and the file) when a file is
    missing, or is not the PEM certificate / private key its key says.
    Called by make_client, and by the MQTT source before it starts its receiver
    process, so that a bad secret fails ``open()`` with the same error either way.
    """
    password = None
    if settings.username is not None and settings.password_secret is not None:
        password = read_secret(settings.password_secret)
    context = None
    if settings.tls_ca_file is not None:
        ca = secret_file(settings.tls_ca_file)
        try:
            context = ssl.create_default_context(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"[mqtt] tls_ca_file {ca} is not a PEM certificate: {_ssl_reason(exc)}; give "
                "the PEM file of the CA that signed the broker's certificate (a DER file "
                "converts with: openssl x509 -inform der -in FILE -out FILE.pem)") from None
        if settings.tls_cert_file is not None:
            _load_client_cert(context, secret_file(settings.tls_cert_file),
                              secret_file(settings.tls_key_file))
    return password, context


def _load_client_cert(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:  # the certificate alone first, so that an error names the right file
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise ConfigError(f"[mqtt] tls_cert_file {cert} is not a PEM certificate: "
                          f"{_ssl_reason(exc)}; give the client certificate in PEM") from None

    def no_passphrase() -> str:
        # OpenSSL would otherwise prompt on the terminal: a daemon must not wait for that.
        raise ConfigError(f"[mqtt] tls_key_file {key} is encrypted; a service cannot type a "
                          "passphrase: decrypt it (openssl pkey -in KEY -out KEY.plain) and "
                          "protect the file (chmod 600, or a systemd credential)")
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"[mqtt] tls_key_file {key} is not the private key of "
                              f"tls_cert_file {cert}; give the matching pair") from None
        raise ConfigError(f"[mqtt] tls_key_file {key} is not a PEM private key: "
                          f"{_ssl_reason(exc)}; give the client key in PEM") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """'no certificate or crl found' of '[X509: NO_...] no certificate or crl found (_ssl.c:1)'."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    text = text.split("] ", 1)[-1]
    return text.rsplit(" (_ssl.c:", 1)[0]


# --- why a connection attempt failed ---------------------------------------------
# X509_V_ERR_* codes meaning "nothing in tls_ca_file vouches for this certificate":
# 2/20 issuer not found, 21 leaf not verifiable, 18/19 self-signed (in chain), and 7,
# a bad signature, as when another CA of the same name is in the file.
_UNKNOWN_ISSUER = {2, 7, 18, 19, 20, 21}
_HANDSHAKE_TRANSPORT = {"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING",
                        "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                        "UNKNOWN_PROTOCOL", "RECORD_TOO_LARGE"}
_CLIENT_CERT_ALERTS = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
                       "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                       "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_ACCESS_DENIED"}


def describe_connect_error(exc: BaseException, settings: MqttSettings) -> tuple[str, str]:
    """(kind, sentence) for an exception of a connection attempt (socket, TLS, DNS)."""
    where = f"{settings.host}:{settings.port}"
    tls = settings.tls_ca_file is not None
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or _ssl_reason(exc)).rstrip(".")
        low = detail.lower()
        if "mismatch" in low:  # "Hostname mismatch" / "IP address mismatch"
            return "tls_hostname", (
                f"TLS hostname mismatch with {where}: certificate verify failed: {detail}; "
                "connect by a name the broker's certificate holds (subjectAltName) or "
                f"reissue it for {settings.host!r}")
        if "expired" in low:
            return "tls_expired", (
                f"TLS certificate expired: certificate verify failed for {where}: {detail}; "
                "renew the broker's certificate (or check this machine's clock)")
        if "not yet valid" in low:
            return "tls_not_yet_valid", (
                f"TLS certificate not yet valid: certificate verify failed for {where}: "
                f"{detail}; check this machine's clock")
        if exc.verify_code in _UNKNOWN_ISSUER:
            return "tls_unknown_ca", (
                f"TLS unknown CA: certificate verify failed for {where}: {detail}; the CA "
                f"in tls_ca_file {settings.tls_ca_file} did not sign the broker's certificate")
        return "tls_verify", f"TLS certificate verify failed for {where}: {detail}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or type(exc).__name__
        if reason in _HANDSHAKE_TRANSPORT or isinstance(exc, (ssl.SSLEOFError,
                                                              ssl.SSLZeroReturnError)):
            return "tls_handshake", (
                f"TLS handshake failed with {where} ({_ssl_reason(exc)}): it does not answer "
                "TLS; is it a plain MQTT port? Use the broker's TLS listener (often 8883)")
        if reason in _CLIENT_CERT_ALERTS:
            return "tls_client_cert", (
                f"TLS handshake failed: {where} refused our client certificate "
                f"({_ssl_reason(exc)}); set tls_cert_file/tls_key_file to a pair signed by a "
                "CA the broker trusts")
        return "tls_handshake", f"TLS handshake failed with {where}: {_ssl_reason(exc)}"
    if tls and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        # A TCP connect never sees a reset: the peer dropped our TLS ClientHello.
        return "tls_handshake", (
            f"TLS handshake failed: {where} reset the connection during the handshake; is "
            "it a plain MQTT port? Use the broker's TLS listener (often 8883)")
    if isinstance(exc, ConnectionRefusedError):
        return "refused", (f"connection refused by {where}: nothing listens there; is the "
                           "broker running and the port right?")
    if isinstance(exc, socket.gaierror):
        return "dns", (f"DNS failure: cannot resolve {settings.host!r} "
                       f"({exc.strerror or exc}); check the host name and the resolver")
    if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
        during = " during the TLS handshake" if "handshake" in str(exc) else ""
        return "timeout", (f"timed out connecting to {where}{during}; check the host, the "
                           "port and any firewall in between")
    if isinstance(exc, OSError):
        return "network", f"cannot connect to {where}: {exc.strerror or exc}"
    return "error", f"cannot connect to {where}: {type(exc).__name__}: {exc}"


def describe_refusal(reason_code: object, settings: MqttSettings,
                     client_id: str) -> tuple[str, str]:
    """(kind, sentence) for a CONNACK that refused us."""
    name = str(reason_code)
    value = getattr(reason_code, "value", None)
    where = f"{settings.host}:{settings.port}"
    if value in (0x86, 0x87, 0x8C) or name in ("Bad user name or password", "Not authorized"):
        who = f"user {settings.username!r}" if settings.username else "an anonymous client"
        return "bad_credentials", (
            f"the broker at {where} refused {who}: {name} (CONNACK); check username and "
            "password_secret, and the broker's password file and ACL")
    if value == 0x85 or name == "Client identifier not valid":
        return "client_id", (f"the broker at {where} refused client id {client_id!r}: {name} "
                             "(CONNACK); choose another [mqtt] client_id")
    if value == 0x84 or name == "Unsupported protocol version":
        return "protocol", (f"the broker at {where} does not speak MQTT {settings.protocol}: "
                            f"{name} (CONNACK); set protocol = \"3.1.1\"")
    return "refused_connack", f"the broker at {where} refused the connection: {name} (CONNACK)"


class ConnectionStatus:
    """What the connection attempts of one client said, for people.

    ``last_error``: the cause of the last failed attempt (or of a lost
    connection), None while connected. ``attempts_failed``: since the last
    success. Fed by ``Client.reconnect`` (exceptions) and the on_connect /
    on_disconnect wrappers installed by ``start()``, all on paho's network thread.
    """

    def __init__(self, settings: MqttSettings, role: str, client_id: str, *,
                 on_failure: Callable[[], None] | None = None,
                 logger: logging.Logger = log):
        self.settings = settings
        self.role = role
        self.client_id = client_id
        self.last_error: str | None = None
        self.attempts_failed = 0
        self._on_failure = on_failure
        self._answered = True   # the current attempt got a CONNACK or an exception
        self._connected = False
        self._stopped = False
        self.transport_error: str | None = None
        self._limiter = WarnLimiter(logger)

    def attempt(self) -> None:
        self._answered = self._stopped
        self.transport_error = None

    def transport_failed(self, text: str) -> None:
        """paho's own error line of this attempt (a TLS alert read after the handshake)."""
        self.transport_error = text

    def stopping(self) -> None:
        """Our own disconnect follows: whatever it interrupts is no failure."""
        self._stopped = self._answered = True

    def attempt_failed(self, exc: BaseException) -> None:
        self._failed(*describe_connect_error(exc, self.settings))

    def connack(self, reason_code: object) -> None:
        self._answered = True
        if getattr(reason_code, "is_failure", False):
            self._failed(*describe_refusal(reason_code, self.settings, self.client_id))
            return
        if self.attempts_failed:
            log.info("MQTT %s connected to %s:%d after %d failed attempt(s)", self.role,
                     self.settings.host, self.settings.port, self.attempts_failed)
        self.attempts_failed = 0
        self.last_error = None
        self._connected = True

    def disconnected(self, reason_code: object) -> None:
        if self._connected:
            self._connected = False
            if getattr(reason_code, "is_failure", False):
                self.last_error = (f"connection to {self.settings.host}:{self.settings.port} "
                                   f"lost: {reason_code}")
                if getattr(reason_code, "value", None) == 0x8E:  # Session taken over
                    self.last_error += (f"; another client connected with our id "
                                        f"{self.client_id!r}: give each gateway its own "
                                        "[mqtt] client_id")
            return
        if self._answered:
            return  # after a refused CONNACK or our own disconnect: already accounted for
        where = f"{self.settings.host}:{self.settings.port}"
        error = self.transport_error or ""
        if self.settings.tls_ca_file is None:
            hint = ("; if that port is a TLS listener, set tls_ca_file (a TLS port drops "
                    "plain MQTT at once)")
        elif "CERTIFICATE" in error.upper() or "ALERT" in error.upper():
            # TLS 1.3 sends the broker's verdict on our certificate after the handshake.
            self._failed("tls_client_cert", (
                f"TLS: {where} refused our client certificate after the handshake ({error}); "
                "set tls_cert_file/tls_key_file to a pair signed by a CA the broker trusts "
                "(its require_certificate is on)"))
            return
        else:
            hint = "; see the broker's log (client id, protocol version, limits)"
        self._failed("closed_before_connack",
                     f"{where} closed the connection before answering CONNECT "
                     f"({error or reason_code}){hint}")

    def _failed(self, kind: str, text: str) -> None:
        self._answered = True
        self._connected = False
        self.attempts_failed += 1
        self.last_error = text
        self._limiter.warn(kind, "MQTT %s (client id %r) cannot connect: %s; retrying "
                           "(backoff up to %.1f s)", self.role, self.client_id, text,
                           self.settings.reconnect_max_s)
        if self._on_failure is not None:
            self._on_failure()


class Client(mqtt.Client):
    """paho's client plus ``status`` (why the last connection attempt failed)."""

    def __init__(self, *args: object, status: ConnectionStatus, session_expiry_s: int = 0,
                 **kwargs: object):
        super().__init__(*args, **kwargs)
        self.status = status
        self.session_expiry_s = session_expiry_s

    def reconnect(self) -> mqtt.MQTTErrorCode:
        # paho's loop catches this OSError and calls on_connect_fail without it:
        # this is the one place that sees why the attempt failed.
        self.status.attempt()
        # An error read after the socket is up (a TLS alert) reaches only paho's log;
        # listen to it until CONNACK (not after: on_log formats a line per packet).
        self.on_log = self._log_until_connack
        try:
            return super().reconnect()
        except OSError as exc:
            self.status.attempt_failed(exc)
            raise

    def _log_until_connack(self, client, userdata, level, buf) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            self.status.transport_failed(buf)


def make_client(settings: MqttSettings, role: str, *, session_expiry_s: int = 0,
                on_failure: Callable[[], None] | None = None) -> Client:
    """A paho client with protocol, session, auth, TLS and reconnect delays set.

    session_expiry_s: 0 for a clean session; > 0 for a persistent one the broker
    keeps that long after a disconnect (MQTT 5; MQTT 3.1.1 has no expiry: the
    broker's own limit applies). on_failure: called (network thread) after each
    failed attempt, once ``client.status`` says why. The caller sets its
    callbacks, then calls ``start(client, settings)``.
    """
    if not 0 <= session_expiry_s <= MAX_SESSION_EXPIRY_S:
        raise ConfigError(f"session_expiry_s must be 0..{MAX_SESSION_EXPIRY_S}, found "
                          f"{session_expiry_s!r}")
    protocol = PROTOCOLS[settings.protocol]
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": session_expiry_s == 0}
    client_id = settings.resolved_client_id(role)
    password, context = load_secrets(settings)
    client = Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                    status=ConnectionStatus(settings, role, client_id, on_failure=on_failure),
                    session_expiry_s=session_expiry_s, **kwargs)
    if settings.username is not None:
        client.username_pw_set(settings.username, password)
    if context is not None:
        client.tls_set_context(context)
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
    return client


def start(client: Client, settings: MqttSettings) -> None:
    """Connect in the background: the network thread retries until the broker answers.

    Set on_connect / on_disconnect before calling this: it chains ``client.status``
    in front of them.
    """
    _chain_status(client)
    extra: dict = {}
    if settings.protocol == "5":
        # Not paho's default MQTT_CLEAN_START_FIRST_ONLY: a persistent session must
        # survive our own restarts too, and a clean one must be clean every time.
        extra["clean_start"] = client.session_expiry_s == 0
        if client.session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = client.session_expiry_s
            extra["properties"] = props
    client.connect_async(settings.host, settings.port, settings.keepalive_s, **extra)
    client.loop_start()


def _chain_status(client: Client) -> None:
    status = client.status
    user_connect, user_disconnect = client.on_connect, client.on_disconnect

    def on_connect(c, userdata, flags, reason_code, properties) -> None:
        c.on_log = None
        status.connack(reason_code)
        if user_connect is not None:
            user_connect(c, userdata, flags, reason_code, properties)

    def on_disconnect(c, userdata, flags, reason_code, properties) -> None:
        status.disconnected(reason_code)
        if user_disconnect is not None:
            user_disconnect(c, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect


def stop(client: Client) -> None:
    """Disconnect and join the network thread."""
    client.status.stopping()
    client.disconnect()
    client.loop_stop()
