"""The server's settings: one frozen value, loaded once at start and passed down.

Precedence (PROTOCOL section 1): a command-line flag, else `CHATSERVER_<NAME>` in the environment, else the
TOML file (flat keys), else the default. An unknown key in the file, or a value of the wrong type anywhere, is
a `ConfigError` whose text is the one line the operator sees. Nothing here reads a global: the environment
and the flags are handed in.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from chatserver.numbers import is_ascii_decimal
from chatserver.store import check_db_setting

ENV_PREFIX = "CHATSERVER_"


class ConfigError(Exception):
    """A setting that cannot be used; its text names the setting and what is wrong."""


def _positive(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ConfigError(f"setting '{attribute.name}' must be greater than 0, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"setting '{attribute.name}' must not be negative, got {value!r}")


def _database(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        check_db_setting(value)
    except ValueError as exc:
        raise ConfigError(f"setting 'db' is neither a file path nor a usable PostgreSQL URL: {exc}") from None


def _networks(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        _parse_networks(value)
    except ValueError as exc:
        raise ConfigError(f"setting '{attribute.name}' must list addresses or networks: {exc}") from None


def _parse_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())


# The most worker processes `workers` may ask for: far more than any host has cores, still a bound.
MAX_WORKERS = 256


def _workers(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    text = value.strip()
    if text == "auto":
        return
    if not is_ascii_decimal(text) or not 1 <= int(text) <= MAX_WORKERS:
        raise ConfigError(f"setting 'workers' must be 'auto' or a whole number from 1 to {MAX_WORKERS}, got {value!r}")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or systemd's CPUAffinity= narrows)."""
    return max(len(os.sched_getaffinity(0)), 1)


HTTP_ENGINES = ("lean", "tornado")


def _http_engine(instance: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in HTTP_ENGINES:
        raise ConfigError(f"setting 'http_engine' must be one of {', '.join(HTTP_ENGINES)}, got {value!r}")


def _port(instance: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"setting 'port' must be between 0 and 65535, got {value!r}")


@attrs.frozen(slots=True)
class Config:
    """Every setting; `conf/chatserver.toml` documents each one with its default."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=8888, validator=_port)
    state_dir: str = ""
    secret: str = ""
    trusted_origins: str = ""
    # Addresses (or networks) of the proxies in front, whose X-Forwarded-For names the client (throttling).
    trusted_proxies: str = attrs.field(default="", validator=_networks)
    amqp_url: str = ""
    chat3_exchange: str = "chat3.events"
    chat3_queue: str = "chatserver.chat3"
    chat3_dead_letter_exchange: str = ""
    max_body_size: int = attrs.field(default=65536, validator=_positive)
    history_size: int = attrs.field(default=10000, validator=_positive)
    poll_max_events: int = attrs.field(default=500, validator=_positive)
    max_content_length: int = attrs.field(default=10000, validator=_positive)
    shutdown_grace: float = attrs.field(default=10.0, validator=_non_negative)
    # Extensions beyond PROTOCOL section 1.
    token_ttl: int = attrs.field(default=7 * 24 * 3600, validator=_positive)
    ws_ping_interval: float = attrs.field(default=20.0, validator=_positive)
    ws_ping_timeout: float = attrs.field(default=20.0, validator=_positive)
    client_buffer_limit: int = attrs.field(default=1024 * 1024, validator=_positive)
    max_connections: int = attrs.field(default=10000, validator=_positive)
    # Seconds a long-poll woken by receipts alone (or finding only those) waits for another event to answer with
    # them (0: at once).
    poll_receipt_linger: float = attrs.field(default=1.0, validator=_non_negative)
    # Who reads HTTP/1.1 (transport/http1.py): "lean", this server's own connections (httptools, the lean
    # long-poll); "tornado", Tornado's own HTTP1Connection for every request. Both give the same answers.
    http_engine: str = attrs.field(default="lean", validator=_http_engine)
    sse_heartbeat: float = attrs.field(default=15.0, validator=_positive)
    amqp_prefetch: int = attrs.field(default=64, validator=_positive)
    cluster_exchange: str = ""
    chat3_outbound_exchange: str = ""
    log_level: str = "info"
    # v2 (PROTOCOL section 10), and extensions of it.
    db: str = attrs.field(default="", validator=_database)
    event_retention: int = attrs.field(default=1_000_000, validator=_positive)
    log_poll_interval: float = attrs.field(default=0.5, validator=_positive)
    log_prune_interval: float = attrs.field(default=60.0, validator=_positive)
    db_pool_size: int = attrs.field(default=4, validator=_positive)
    # Worker processes on this host (chatserver/supervisor.py): a number, or "auto" for one per usable core.
    workers: str = attrs.field(default="1", validator=_workers)


    # Throttling (chatserver/throttle.py): failed logins allowed within login_window seconds, per phone from one
    # address, per phone from anywhere, per address; messages (and edits) per second per user past a burst.
    login_failures: int = attrs.field(default=5, validator=_positive)
    login_phone_failures: int = attrs.field(default=20, validator=_positive)
    login_address_failures: int = attrs.field(default=50, validator=_positive)
    login_window: float = attrs.field(default=900.0, validator=_positive)
    message_rate: float = attrs.field(default=3.0, validator=_non_negative)
    message_burst: int = attrs.field(default=20, validator=_positive)
    # Stream tickets (POST /api/stream-ticket) per second per user past a burst: every stream opened costs one.
    ticket_rate: float = attrs.field(default=1.0, validator=_non_negative)
    ticket_burst: int = attrs.field(default=20, validator=_positive)

    @property
    def state_path(self) -> Path:
        """`state_dir` as a path, as given (relative to the working directory where it is relative)."""
        return Path(self.state_dir)

    @property
    def database(self) -> str:
        """The `db` setting, or the SQLite file in `state_dir` where it is empty: a path or a postgresql:// URL."""
        return self.db or str(self.state_path / "chatserver.db")

    @property
    def db_path(self) -> Path:
        """The SQLite file (for a PostgreSQL URL, meaningless: see `database`)."""
        return Path(self.database)

    @property
    def worker_count(self) -> int:
        """`workers` as a number: "auto" is the cores this process may use, at most MAX_WORKERS."""
        text = self.workers.strip()
        return min(usable_cores(), MAX_WORKERS) if text == "auto" else int(text)

    @property
    def proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return _parse_networks(self.trusted_proxies)

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip().rstrip("/") for o in self.trusted_origins.split(",") if o.strip())


