"""What can go wrong in a transfer, and the exit code each failure maps to.

Exit codes of `stashcp` (documented in docs/stashcp.md):

====  =========================================================================
0     every object was transferred and verified
2     usage or configuration error (bad option, no director configured, an upload
      to a namespace that has no http(s) origin)
10    not found: the object (or its namespace) does not exist — permanent
11    authorization: no token, expired token, or a scope that does not cover the
      object — permanent until a new token is supplied
12    transfer failure, retryable: caches and origin unreachable, overloaded,
      stalled, short or corrupted transfers — trying again later may succeed
13    transfer failure, permanent: the request can never succeed as given (a local
      file cannot be written or read, a malformed request, an internal error)
====  =========================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 10
EXIT_AUTH = 11
EXIT_RETRYABLE = 12
EXIT_PERMANENT = 13


class StashError(Exception):
    """A failure concerning one object: `str()` is one line naming it and the cause."""

    kind = "transfer"
    exit_code = EXIT_PERMANENT
    retryable = False

    def __init__(
        self,
        obj: str,
        cause: str,
        *,
        server: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{obj}: {cause}")
        self.obj = obj
        self.cause = cause
        self.server = server
        self.status = status
        self.retry_after = retry_after

    def with_object(self, obj: str) -> StashError:
        """The same failure, reported for the object the user named."""
        err = type(self)(
            obj, self.cause, server=self.server, status=self.status, retry_after=self.retry_after
        )
        return err


class UsageError(StashError):
    kind = "usage"
    exit_code = EXIT_USAGE


class NotFound(StashError):
    kind = "not_found"
    exit_code = EXIT_NOT_FOUND


class AuthError(StashError):
    kind = "authorization"
    exit_code = EXIT_AUTH


class Retryable(StashError):
    """A server or the network failed; another source, or later, may succeed."""

    kind = "transfer"
    exit_code = EXIT_RETRYABLE
    retryable = True


class Stalled(Retryable):
    kind = "stalled"


class ChecksumMismatch(Retryable):
    kind = "checksum"


class Permanent(StashError):
    kind = "transfer"
    exit_code = EXIT_PERMANENT


class LocalError(Permanent):
    """The local side failed (destination not writable, source unreadable, disk full)."""

    kind = "local"
