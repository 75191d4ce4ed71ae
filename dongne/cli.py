"""The ``dongne`` command: ``serve`` and ``token``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import trio

from .auth import load_or_create_secret, mint_token
from .config import Settings, load_settings
from .core.errors import ConfigError
from .core.regions import RegionFileError, RegionSet

__all__ = ["main"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="a config.toml (default: ./config.toml if it exists)")
    parser.add_argument("--db", metavar="PATH", help="the SQLite database file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dongne", description="dongne: ask the neighbourhood.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--host", help="client listener address")
    serve.add_argument("--port", type=int, help="client WebSocket port (0 picks a free one)")
    serve.add_argument("--ops-port", type=int, help="ops HTTP port: /health, /ready (0 picks a free one)")
    serve.add_argument("--regions", metavar="GEOJSON", help="a region FeatureCollection (default: bundled Jeju)")
    token = sub.add_parser("token", help="print a signed token for a user")
    _common(token)
    token.add_argument("user_id")
    token.add_argument("--nick")
    token.add_argument("--local", action="store_true", help="a verified local")
    token.add_argument("--tags", default="", help="expertise hashtags, comma-separated")
    token.add_argument("--admin", action="store_true")
    token.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: [auth] token_ttl_s)")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {"server": {}, "store": {}}
    for flag, section, key in (("host", "server", "host"), ("port", "server", "port"), ("ops_port", "server", "ops_port"), ("db", "store", "path")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[section][key] = value
    config = args.config
    if config is None and Path("config.toml").is_file():
        config = "config.toml"
    return load_settings(config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"dongne: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        secret = load_or_create_secret(settings.auth.jwt_secret, Path(settings.store.path).resolve())
        tags = [t.strip() for t in args.tags.split(",") if t.strip()]
        print(
            mint_token(
                secret,
                args.user_id,
                nick=args.nick,
                local=args.local,
                tags=tags,
                admin=args.admin,
                ttl_s=args.ttl if args.ttl is not None else settings.auth.token_ttl_s,
                now_s=time.time(),
            )
        )
        return 0
    logging.basicConfig(
        level=settings.log.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    regions = None
    if args.regions:
        try:
            regions = RegionSet.from_file(args.regions)
        except RegionFileError as exc:
            print(f"dongne: {exc}", file=sys.stderr)
            return 2
    from .app import run_server

    trio.run(lambda: run_server(settings, regions=regions, handle_signals=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
