"""API keys: several at once (for rotation), from the environment and/or a file that is re-read
when it changes (a Kubernetes Secret volume is updated in place), compared in constant time.

Keys configured but none found (an empty keys file, ``RMSERVE_API_KEYS=","``) is a
misconfiguration that would refuse every request: ``check()`` says so, and the server does not
start. A keys file that turns empty later keeps the keys read last, with a warning.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path

from rmserve.config import Settings

log = logging.getLogger("rmserve.auth")


def _parse(text: str) -> list[bytes]:
    return [k.strip().encode() for k in text.replace(",", "\n").splitlines() if k.strip()]


class KeyStore:
    def __init__(self, keys: str | None, path: Path | None, *, recheck_s: float = 1.0) -> None:
        self.enabled = keys is not None or path is not None
        self._static = _parse(keys or "")
        self._path = path
        self._recheck_s = recheck_s
        self._from_file: list[bytes] = []
        self._mtime: float | None = None
        self._checked = 0.0
        self._reload()

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        secret = settings.api_keys.get_secret_value() if settings.api_keys is not None else None
        return cls(secret, settings.api_keys_file)

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            mtime = self._path.stat().st_mtime
            if mtime != self._mtime:
                keys = _parse(self._path.read_text())
                self._mtime = mtime
                if not keys and self._from_file:
                    kept = len(self._from_file)
                    log.warning("the API keys file has no keys now; keeping the %d read before", kept)
                    return
                self._from_file = keys
                log.info("read %d API keys from the keys file", len(self._from_file))
        except OSError as exc:
            # Keep the last keys read: a Secret volume is briefly absent while it is swapped.
            log.warning("cannot read the API keys file: %s", exc.strerror)

    def check(self) -> None:
        """Raise ValueError when keys are configured but there are none to accept."""
        if not self.enabled or self._static or self._from_file:
            return
        if self._path is not None:
            raise ValueError(
                f"the API keys file {self._path} has no keys (or cannot be read); every request would "
                "be refused. Put one key per line in it, or unset RMSERVE_API_KEYS_FILE to serve without auth"
            )
        raise ValueError("RMSERVE_API_KEYS is set but holds no keys; unset it to serve without auth")

    def allows(self, authorization: str) -> bool:
        """True when ``Authorization: Bearer <key>`` carries a configured key."""
        now = time.monotonic()
        if self._path is not None and now - self._checked >= self._recheck_s:
            self._checked = now
            self._reload()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in (*self._static, *self._from_file):  # every key compared: no early exit
            ok |= hmac.compare_digest(given, key)
        return ok
