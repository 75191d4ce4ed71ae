"""The client transport: WebSocket on raw trio sockets, with wsproto and h11."""

from ._addresses import OriginPolicy as OriginPolicy
from ._addresses import TrustedProxies as TrustedProxies
from ._addresses import normalize_address as normalize_address
from ._connection import CLOSE_GRACE_S as CLOSE_GRACE_S
from ._connection import BinaryFrame as BinaryFrame
from ._connection import TextFrame as TextFrame
from ._connection import WebSocketConnection as WebSocketConnection
from ._frames import FrameEncoder as FrameEncoder
from ._handshake import HandshakeResult as HandshakeResult
from ._handshake import HttpAnswer as HttpAnswer
from ._handshake import Refusal as Refusal
from ._handshake import Site as Site
from ._handshake import UpgradeRequest as UpgradeRequest
from ._handshake import accept_upgrade as accept_upgrade
from ._handshake import read_request as read_request
from ._handshake import recv_some as recv_some
from ._handshake import refuse_upgrade as refuse_upgrade
from ._handshake import serve_handshake as serve_handshake
from ._proxy_protocol import ProxyHeader as ProxyHeader
from ._proxy_protocol import ProxyProtocolError as ProxyProtocolError
from ._proxy_protocol import parse_proxy_header as parse_proxy_header

__all__ = [
    "CLOSE_GRACE_S",
    "BinaryFrame",
    "FrameEncoder",
    "HandshakeResult",
    "HttpAnswer",
    "OriginPolicy",
    "ProxyHeader",
    "ProxyProtocolError",
    "Refusal",
    "Site",
    "TextFrame",
    "TrustedProxies",
    "UpgradeRequest",
    "WebSocketConnection",
    "accept_upgrade",
    "normalize_address",
    "parse_proxy_header",
    "read_request",
    "recv_some",
    "refuse_upgrade",
    "serve_handshake",
]
