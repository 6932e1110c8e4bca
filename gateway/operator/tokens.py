"""The operator's bearer token: `DATA/operator.token`, mode 0600, made on first use (`devid operator
token`), replaced all at once by `--rotate` (a temporary file renamed over it: a reader sees the
old token or the new one, never a part). The listener reads the file again whenever it changes
(its inode, size or mtime), so a rotation takes effect at the next request without a restart,
in every process. Compared in constant time; never logged: a caller is named by `token_id`, the
first 12 hex digits of the token's SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from devid.gateway.errors import ConfigError
from devid.gateway.system.fs import fsync_path, write_atomic, write_synced

TOKEN_FILE = "operator.token"
PREFIX = "devid_op_"


def token_id(token: str) -> str:
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _new() -> str:
    return PREFIX + secrets.token_urlsafe(32)


class TokenFile:
    def __init__(self, data_path: Path) -> None:
        self.path = Path(data_path) / TOKEN_FILE
        self._seen: tuple | None = None
        self._token: str | None = None

    def ensure(self) -> tuple[str, bool]:
        """The token, made (0600) if there is none yet; (token, created)."""
        # written whole beside it, then linked into place (fails if one exists): a concurrent
        # reader or a second `devid operator token` never sees a half-written file
        tmp = self.path.with_name(f".{TOKEN_FILE}.{os.getpid()}.tmp")
        write_synced(tmp, (_new() + "\n").encode(), mode=0o600, exclusive=False)
        try:
            os.link(tmp, self.path)
            fsync_path(self.path.parent)
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink()
        return self._read_checked(), created

    def rotate(self) -> str:
        """A new token replaces the old one at once (the old one stops working)."""
        write_atomic(self.path, (_new() + "\n").encode(), mode=0o600)
        return self._read_checked()

    def _read_checked(self) -> str:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: no operator token: run 'devid operator token'") from None
        if st.st_mode & 0o077:
            raise ConfigError(f"{self.path}: readable by others (mode {st.st_mode & 0o777:o}): "
                              "chmod 600 it, or rotate the token")
        token = self.path.read_text().strip()
        if not token.startswith(PREFIX) or len(token) < len(PREFIX) + 32:
            raise ConfigError(f"{self.path}: not an operator token: run 'devid operator token --rotate'")
        return token

    def current(self) -> str | None:
        """The token now (re-read when the file changed); None if there is none or it is unusable."""
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._token = None, None
            return None
        seen = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        if seen != self._seen:
            try:
                self._token = self._read_checked()
            except (ConfigError, OSError):
                self._token = None
            self._seen = seen
        return self._token

    def check(self, presented: str) -> str | None:
        """The caller's name (`token_id`) if `presented` is the token, else None (constant time)."""
        token = self.current()
        if token is None:
            return None
        if hmac.compare_digest(presented.encode(), token.encode()):
            return token_id(token)
        return None
