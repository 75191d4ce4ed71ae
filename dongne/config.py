"""Settings: ``config.toml`` read with tomllib into attrs classes.

Precedence, lowest first: built-in defaults, the TOML file, environment
variables ``DONGNE_<SECTION>_<KEY>`` (plus ``DONGNE_JWT_SECRET``), then
command-line flags. Unknown sections or keys and values of the wrong type or
range raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from .core.errors import ConfigError
from .core.escalation import DEFAULT_STAGES, StagePlan, stages_from_config
from .core.settings import (
    AlertSettings,
    ContentSettings,
    CoreSettings,
    EngineSettings,
    LimitSettings,
    LocationSettings,
    ModerationSettings,
    QuestionSettings,
    positive,
    positive_or_inf,
)

__all__ = [
    "AlertSettings",
    "AuthSettings",
    "ClusterSettings",
    "ContentSettings",
    "EngineSettings",
    "EscalationSettings",
    "InboxSettings",
    "LimitSettings",
    "LocationSettings",
    "LogSettings",
    "ServerSettings",
    "Settings",
    "SnapshotSettings",
    "StoreSettings",
    "WebSettings",
    "load_settings",
]


def _port(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{attribute.name} must be a port number 0..65535, got {value!r}")


def _one_of(*choices: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _networks(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for entry in value:
        try:
            ipaddress.ip_network(str(entry), strict=False)
        except ValueError:
            raise ConfigError(f"{attribute.name}: {entry!r} is not an IP address or CIDR network") from None


def _origins(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for entry in value:
        if not isinstance(entry, str) or not (entry == "*" or entry == "null" or "://" in entry):
            raise ConfigError(f"{attribute.name}: {entry!r} is not an origin (scheme://host[:port]), 'null' or '*'")


def _ws_url(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    scheme, sep, rest = value.partition("://")
    if value and not (sep and scheme in ("ws", "wss") and rest.strip("/")):
        raise ConfigError(f"{attribute.name}: {value!r} is not a ws:// or wss:// URL")


@attrs.frozen
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8765, validator=_port)
    ops_host: str = "127.0.0.1"
    ops_port: int = attrs.field(default=8766, validator=_port)
    max_frame_bytes: int = attrs.field(default=65536, validator=positive)
    outbound_buffer_bytes: int = attrs.field(default=1_048_576, validator=positive)
    hello_timeout_s: float = attrs.field(default=10.0, validator=positive_or_inf)
    ping_interval_s: float = attrs.field(default=20.0, validator=positive_or_inf)
    shutdown_timeout_s: float = attrs.field(default=5.0, validator=positive)
    backlog: int = attrs.field(default=4096, validator=positive)
    full_gc_interval_s: float = attrs.field(default=600.0, validator=positive_or_inf)
    # Reverse proxies (addresses or CIDR networks) whose forwarding header
    # names the client; from any other peer the header is ignored.
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_networks)
    # Which header trusted proxies set: "x-forwarded-for" or "forwarded" (RFC 7239 for=).
    forwarded_header: str = attrs.field(default="x-forwarded-for", validator=_one_of("x-forwarded-for", "forwarded"))
    # Every connection starts with a PROXY protocol v1/v2 header (TCP load balancers).
    proxy_protocol: bool = False
    # Origins a browser handshake may come from ("*": any); others get 403.
    allowed_origins: tuple[str, ...] = attrs.field(default=("*",), converter=tuple, validator=_origins)
    # The client port's WebSocket URL as browsers reach it (ws:// or wss://, e.g. behind a
    # TLS-terminating proxy); the admin page's moderation panel connects there. Empty: ws://host:port.
    public_url: str = attrs.field(default="", validator=_ws_url)


def _store_url(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    scheme, sep, _rest = value.partition("://")
    if sep and scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{attribute.name}: {value!r} is neither a SQLite file path nor a postgresql:// URL")


@attrs.frozen
class StoreSettings:
    # The database: a SQLite file path, or a postgresql:// URL in libpq's
    # syntax (postgresql://user@host/dbname, or postgresql:///dbname?host=/socket/dir
    # for a unix socket). Empty: ``path``. ``--db`` sets it.
    url: str = attrs.field(default="", validator=_store_url)
    # The SQLite file (the key from before ``url``; ``url`` wins when set).
    path: str = "dongne.sqlite3"
    # SQLite only (PostgreSQL commits as its server is configured to).
    synchronous: str = attrs.field(default="FULL", validator=_one_of("FULL", "NORMAL", "EXTRA"))
    max_batch: int = attrs.field(default=1000, validator=positive)
    # How long a commit waits for a lock another program holds on the
    # database before it fails (and writes are refused until one succeeds).
    busy_timeout_s: float = attrs.field(default=30.0, validator=positive)

    @property
    def target(self) -> str:
        """The database in use: ``url`` if set, else ``path``."""
        return self.url or self.path


@attrs.frozen
class AuthSettings:
    jwt_secret: str = ""
    token_ttl_s: int = attrs.field(default=30 * 24 * 3600, validator=positive)


@attrs.frozen
class EscalationSettings:
    stages: tuple[StagePlan, ...] = attrs.field(default=DEFAULT_STAGES, converter=stages_from_config)
    # Push gateway: offline targets' jobs are POSTed here as JSON. Empty: jobs
    # are only recorded in the outbox.
    push_url: str = ""
    push_attempts: int = attrs.field(default=3, validator=positive)
    push_backoff_s: float = attrs.field(default=1.0, validator=positive)
    push_timeout_s: float = attrs.field(default=5.0, validator=positive)
    # Jobs older than this are not sent any more (status "expired").
    push_max_age_s: float = attrs.field(default=600.0, validator=positive)
    # A stage is planned at once; its alerts are written and sent this many
    # at a time, each batch in a commit of its own.
    alerts_per_batch: int = attrs.field(default=100, validator=positive)


@attrs.frozen
class InboxSettings:
    # Durable events older than this are pruned in the background (each
    # user's newest one is kept); a resume from before them says so.
    retention_days: float = attrs.field(default=30.0, validator=positive)
    # How often the pruner runs, and how many events one of its commits deletes.
    prune_interval_s: float = attrs.field(default=3600.0, validator=positive_or_inf)
    prune_batch: int = attrs.field(default=1000, validator=positive)


@attrs.frozen
class ClusterSettings:
    # PostgreSQL only: how often a node says it is alive in cluster_nodes, and
    # how long a silent node stays listed (then any node removes its row).
    heartbeat_interval_s: float = attrs.field(default=2.0, validator=positive_or_inf)
    node_ttl_s: float = attrs.field(default=10.0, validator=positive)
    # How often a node compares the inbox heads of the users connected to it
    # with what it delivered, and replays what is missing: the most a lost
    # notification (or a dropped LISTEN connection) delays an event from
    # another node.
    catch_up_interval_s: float = attrs.field(default=5.0, validator=positive_or_inf)
    # The escalation lease: the node holding it runs escalation stages, and
    # renews it at every heartbeat; when its holder stops renewing, another
    # node takes it over lease_ttl_s later and runs the overdue stages. At
    # most node_ttl_s, and above heartbeat_interval_s (else it lapses between
    # two renewals).
    lease_ttl_s: float = attrs.field(default=5.0, validator=positive)
    # How often a node writes the positions of its users that moved, and its
    # question rooms' changed members (a statement each, announced to the
    # other nodes, which keep every node's online locals in their own R-tree
    # and every node's room members for join replies): how stale another
    # node's view of them is.
    positions_interval_s: float = attrs.field(default=0.5, validator=positive_or_inf)

    def __attrs_post_init__(self) -> None:
        if self.lease_ttl_s > self.node_ttl_s:
            raise ConfigError(f"lease_ttl_s ({self.lease_ttl_s}) must not exceed node_ttl_s ({self.node_ttl_s})")
        if not math.isinf(self.heartbeat_interval_s) and self.heartbeat_interval_s >= self.lease_ttl_s:
            raise ConfigError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be below lease_ttl_s ({self.lease_ttl_s}):"
                " the lease is renewed at every heartbeat"
            )


@attrs.frozen
class SnapshotSettings:
    # Relative to the database's folder.
    dir: str = "snapshots"
    # 0 turns periodic snapshots off (``dongne snapshot`` still works).
    interval_s: float = attrs.field(default=3600.0, validator=attrs.validators.ge(0))
    keep: int = attrs.field(default=24, validator=positive)


def _url(*schemes: str, template: bool = False) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if not value:
            return
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in schemes or not rest or rest.startswith("/"):
            raise ConfigError(f"{attribute.name}: {value!r} is not an absolute {' or '.join(schemes)} URL")
        host = rest.split("/", 1)[0]
        if "{" in host.replace("{s}.", "", 1) or ("{s}" in host and not host.startswith("{s}.")):
            raise ConfigError(f"{attribute.name}: {value!r}: only a leading {{s}}. may be a template in the host")
        if template and not all(part in value for part in ("{z}", "{x}", "{y}")):
            raise ConfigError(f"{attribute.name}: {value!r} needs {{z}}, {{x}} and {{y}} (an XYZ tile template)")

    return check


@attrs.frozen
class WebSettings:
    # The web app on the client port (GET /); off: the port only speaks
    # WebSocket and answers /health and /ready.
    enabled: bool = True
    # An XYZ raster tile template (https://tiles.example/{z}/{x}/{y}.png) drawn
    # under the regions, from a tile server you may use; empty: no street map,
    # and the app loads nothing from other hosts.
    tile_url: str = attrs.field(default="", validator=_url("https", "http", template=True))
    # Shown on the map, as the tile server's terms require.
    tile_attribution: str = ""
    # Where the app fetches a token (GET, with cookies; JSON {"token": "..."})
    # when the page was not opened with #token=...; empty: no sign-in but the link.
    token_url: str = attrs.field(default="", validator=_url("https", "http"))


@attrs.frozen
class LogSettings:
    level: str = attrs.field(default="INFO", validator=_one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    format: str = attrs.field(default="json", validator=_one_of("json", "text"))


@attrs.frozen
class Settings:
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    auth: AuthSettings = AuthSettings()
    engine: EngineSettings = EngineSettings()
    location: LocationSettings = LocationSettings()
    escalation: EscalationSettings = EscalationSettings()
    alerts: AlertSettings = AlertSettings()
    questions: QuestionSettings = QuestionSettings()
    inbox: InboxSettings = InboxSettings()
    cluster: ClusterSettings = ClusterSettings()
    moderation: ModerationSettings = ModerationSettings()
    limits: LimitSettings = LimitSettings()
    content: ContentSettings = ContentSettings()
    snapshots: SnapshotSettings = SnapshotSettings()
    web: WebSettings = WebSettings()
    log: LogSettings = LogSettings()

    def core(self) -> CoreSettings:
        """The settings the engine is configured with."""
        return CoreSettings(
            engine=self.engine,
            location=self.location,
            limits=self.limits,
            content=self.content,
            alerts=self.alerts,
            questions=self.questions,
            moderation=self.moderation,
            stages=self.escalation.stages,
            alerts_per_batch=self.escalation.alerts_per_batch,
            hello_timeout_s=self.server.hello_timeout_s,
        )


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in attrs.fields(Settings)}


def _coerce(section: str, key: str, kind: Any, value: Any, *, from_text: bool) -> Any:
    where = f"[{section}] {key}"
    if kind is bool:
        if from_text:
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if from_text:
            try:
                return int(str(value).strip())
            except ValueError:
                raise ConfigError(f"{where} must be an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if from_text:
            try:
                return float(str(value).strip())
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if not from_text and isinstance(value, (list, tuple)):
        return value  # an array (of tables or strings), validated by its section
    if from_text:
        raise ConfigError(f"{where} can only be set in the config file")
    raise ConfigError(f"{where} must be an array of tables, got {value!r}")


def _coerced(name: str, cls: type, values: Mapping[str, Any], *, from_text: bool) -> dict[str, Any]:
    """The values of one section, each known and of its type (ranges and cross-checks: ``_build_section``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting [{name}] {unknown[0]}; known keys: {', '.join(sorted(known))}")
    return {key: _coerce(name, key, hints[key], value, from_text=from_text) for key, value in values.items()}


def _build_section(name: str, cls: type, values: Mapping[str, Any], *, from_text: bool) -> Any:
    kwargs = _coerced(name, cls, values, from_text=from_text)
    try:
        return cls(**kwargs)
    except (ConfigError, ValueError) as exc:  # ValueError: attrs' range validators ("'x' must be >= 0: -1")
        raise ConfigError(f"[{name}] {exc}") from None


def _env_overrides(environ: Mapping[str, str], sections: Mapping[str, type]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    if environ.get("DONGNE_JWT_SECRET"):
        out.setdefault("auth", {})["jwt_secret"] = environ["DONGNE_JWT_SECRET"]
    for var, value in environ.items():
        if not var.startswith("DONGNE_") or var == "DONGNE_JWT_SECRET":
            continue
        rest = var[len("DONGNE_") :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise ConfigError(f"environment variable {var}: unknown section {section!r}")
        out.setdefault(section, {})[key] = value
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Settings:
    """Build the settings from defaults, a TOML file, the environment and overrides.

    Args:
        path: a ``config.toml``; ``None`` means defaults only.
        environ: the environment to read ``DONGNE_*`` variables from
            (``os.environ`` when omitted).
        overrides: ``{section: {key: value}}`` from command-line flags; wins over all.

    Raises:
        ConfigError: unknown section or key, a value of the wrong type or range,
            an unreadable or malformed file.
    """
    sections = _section_classes()
    merged: dict[str, dict[str, Any]] = {name: {} for name in sections}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for name, table in data.items():
            if name not in sections:
                raise ConfigError(f"{path}: unknown section [{name}]; known: {', '.join(sections)}")
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            try:
                _coerced(name, sections[name], table, from_text=False)  # the section is checked whole below
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
            merged[name].update(table)
    env = _env_overrides(os.environ if environ is None else environ, sections)
    built: dict[str, Any] = {}
    for name, cls in sections.items():
        section_values = dict(merged[name])
        hints = typing.get_type_hints(cls)
        for key, text in env.get(name, {}).items():
            if key not in hints:
                raise ConfigError(f"environment variable DONGNE_{name.upper()}_{key.upper()}: unknown setting")
            section_values[key] = _coerce(name, key, hints[key], text, from_text=True)
        section_values.update((overrides or {}).get(name, {}))
        built[name] = _build_section(name, cls, section_values, from_text=False)
    return Settings(**built)
