"""MQTT connection settings and a configured paho client, shared by the MQTT
source (edgefuse.sensors.mqtt_source) and the decision sink (runtime.sinks).

paho-mqtt 2.x with ``CallbackAPIVersion.VERSION2``. Reconnects are paho's:
``loop_start()`` runs a network thread that reconnects with an exponential
delay from reconnect_min_s doubling up to reconnect_max_s (reset after each
successful CONNACK). Sessions start clean, so whoever subscribes must do it
in on_connect, every time.
"""
from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edgefuse.runtime.credentials import read_secret, secret_file
from edgefuse.runtime.errors import ConfigError

PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


@dataclass(frozen=True)
class MqttSettings:
    """Where and how to connect. Secrets are specs (file path or credential:NAME)."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""          # "" -> edgefuse-<role>-<hostname>-<pid>
    protocol: str = "5"          # "5" or "3.1.1"
    keepalive_s: int = 30
    username: str | None = None
    password_secret: str | None = None   # spec of the file holding the password
    tls_ca_file: str | None = None       # enables TLS; spec of the CA bundle
    tls_cert_file: str | None = None     # client certificate (mutual TLS)
    tls_key_file: str | None = None      # its private key (a spec too)
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

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

    def resolved_client_id(self, role: str) -> str:
        return self.client_id or f"edgefuse-{role}-{socket.gethostname()}-{os.getpid()}"


def load_secrets(settings: MqttSettings) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context the settings name; ConfigError when a file is missing.

    Called by make_client, and by the MQTT source before it starts its receiver
    process, so that a bad secret fails ``open()`` with the same error either way.
    """
    password = None
    if settings.username is not None and settings.password_secret is not None:
        password = read_secret(settings.password_secret)
    context = None
    if settings.tls_ca_file is not None:
        context = ssl.create_default_context(cafile=secret_file(settings.tls_ca_file))
        if settings.tls_cert_file is not None:
            context.load_cert_chain(secret_file(settings.tls_cert_file),
                                    secret_file(settings.tls_key_file))
    return password, context


def make_client(settings: MqttSettings, role: str) -> mqtt.Client:
    """A paho client with protocol, clean start, auth, TLS and reconnect delays set.

    The caller sets its callbacks, then calls ``start(client, settings)``.
    """
    protocol = PROTOCOLS[settings.protocol]
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": True}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=settings.resolved_client_id(role),
                         protocol=protocol, **kwargs)
    password, context = load_secrets(settings)
    if settings.username is not None:
        client.username_pw_set(settings.username, password)
    if context is not None:
        client.tls_set_context(context)
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)
    return client


def start(client: mqtt.Client, settings: MqttSettings) -> None:
    """Connect in the background: the network thread retries until the broker answers."""
    extra = {"clean_start": True} if settings.protocol == "5" else {}
    client.connect_async(settings.host, settings.port, settings.keepalive_s, **extra)
    client.loop_start()


def stop(client: mqtt.Client) -> None:
    """Disconnect and join the network thread."""
    client.disconnect()
    client.loop_stop()
