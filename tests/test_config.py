"""Settings: file, environment and flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dongne.config import Settings, load_settings
from dongne.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_toml_states_every_default() -> None:
    assert load_settings(ROOT / "config.toml", environ={}) == Settings()


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\nops_port = 9001\n[store]\npath = "a.db"\n')
    s = load_settings(
        cfg, environ={"DONGNE_SERVER_PORT": "9100", "DONGNE_JWT_SECRET": "s"}, overrides={"server": {"ops_port": 9200}}
    )
    assert (s.server.port, s.server.ops_port, s.store.path, s.auth.jwt_secret) == (9100, 9200, "a.db", "s")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[nope]\n", "unknown section [nope]"),
        ("[server]\nportt = 1\n", "unknown setting [server] portt"),
        ("[server]\nport = 70000\n", "port number"),
        ("[server]\nport = true\n", "must be an integer"),
        ('[store]\nsynchronous = "OFF"\n', "must be one of FULL, NORMAL, EXTRA"),
        ('[store]\nurl = "mysql://db/dongne"\n', "neither a SQLite file path nor a postgresql:// URL"),
        ("[engine]\ntyping_ttl_s = -1\n", "positive"),
        ("[server\n", "not valid TOML"),
        ("[cluster]\nlease_ttl_s = 11\n", "[cluster] lease_ttl_s (11.0) must not exceed node_ttl_s (10.0)"),
        ("[cluster]\nlease_ttl_s = 2\n", "heartbeat_interval_s (2.0) must be below lease_ttl_s (2.0)"),
        ("[engine]\naccept_points = -1\n", "[engine] 'accept_points' must be >= 0: -1"),
        ("[location]\nutc_offset_minutes = 5000\n", "[location] 'utc_offset_minutes' must be <= 840: 5000"),
        ("[snapshots]\ninterval_s = -60.0\n", "[snapshots] 'interval_s' must be >= 0: -60.0"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg, environ={})
    assert message in str(err.value)


def test_the_store_is_its_url_else_its_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\npath = "a.db"\n')
    assert load_settings(cfg, environ={}).store.target == "a.db"
    url = "postgresql:///dongne?host=/run/postgresql"
    assert load_settings(cfg, environ={"DONGNE_STORE_URL": url}).store.target == url
    assert load_settings(cfg, environ={}, overrides={"store": {"url": "b.sqlite3"}}).store.target == "b.sqlite3"


def test_bad_environment_is_refused() -> None:
    with pytest.raises(ConfigError, match="DONGNE_SERVER_PROT"):
        load_settings(None, environ={"DONGNE_SERVER_PROT": "1"})
    with pytest.raises(ConfigError, match="must be a number"):
        load_settings(None, environ={"DONGNE_ENGINE_TYPING_TTL_S": "soon"})


def test_a_section_is_checked_whole_in_a_file_as_from_the_environment(tmp_path: Path) -> None:
    """Keys that are only consistent together (a faster failover) are accepted from a file, not checked one by
    one against the defaults of the others."""
    fast = {"heartbeat_interval_s": 1.0, "lease_ttl_s": 3.0, "node_ttl_s": 4.0}
    cfg = tmp_path / "c.toml"
    cfg.write_text("[cluster]\n" + "".join(f"{key} = {value}\n" for key, value in fast.items()))
    by_file = load_settings(cfg, environ={}).cluster
    by_env = load_settings(None, environ={f"DONGNE_CLUSTER_{k.upper()}": str(v) for k, v in fast.items()}).cluster
    assert by_file == by_env
    assert (by_file.heartbeat_interval_s, by_file.lease_ttl_s, by_file.node_ttl_s) == (1.0, 3.0, 4.0)
