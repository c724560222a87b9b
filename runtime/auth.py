"""Who may call the server: API keys read from a file, the systemd credential or the environment (never from a
command-line value, which `ps` shows to every user), and the ASGI guard that asks every request but /health for
`Authorization: Bearer KEY` (what the OpenAI client sends as api_key), compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgepackError
from .openai_api import ApiError

CREDENTIAL_NAME = "edgepack-api-keys"  # the LoadCredential= id `edgepack unit --api-key-file` writes
KEYS_VARIABLE = "EDGEPACK_API_KEYS"
OPEN_PATHS = frozenset({"/health"})  # a load balancer or systemd probe needs no key
_REALM = 'Bearer realm="edgepack"'


@dataclass(frozen=True)
class ApiKeys:
    """The keys a request may carry, and where they came from (for the start-up line; never the keys)."""

    keys: tuple[bytes, ...]
    sources: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def accepts(self, token: bytes) -> bool:
        # Every key is compared, each in constant time: the answer's timing says nothing about how much matched.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(key, token)
        return found


NO_KEYS = ApiKeys((), ())


def load_api_keys(key_file: Path | None, environ: Mapping[str, str] = os.environ) -> ApiKeys:
    """The keys of --api-key-file, of the systemd credential ($CREDENTIALS_DIRECTORY/edgepack-api-keys) and of
    $EDGEPACK_API_KEYS, together. A source that is given but unreadable or holds no key is an error: a server
    meant to be closed must not start open."""
    keys: list[bytes] = []
    sources: list[str] = []
    files = [key_file] if key_file is not None else []
    if environ.get("CREDENTIALS_DIRECTORY"):
        credential = Path(environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        if credential.exists():
            files.append(credential)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise EdgepackError(f"API key file {path}: cannot read it ({reason})") from None
        keys += _parse_keys(text.splitlines(), str(path))
        sources.append(str(path))
    if KEYS_VARIABLE in environ:
        keys += _parse_keys(environ[KEYS_VARIABLE].replace(",", "\n").splitlines(), f"${KEYS_VARIABLE}")
        sources.append(f"${KEYS_VARIABLE}")
    return ApiKeys(tuple(dict.fromkeys(keys)), tuple(sources))


def _parse_keys(lines: list[str], where: str) -> list[bytes]:
    """One key a line; blank lines and # comments skipped. A key must be printable ASCII without spaces, as an
    HTTP header carries it."""
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not key.isascii() or not key.isprintable() or " " in key or "\t" in key:
            raise EdgepackError(f"API key in {where}, line {number}: expected printable ASCII without spaces")
        keys.append(key.encode("ascii"))
    if not keys:
        raise EdgepackError(f"{where}: no API key in it (one key a line; blank lines and # comments are skipped)")
    return keys


class RequireApiKey:
    """ASGI middleware: a request for any path but OPEN_PATHS (and /metrics, when kept open) without a valid
    `Authorization: Bearer KEY` gets a 401 in OpenAI's shape, with WWW-Authenticate (RFC 6750)."""

    def __init__(self, app: Any, keys: ApiKeys, metrics_open: bool = False) -> None:
        self.app, self.keys = app, keys
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(dict(scope["headers"]).get(b"authorization"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse  # a leaf otherwise: load_api_keys needs no web framework

        # The body is not read: uvicorn discards what comes, and the connection's read deadlines (http_guard.py)
        # end a client that keeps sending.
        await JSONResponse(refusal.body(), status_code=401, headers=refusal.headers)(scope, receive, send)

    def _refusal(self, header: bytes | None) -> ApiError | None:
        if header is None:
            return _unauthorized("no API key: send it as 'Authorization: Bearer KEY' (the OpenAI client's "
                                 "api_key)", _REALM)
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return _unauthorized("the Authorization header must be 'Bearer KEY'",
                                 f'{_REALM}, error="invalid_request"')
        if not self.keys.accepts(token.strip()):
            return _unauthorized("invalid API key", f'{_REALM}, error="invalid_token"')
        return None


def _unauthorized(message: str, challenge: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": challenge})


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a server bound elsewhere without a key is open to the network)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
