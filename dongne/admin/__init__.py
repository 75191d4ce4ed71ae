"""The admin dashboard: a live page on the ops port at ``/admin``.

:class:`AdminApp` is an ASGI app mounted by :class:`dongne.ops.OpsApp`. It
serves a login form, the dashboard (plain HTML/CSS/JS shipped as package data
in ``static/``), JSON snapshots and a server-sent event stream of the engine's
overview.
"""

from ._app import COOKIE_NAME as COOKIE_NAME
from ._app import CSRF_HEADER as CSRF_HEADER
from ._app import AdminApp as AdminApp

__all__ = ["COOKIE_NAME", "CSRF_HEADER", "AdminApp"]
