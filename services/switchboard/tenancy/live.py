"""`LiveTenants`: the live tenants, reloaded when the tenants file changes.

The file is typically a Kubernetes Secret volume. The kubelet never rewrites
a file in place: it writes a new timestamped directory and atomically swaps
the `..data` symlink, so `tenants.yaml -> ..data/tenants.yaml` suddenly
resolves elsewhere. Each check therefore resolves the path first and compares
the resolved target's identity (path, device, inode, size, mtime); only when
that changed is the file read, and only when its SHA-256 changed is it parsed.
A file modified in the last few seconds is read on every check until it
settles (git's "racy clean" rule), so two edits within one mtime tick that
keep the size are not missed.

Call order: build it at start (a bad file raises `ConfigError`), read
`current` whenever a tenant is needed, and run `watch()` as a task (or call
`reload()` to check now). A new file that fails its checks is logged as one line and ignored:
the previous directory stays in force until a good file arrives.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from switchboard.config import ConfigError, Env
from switchboard.tenancy.directory import (
    TENANT_KEYS_VARIABLE,
    TenantDirectory,
    environment_upstream,
)

TENANTS_FILE_VARIABLE = "SWITCHBOARD_TENANTS_FILE"
DEFAULT_INTERVAL_S = 1.0
# A file modified this recently may change again within the same mtime tick
# without its size changing; it is hashed on every check until it settles.
RACY_S = 2.0

log = logging.getLogger(__name__)

Subscriber = Callable[[TenantDirectory], None]
_Identity = tuple[str, int, int, int, int]


class LiveTenants:
    """The current `TenantDirectory`, replaced when the tenants file changes.

    Attributes:
        path: the configured path (None for a fixed directory).
        version: 1 at start, +1 on every reload that installed a new directory;
            caches derived from `current` can compare it to know they are stale.
    """

    path: Path | None
    version: int
    _directory: TenantDirectory
    _identity_seen: _Identity | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        environ: Mapping[str, str] | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        """Load the tenants file at `path`.

        Args:
            path: the file; symlinks are resolved on every check.
            environ: where `api_key_env` variables are read; os.environ if None.
                Variables are read again on each reload, but a process's
                environment is fixed at start: a new variable needs a restart.
            interval_s: `watch` checks the file this often.

        Raises:
            ConfigError: the file is missing or invalid (one line, no secrets).
        """
        self._setup(Path(path), environ, interval_s)
        try:
            identity = self._identity()
            content = Path(identity[0]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the tenants file ({_reason(exc)})") from None
        self._directory = TenantDirectory.from_bytes(content, str(path), environ)
        self._identity_seen = _settled(identity)
        self._digest = hashlib.sha256(content).hexdigest()

    @classmethod
    def fixed(cls, directory: TenantDirectory) -> LiveTenants:
        """A holder of a directory that never changes (no file to watch)."""
        self = cls.__new__(cls)
        self._setup(None, None, DEFAULT_INTERVAL_S)
        self._directory = directory
        return self

    def _setup(
        self,
        path: Path | None,
        environ: Mapping[str, str] | None,
        interval_s: float,
    ) -> None:
        self.path = path
        self.version = 1
        self._environ = environ
        self._interval_s = interval_s
        self._subscribers: list[Subscriber] = []
        self._identity_seen = None
        self._digest = ""
        # The last problem logged, so a bad file is reported once, not every second.
        self._rejected: str | None = None

    @property
    def current(self) -> TenantDirectory:
        """The directory in force; a new object after each successful reload."""
        return self._directory

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(directory)` after each successful reload.

        Callbacks run in the thread that reloads (the event loop for `watch`)
        and must not block; an exception in one is logged and ignored.

        Returns:
            A function that unsubscribes the callback.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def reload(self) -> bool:
        """Check the file now and install it if it changed and is valid.

        Never raises for a missing, unreadable or invalid file: that is logged
        (once per distinct problem) and the current directory stays.

        Returns:
            True when a new directory was installed.
        """
        if self.path is None:
            return False
        try:
            identity, content = self._read_if_changed()
        except OSError as exc:
            self._reject(f"{self.path}: cannot read the tenants file ({_reason(exc)})")
            return False
        if content is None:
            return False
        self._identity_seen = _settled(identity)
        digest = hashlib.sha256(content).hexdigest()
        if digest == self._digest:
            self._rejected = None
            return False
        try:
            directory = TenantDirectory.from_bytes(content, str(self.path), self._environ)
        except ConfigError as exc:
            self._reject(str(exc))
            return False
        self._digest = digest
        self._rejected = None
        self._directory = directory
        self.version += 1
        log.info(
            "tenants reloaded",
            extra={"tenants": len(directory), "version": self.version, "path": str(self.path)},
        )
        for callback in list(self._subscribers):
            try:
                callback(directory)
            except Exception:
                log.exception("tenants subscriber failed", extra={"version": self.version})
        return True

    async def watch(self, interval_s: float | None = None) -> None:
        """Check the file every `interval_s` (default: the configured interval) until cancelled.

        Returns at once for a fixed directory.
        """
        if self.path is None:
            return
        interval = self._interval_s if interval_s is None else interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                # A stat and, rarely, reading a few KB from a local volume: no
                # worth a thread hop, and subscribers then run on the loop.
                self.reload()
            except Exception:
                log.exception("tenants reload failed", extra={"path": str(self.path)})

    def _read_if_changed(self) -> tuple[_Identity, bytes | None]:
        """The resolved file's identity, and its bytes unless the identity is the one seen."""
        try:
            return self._read_once()
        except OSError:
            # The kubelet may have deleted the directory we had just resolved
            # into: resolve once more before calling the file unreadable.
            return self._read_once()

    def _read_once(self) -> tuple[_Identity, bytes | None]:
        identity = self._identity()
        if identity == self._identity_seen:
            return identity, None
        return identity, Path(identity[0]).read_bytes()

    def _identity(self) -> _Identity:
        assert self.path is not None
        resolved = os.path.realpath(self.path)
        stat = os.stat(resolved)
        return (resolved, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def _reject(self, line: str) -> None:
        if line != self._rejected:
            self._rejected = line
            log.error(
                "tenants file rejected, previous tenants kept",
                extra={"error": line, "version": self.version, "path": str(self.path)},
            )


def load_tenants(
    environ: Mapping[str, str] | None = None, *, interval_s: float = DEFAULT_INTERVAL_S
) -> LiveTenants:
    """The tenants a service starts with, from its environment.

    In order:
    1. `SWITCHBOARD_TENANTS_FILE`: the tenants file, watched for changes
       (`SWITCHBOARD_TENANT_KEYS` is then ignored, with a warning).
    2. `SWITCHBOARD_TENANT_KEYS` (`tenant=sha256hex,...`): development tenants
       that may use every model and built-in, without limits.
    3. Neither: no tenants (every API key is refused), with a warning.

    Raises:
        ConfigError: the file or the variable is invalid (one line, no secrets).
    """
    env = Env(environ)
    path = env.optional(TENANTS_FILE_VARIABLE)
    spec = env.optional(TENANT_KEYS_VARIABLE)
    if path is not None:
        if spec is not None:
            log.warning(
                "SWITCHBOARD_TENANT_KEYS ignored: SWITCHBOARD_TENANTS_FILE is set",
                extra={"path": path},
            )
        return LiveTenants(path, environ, interval_s=interval_s)
    if spec is not None:
        return LiveTenants.fixed(TenantDirectory.from_key_spec(spec, environ))
    log.warning("no tenants configured: set SWITCHBOARD_TENANTS_FILE; every API key is refused")
    return LiveTenants.fixed(
        TenantDirectory(tenants={}, upstreams={"default": environment_upstream(environ)})
    )


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _settled(identity: _Identity) -> _Identity | None:
    """`identity`, or None while the file is too fresh to trust its mtime (racy-git rule)."""
    modified_s = identity[4] / 1e9
    return identity if time.time() - modified_s > RACY_S else None
