"""The ``dongne`` command: ``serve``, ``token``, ``admin-link``, ``snapshot`` and ``restore``."""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .auth import SIGNIN_CODE_TTL_S, TokenVerifier, load_or_create_secret, mint_signin_code, mint_token
from .config import Settings, load_settings
from .core.errors import CloseConnection, ConfigError
from .core.regions import RegionFileError, RegionSet
from .logs import configure_logging

__all__ = ["ADMIN_TOKEN_TTL_S", "main"]

#: Default lifetime of ``dongne token --admin`` (a user token's is ``[auth] token_ttl_s``).
ADMIN_TOKEN_TTL_S = 12 * 3600


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="a config.toml (default: ./config.toml if it exists)")
    parser.add_argument(
        "--db", metavar="PATH|URL", help="the database: a SQLite file, or a postgresql:// URL (libpq syntax)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dongne", description="dongne: ask the neighbourhood.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--host", help="client listener address")
    serve.add_argument("--port", type=int, help="client WebSocket port (0 picks a free one)")
    serve.add_argument("--ops-port", type=int, help="ops HTTP port: /health, /ready (0 picks a free one)")
    serve.add_argument("--regions", metavar="GEOJSON", help="a region FeatureCollection (default: bundled Jeju)")
    demo = sub.add_parser("demo", help="run the server on a temporary database with simulated locals and travellers")
    demo.add_argument("--port", type=int, default=8765, help="client WebSocket port (0 picks a free one)")
    demo.add_argument("--ops-port", type=int, default=8766, help="ops/dashboard port (0 picks a free one)")
    demo.add_argument("--locals", type=int, default=40, help="simulated verified locals")
    demo.add_argument("--travellers", type=int, default=12, help="simulated travellers asking questions")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--seed", type=int, help="random seed")
    demo.add_argument("--debug", action="store_true", help="the server's own log lines (JSON, INFO and above)")
    token = sub.add_parser("token", help="print a signed token for a user")
    _common(token)
    token.add_argument("user_id")
    token.add_argument("--nick")
    token.add_argument("--local", action="store_true", help="a verified local")
    token.add_argument("--tags", default="", help="expertise hashtags, comma-separated")
    token.add_argument("--admin", action="store_true")
    token.add_argument(
        "--ttl", type=int, metavar="SECONDS", help="lifetime (default: [auth] token_ttl_s; 12 h with --admin)"
    )
    link = sub.add_parser(
        "admin-link", help="print a one-time sign-in link for the admin dashboard (valid for 5 minutes, once)"
    )
    _common(link)
    link.add_argument("user_id", nargs="?", default="admin", help="the admin's user id (default: admin)")
    link.add_argument("--nick", help="the admin's display name (default: the user id)")
    link.add_argument(
        "--ops-url",
        metavar="URL",
        help="the dashboard's base URL as your browser reaches it (default: http://[server] ops_host:ops_port)",
    )
    snapshot = sub.add_parser("snapshot", help="take a consistent snapshot of the database (the server may be running)")
    _common(snapshot)
    snapshot.add_argument(
        "--dir", metavar="DIR", help="where to write it (default: [snapshots] dir, relative to the database's folder)"
    )
    restore = sub.add_parser("restore", help="replace the database with a snapshot (stop the server first)")
    restore.add_argument("snapshot", metavar="PATH", help="the snapshot file")
    _common(restore)
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {"server": {}, "store": {}}
    for flag, section, key in (
        ("host", "server", "host"),
        ("port", "server", "port"),
        ("ops_port", "server", "ops_port"),
        ("db", "store", "url"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[section][key] = value
    config = args.config
    if config is None and Path("config.toml").is_file():
        config = "config.toml"
    return load_settings(config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        configure_logging(
            "INFO" if args.debug else "WARNING",
            "json" if args.debug else "text",
        )
        try:
            trio.run(
                lambda: run_demo(
                    port=args.port, ops_port=args.ops_port, locals_count=args.locals, travellers=args.travellers,
                    duration_s=args.duration, seed=args.seed,
                )
            )  # fmt: skip
        except BaseException as exc:
            cannot = _cannot_listen(exc, f"the demo's ports {args.port} and {args.ops_port}")
            if cannot is None:
                raise
            print(cannot, file=sys.stderr)
            return 2
        return 0
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"dongne: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "snapshot":
        return _snapshot(args, settings)
    if args.command == "restore":
        return _restore(args, settings)
    if args.command == "token":
        try:
            secret = _secret(settings)
        except ConfigError as exc:
            print(f"dongne: {exc}", file=sys.stderr)
            return 2
        tags = [t.strip() for t in args.tags.split(",") if t.strip()]
        now = time.time()
        token = mint_token(
            secret,
            args.user_id,
            nick=args.nick,
            local=args.local,
            tags=tags,
            admin=args.admin,
            ttl_s=args.ttl if args.ttl is not None else _default_ttl(args.admin, settings),
            now_s=now,
        )
        try:  # never print a token the server would refuse (an id or tag too long, already expired)
            TokenVerifier(secret).verify(token, now_s=now)
        except CloseConnection as refused:
            print(f"dongne: the server would refuse this token: {refused.reason}", file=sys.stderr)
            return 2
        print(token)
        return 0
    if args.command == "admin-link":
        return _admin_link(args, settings)
    configure_logging(settings.log.level, settings.log.format)
    regions = None
    if args.regions:
        try:
            regions = RegionSet.from_file(args.regions)
        except RegionFileError as exc:
            print(f"dongne: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"dongne: --regions: cannot read {args.regions}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    from .app import run_server
    from .runtime import tune_interpreter
    from .store import DatabaseInUseError, StoreError

    tune_interpreter()
    try:
        trio.run(lambda: run_server(settings, regions=regions, handle_signals=True))
    except DatabaseInUseError as exc:
        print(f"dongne: {exc}: is another server running on this database?", file=sys.stderr)
        return 2
    except (StoreError, ConfigError) as exc:
        print(f"dongne: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. no space left for the lock or secret file
        print(f"dongne: cannot start: {exc.strerror or exc}: {exc.filename or settings.store.target}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:  # a listener that could not bind, from inside the server's nursery
        server = settings.server
        ports = f"the client port {server.host}:{server.port} or the ops port {server.ops_host}:{server.ops_port}"
        cannot = _cannot_listen(group, ports)
        if cannot is None:
            raise
        print(cannot, file=sys.stderr)
        return 2
    return 0


#: Why a listener cannot bind: the port is taken, privileged, or the address is not this machine's.
_BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL})


def _cannot_listen(exc: BaseException, where: str) -> str | None:
    """One line for a start-up that failed to bind a listener (``exc`` may be a group holding it), else ``None``."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cannot_listen(inner, where)
            if found is not None:
                return found
        return None
    if isinstance(exc, OSError) and exc.errno in _BIND_ERRORS:
        return f"dongne: cannot listen on {where}: {exc.strerror}"
    return None


def _sqlite_file(settings: Settings) -> Path | None:
    """The SQLite database file, or ``None`` for a PostgreSQL database."""
    from .store import is_postgres_url

    target = settings.store.target
    return None if is_postgres_url(target) else Path(target).resolve()


def _secret(settings: Settings) -> str:
    """The JWT secret (``ConfigError`` for a PostgreSQL database with none configured)."""
    return load_or_create_secret(settings.auth.jwt_secret, _sqlite_file(settings))


#: Why ``snapshot`` and ``restore`` refuse a PostgreSQL database.
NOT_FOR_POSTGRES = (
    "snapshots and restore are for SQLite databases; for PostgreSQL use pg_dump and pg_restore"
    " (or the server's own backups)"
)


def _default_ttl(admin: bool, settings: Settings) -> int:
    """An admin token is a key to everything: it lasts 12 h unless ``--ttl`` says otherwise."""
    ttl = settings.auth.token_ttl_s
    return min(ttl, ADMIN_TOKEN_TTL_S) if admin else ttl


def _admin_link(args: argparse.Namespace, settings: Settings) -> int:
    if args.ops_url:
        base = args.ops_url.rstrip("/")
    else:
        host, port = settings.server.ops_host, settings.server.ops_port
        if port == 0:
            print("dongne: [server] ops_port is 0 (a free port): pass --ops-url http://HOST:PORT", file=sys.stderr)
            return 2
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if base.endswith("/admin"):
        base = base.removesuffix("/admin")
    try:
        secret = _secret(settings)
    except ConfigError as exc:
        print(f"dongne: {exc}", file=sys.stderr)
        return 2
    code = mint_signin_code(secret, args.user_id, nick=args.nick, now_s=time.time())
    print(f"{base}/admin/login?code={code}")
    minutes = SIGNIN_CODE_TTL_S // 60
    print(f"(signs {args.user_id} in as an admin once, within {minutes} minutes)", file=sys.stderr)
    return 0


def _snapshot(args: argparse.Namespace, settings: Settings) -> int:
    from .snapshots import resolve_snapshot_dir
    from .store import SnapshotError, take_snapshot

    db = _sqlite_file(settings)
    if db is None:
        print(f"dongne: {NOT_FOR_POSTGRES}", file=sys.stderr)
        return 2
    if not db.is_file():
        print(f"dongne: no database at {db}", file=sys.stderr)
        return 2
    # A --dir typed on the command line is relative to the working directory.
    directory = Path(args.dir).resolve() if args.dir else resolve_snapshot_dir(db, settings.snapshots)
    try:
        print(take_snapshot(db, directory))
    except (SnapshotError, OSError) as exc:
        print(f"dongne: snapshot failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    from .store import DatabaseInUseError, InvalidSnapshotError, restore_snapshot

    db = _sqlite_file(settings)
    if db is None:
        print(f"dongne: {NOT_FOR_POSTGRES}", file=sys.stderr)
        return 2
    snapshot = Path(args.snapshot).resolve()
    if not snapshot.is_file():
        print(f"dongne: no snapshot at {snapshot}", file=sys.stderr)
        return 2
    if not args.yes:
        if not sys.stdin.isatty():
            print(
                "dongne: restore replaces the database; pass --yes to confirm when not at a terminal", file=sys.stderr
            )
            return 2
        print(
            f"Replace the database {db}\n   with the snapshot {snapshot}?\n"
            f"The current database is kept as {db.name}.before-restore-<time>. The server must be stopped. [y/N] ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        try:
            answer = input()
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("dongne: not restored", file=sys.stderr)
            return 1
    try:
        kept = restore_snapshot(snapshot, db)
    except (InvalidSnapshotError, DatabaseInUseError) as exc:
        print(f"dongne: not restored: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dongne: restore failed: {exc}", file=sys.stderr)
        return 1
    print(f"restored {snapshot} to {db}")
    if kept is not None:
        print(f"the previous database is kept as {kept}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
