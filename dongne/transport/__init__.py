"""The client transport: WebSocket on raw trio sockets, with wsproto and h11."""

from ._connection import BinaryFrame as BinaryFrame
from ._connection import TextFrame as TextFrame
from ._connection import WebSocketConnection as WebSocketConnection
from ._frames import FrameEncoder as FrameEncoder
from ._handshake import HandshakeResult as HandshakeResult
from ._handshake import recv_some as recv_some
from ._handshake import serve_handshake as serve_handshake

__all__ = [
    "BinaryFrame",
    "FrameEncoder",
    "HandshakeResult",
    "TextFrame",
    "WebSocketConnection",
    "recv_some",
    "serve_handshake",
]
