"""Tokens: HS256 JWTs minted by the app's backend (or ``dongne token``).

PyJWT does the cryptography and the checks that are easy to get wrong by hand
(the algorithm is pinned to HS256, so ``alg: none`` and RS/HS confusion are
refused; ``exp`` is required and checked).

Text in a token is JSON, which can hold what UTF-8 cannot: a lone surrogate
(``"\\ud83d"``, what ``JSON.stringify`` writes for half an emoji, a display
name cut short by the app's backend). Nothing past this boundary could store
or send it, so claims are made valid Unicode here: the user id is refused (two
ids must never become one), the nick and tags are repaired, each lone
surrogate becoming U+FFFD, as a browser's ``TextEncoder`` does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

import attrs
import jwt

from .core.errors import CloseConnection, ConfigError
from .core.records import Claims

__all__ = [
    "SECRET_FILE_SUFFIX",
    "SIGNIN_CODE_TTL_S",
    "Claims",
    "SigninCode",
    "SigninCodeError",
    "TokenVerifier",
    "load_or_create_secret",
    "mint_signin_code",
    "mint_token",
    "read_signin_code",
]

ALGORITHM = "HS256"
SECRET_FILE_SUFFIX = ".jwt-secret"

_SURROGATE = re.compile("[\ud800-\udfff]")


def _repaired(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a pair, if any, joined into its character)."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def mint_token(
    secret: str,
    user_id: str,
    *,
    nick: str | None = None,
    local: bool = False,
    tags: tuple[str, ...] | list[str] = (),
    admin: bool = False,
    ttl_s: int = 30 * 24 * 3600,
    now_s: float,
) -> str:
    """Sign a token for ``user_id`` valid for ``ttl_s`` seconds from ``now_s``."""
    payload: dict[str, Any] = {
        "sub": user_id,
        "nick": nick if nick is not None else user_id,
        "local": local,
        "tags": list(tags),
        "role": "admin" if admin else "user",
        "iat": int(now_s),
        "exp": int(now_s + ttl_s),
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


@attrs.frozen
class TokenVerifier:
    """Checks tokens against one shared secret.

    Raises ``CloseConnection(4001, reason)`` for every refusal, so the driver
    closes the connection with the documented code.
    """

    secret: str = attrs.field(repr=False)

    def derive_key(self, purpose: bytes) -> bytes:
        """A key for another use of the server's secret (HMAC-SHA256 of ``purpose``): e.g. signing page cursors."""
        return hmac.new(self.secret.encode(), purpose, hashlib.sha256).digest()

    def verify(self, token: object, *, now_s: float) -> Claims:
        if not isinstance(token, str) or not token:
            raise CloseConnection(4001, "missing token")
        try:
            payload = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                # exp is required here but compared below with the engine's
                # clock (injected, so tests on a mock clock see expiry too).
                options={"require": ["exp", "sub"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError as exc:
            raise CloseConnection(4001, f"invalid token: {exc}"[:120]) from None
        exp = payload.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
            raise CloseConnection(4001, "invalid token: exp must be a number of seconds")
        if exp <= now_s:
            raise CloseConnection(4001, "token expired")
        return _claims_from(payload)


def _claims_from(payload: dict[str, Any]) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not (1 <= len(sub) <= 64):
        raise CloseConnection(4001, "invalid token: sub must be a string of 1..64 chars")
    if _SURROGATE.search(sub) is not None:
        raise CloseConnection(4001, "invalid token: sub is not valid Unicode (a lone surrogate)")
    nick = payload.get("nick", sub)
    if not isinstance(nick, str) or not (1 <= len(nick) <= 64):
        raise CloseConnection(4001, "invalid token: nick must be a string of 1..64 chars")
    local = payload.get("local", False)
    if not isinstance(local, bool):
        raise CloseConnection(4001, "invalid token: local must be a boolean")
    tags = payload.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and 0 < len(t) <= 40 for t in tags) or len(tags) > 20:
        raise CloseConnection(4001, "invalid token: tags must be a list of up to 20 short strings")
    role = payload.get("role", "user")
    if role not in ("user", "admin"):
        raise CloseConnection(4001, "invalid token: role must be 'user' or 'admin'")
    return Claims(
        user_id=sub,
        nick=_repaired(nick),
        local=local,
        tags=tuple(sorted({_repaired(t).lower().lstrip("#") for t in tags})),
        role=role,
    )


def load_or_create_secret(configured: str, db_path: Path | None) -> str:
    """The JWT secret: the configured one, else one kept beside the database.

    On first start a random secret is written to ``<db>.jwt-secret`` (mode 0600),
    so ``dongne token`` and ``dongne serve`` agree with no set-up.

    Args:
        configured: ``[auth] jwt_secret`` (or ``DONGNE_JWT_SECRET``).
        db_path: the SQLite file; ``None`` for a PostgreSQL database, which
            has no folder to keep one in (and whose nodes must share one).

    Raises:
        ConfigError: none configured for a PostgreSQL database; one shorter
            than ``SECRET_MIN_BYTES``, configured or kept (an empty file left
            by a first start that ran out of space, say).
    """
    if configured:
        return _long_enough(configured, "[auth] jwt_secret (or DONGNE_JWT_SECRET)")
    if db_path is None:
        raise ConfigError(
            "a PostgreSQL database needs [auth] jwt_secret (or DONGNE_JWT_SECRET) set:"
            " there is no database folder to keep a generated one in"
        )
    secret_path = db_path.with_name(db_path.name + SECRET_FILE_SUFFIX)
    try:
        return _long_enough(secret_path.read_text().strip(), f"the secret file {secret_path}")
    except FileNotFoundError:
        pass
    secret_path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # Written whole under another name, then linked into place: a start that fails half-way (a full disk)
    # leaves no empty secret file behind, and of two first starts at once the second reads the first's.
    partial = secret_path.with_name(f"{secret_path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(partial, secret_path)
        except FileExistsError:
            return _long_enough(secret_path.read_text().strip(), f"the secret file {secret_path}")
    finally:
        partial.unlink(missing_ok=True)
    return secret


#: The shortest JWT secret accepted: an HS256 key shorter than its 256-bit hash can be found offline from
#: one token (PyJWT warns below it too).
SECRET_MIN_BYTES = 32


def _long_enough(secret: str, where: str) -> str:
    if len(secret.encode()) < SECRET_MIN_BYTES:
        raise ConfigError(
            f"{where} is {'empty' if not secret else 'too short'}: a JWT secret needs at least {SECRET_MIN_BYTES}"
            " bytes (one that short can be guessed from any token it signed); make one with"
            " python -c 'import secrets; print(secrets.token_urlsafe(48))'"
        )
    return secret


# ---- one-time admin sign-in codes ---------------------------------------------------------

#: How long a sign-in code printed by ``dongne admin-link`` stays valid.
SIGNIN_CODE_TTL_S = 300
_SIGNIN_PURPOSE = b"dongne admin sign-in codes v1"


class SigninCodeError(ValueError):
    """A sign-in code that is malformed, forged or expired (the message says which)."""


@attrs.frozen
class SigninCode:
    """What a valid sign-in code grants: an admin session for ``user_id``.

    ``nonce`` identifies the code: the server remembers used nonces until
    ``expires_s`` so that each code signs in once.
    """

    user_id: str
    nick: str
    expires_s: int
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint_signin_code(
    secret: str, user_id: str, *, nick: str | None = None, now_s: float, ttl_s: int = SIGNIN_CODE_TTL_S
) -> str:
    """A code for ``/admin/login?code=...``: HMAC-signed with a key derived from ``secret``.

    It needs no storage, so ``dongne admin-link`` (another process) can mint it;
    the server makes it single-use by remembering its nonce until it expires.
    """
    payload = {
        "sub": user_id,
        "nick": nick if nick is not None else user_id,
        "exp": int(now_s + ttl_s),
        "n": secrets.token_urlsafe(12),
    }
    body = _b64(json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode())
    key = TokenVerifier(secret).derive_key(_SIGNIN_PURPOSE)
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def read_signin_code(secret: str, code: str, *, now_s: float) -> SigninCode:
    """Check a sign-in code's signature and expiry (not whether it was used: the caller's job).

    Raises:
        SigninCodeError: malformed, forged or expired.
    """
    body, sep, mac_text = code.strip().partition(".")
    if not sep or not body or not mac_text or len(code) > 1000:
        raise SigninCodeError("malformed sign-in code")
    key = TokenVerifier(secret).derive_key(_SIGNIN_PURPOSE)
    expected = hmac.new(key, body.encode(), hashlib.sha256).digest()
    try:
        mac = _unb64(mac_text)
        payload = json.loads(_unb64(body))
    except (ValueError, UnicodeDecodeError):
        raise SigninCodeError("malformed sign-in code") from None
    if not hmac.compare_digest(mac, expected):
        raise SigninCodeError("this sign-in code was not made with this server's secret")
    if not isinstance(payload, dict):
        raise SigninCodeError("malformed sign-in code")
    sub, nick, exp, nonce = payload.get("sub"), payload.get("nick"), payload.get("exp"), payload.get("n")
    if not (
        isinstance(sub, str)
        and 1 <= len(sub) <= 64
        and isinstance(nick, str)
        and 1 <= len(nick) <= 64
        and isinstance(exp, int)
        and not isinstance(exp, bool)
        and isinstance(nonce, str)
        and nonce
    ):
        raise SigninCodeError("malformed sign-in code")
    if _SURROGATE.search(sub) is not None:
        raise SigninCodeError("malformed sign-in code")
    if exp <= now_s:
        raise SigninCodeError("this sign-in link has expired (links last 5 minutes): run dongne admin-link again")
    return SigninCode(sub, _repaired(nick), exp, nonce)
