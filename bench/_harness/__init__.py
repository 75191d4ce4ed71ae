"""Shared helpers for dongne's benches, one module a concern; a bench does ``import _harness as h``.

Nothing here imports trio: the benches drive servers as subprocesses and talk
to them over plain sockets, so the load side stays as cheap as it can be.

* ``_proc``: ``raise_nofile``, and CPU time and RSS of a process from
  ``/proc`` (``cpu_seconds``, ``rss_bytes``, ``machine_busy_seconds``).
* ``_server``: ``ServerProcess`` (start a server subprocess, stderr watched for
  its "listening" line, sample it, stop it; every started process is killed
  at interpreter exit) and ``start_dongne`` (``python -m dongne serve`` on
  127.0.0.1, free ports, a temp db or a PostgreSQL URL, ``BENCH_LIMITS``
  lifting the abuse limits), ``ServerGroup`` (several nodes sampled as one)
  and ``fresh_postgres_database`` (an empty database per run).
* ``_websocket``: a minimal WebSocket client: ``handshake_request``,
  ``encode_client_frame``, ``split_frames`` (sans-I/O) and
  ``BlockingWebSocket`` (for the few control connections a bench needs).
* ``_load``: load-client processes: ``EpollClients`` (many connections, one
  epoll loop, in a client process) and ``ClientPool`` (those processes, seen
  from the bench).
* ``_report``: a bench's scaffolding (``bench_parser``, ``add_json_option``,
  ``time_limit``, ``report_head``, ``background_cores``) and its results
  (``format_table``, ``write_json``, ``write_report``, ``median``,
  ``percentile``), and ``machine_reference_ms`` (how fast the machine is at
  the moment, from a fixed workload).
"""

from ._load import AUTH as AUTH
from ._load import CONNECTING as CONNECTING
from ._load import DEAD as DEAD
from ._load import HANDSHAKE as HANDSHAKE
from ._load import READY as READY
from ._load import ClientPool as ClientPool
from ._load import EpollClients as EpollClients
from ._load import LoadConn as LoadConn
from ._proc import cpu_seconds as cpu_seconds
from ._proc import machine_busy_seconds as machine_busy_seconds
from ._proc import raise_nofile as raise_nofile
from ._proc import rss_bytes as rss_bytes
from ._report import BENCH_DIR as BENCH_DIR
from ._report import REPO_DIR as REPO_DIR
from ._report import add_json_option as add_json_option
from ._report import background_cores as background_cores
from ._report import bench_parser as bench_parser
from ._report import format_table as format_table
from ._report import machine_reference_ms as machine_reference_ms
from ._report import median as median
from ._report import percentile as percentile
from ._report import report_head as report_head
from ._report import time_limit as time_limit
from ._report import write_json as write_json
from ._report import write_report as write_report
from ._server import BENCH_LIMITS as BENCH_LIMITS
from ._server import DONGNE_READY as DONGNE_READY
from ._server import ServerGroup as ServerGroup
from ._server import ServerProcess as ServerProcess
from ._server import fresh_postgres_database as fresh_postgres_database
from ._server import start_dongne as start_dongne
from ._websocket import LINGER_RST as LINGER_RST
from ._websocket import OP_BINARY as OP_BINARY
from ._websocket import OP_CLOSE as OP_CLOSE
from ._websocket import OP_CONT as OP_CONT
from ._websocket import OP_PING as OP_PING
from ._websocket import OP_PONG as OP_PONG
from ._websocket import OP_TEXT as OP_TEXT
from ._websocket import BlockingWebSocket as BlockingWebSocket
from ._websocket import WebSocketClosed as WebSocketClosed
from ._websocket import encode_client_frame as encode_client_frame
from ._websocket import handshake_request as handshake_request
from ._websocket import split_frames as split_frames

__all__ = [
    "AUTH",
    "BENCH_DIR",
    "BENCH_LIMITS",
    "CONNECTING",
    "DEAD",
    "DONGNE_READY",
    "HANDSHAKE",
    "LINGER_RST",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "READY",
    "REPO_DIR",
    "BlockingWebSocket",
    "ClientPool",
    "EpollClients",
    "LoadConn",
    "ServerProcess",
    "WebSocketClosed",
    "add_json_option",
    "background_cores",
    "bench_parser",
    "cpu_seconds",
    "encode_client_frame",
    "format_table",
    "handshake_request",
    "machine_busy_seconds",
    "median",
    "percentile",
    "raise_nofile",
    "report_head",
    "rss_bytes",
    "split_frames",
    "start_dongne",
    "time_limit",
    "write_json",
    "write_report",
]