SETTINGS: dict[str, attrs.Attribute[Any]] = {a.name: a for a in attrs.fields(Config)}
_TYPES: dict[str, type] = {"str": str, "int": int, "float": float}


def _field_type(name: str) -> type:
    declared = SETTINGS[name].type
    assert declared is not None  # every field of Config is annotated
    return _TYPES[declared if isinstance(declared, str) else declared.__name__]


def _from_text(name: str, raw: str) -> Any:
    kind = _field_type(name)
    if kind is str:
        return raw
    try:
        value = kind(raw.strip())
    except ValueError:
        value = math.nan
    if isinstance(value, float) and not math.isfinite(value):  # also refuses "nan" and "inf"
        raise ConfigError(f"setting '{name}' must be {'an integer' if kind is int else 'a number'}, got {raw!r}")
    return value


def _from_toml(name: str, value: Any) -> Any:
    kind = _field_type(name)
    lists = name in ("trusted_origins", "trusted_proxies")
    if name == "workers" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # workers = 2 as well as workers = "auto"
    if lists and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok or (kind is float and not math.isfinite(value)):
        raise ConfigError(f"setting '{name}' in the config file must be of type {kind.__name__}, got {value!r}")
    return value


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    settings = {}
    for key, value in data.items():
        if key not in SETTINGS:
            raise ConfigError(f"unknown setting '{key}' in config file {path}")
        settings[key] = _from_toml(key, value)
    return settings


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Build the Config: flags over environment over file over defaults.

    `config_file` is the `--config` flag; without it `CHATSERVER_CONFIG` names the file; without either no
    file is read.
    """
    environ = environ if environ is not None else {}
    values: dict[str, Any] = {}
    path = config_file or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        values.update(read_file(path))
    for name in SETTINGS:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _from_text(name, raw)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _from_text(name, value) if isinstance(value, str) else value
    if not values.get("state_dir"):
        systemd_dir = environ.get("STATE_DIRECTORY", "")
        values["state_dir"] = systemd_dir.split(":")[0] if systemd_dir else "./var"
    if values.get("log_level", "info") not in ("debug", "info", "warning", "error"):
        raise ConfigError("setting 'log_level' must be one of debug, info, warning, error")
    try:
        return Config(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}") from None
