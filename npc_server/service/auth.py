"""Who a client is: the shared token or a per-client tokens file, and the `authorization: Bearer <token>` header."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

from npc_server.service.api import ApiError, ErrorCode

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@:-]{1,64}$")
MIN_TOKEN_CHARS = 16


class TokensFileError(ValueError):
    """A tokens file that cannot be used; `str()` reads `file:line: message`."""


def read_tokens_file(path: str | Path) -> dict[str, str]:
    """Read a tokens file -> {token: client name}.

    One client per line: `name token` (separated by spaces); blank lines and lines starting with `#` are skipped.
    Names are 1-64 letters, digits or `_.@:-`; tokens at least 16 characters; both unique.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"{path}: cannot read the tokens file: {exc}") from None
    tokens: dict[str, str] = {}
    names: set[str] = set()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) != 2:
            raise TokensFileError(f"{where}: expected `name token`, got {len(parts)} word(s)")
        name, token = parts
        if not NAME_PATTERN.match(name):
            raise TokensFileError(f"{where}: client name must be 1-64 letters, digits or _.@:- characters")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokensFileError(f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if name in names:
            raise TokensFileError(f"{where}: client {name!r} is named twice")
        if token in tokens:
            raise TokensFileError(f"{where}: client {name!r} has the same token as {tokens[token]!r}")
        names.add(name)
        tokens[token] = name
    if not tokens:
        raise TokensFileError(f"{path}: no `name token` lines")
    return tokens


def bearer_token(header: str | None) -> str | None:
    """The token of an `authorization` header value, which must read `Bearer <token>`; None when there is none."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(ErrorCode.UNAUTHENTICATED, "the authorization header must read 'Bearer <token>'")
    return token.strip()


def matches(token: str, secret: str) -> bool:
    """Constant-time comparison of a presented token with a known one."""
    return hmac.compare_digest(token.encode(), secret.encode())
