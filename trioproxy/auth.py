"""Client keys and per-key limits [sans-IO].

Keys are compared by their SHA-256 digest: the table holds digests only (from
``key_sha256`` in the profile, or hashed at start from the environment variable
``key_env`` names), so a key is never kept, logged or recorded; the usage record
names the key's ``id``. Looking a digest up in a dict leaks nothing useful about
a key by timing, since the digest of a guess says nothing about the real key.

Limits per key: ``max_concurrent`` requests in flight, and ``requests_per_minute``
as a token bucket (bursts up to a minute's worth, refilled continuously). Time is
passed in, never read here.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping

from attrs import define, field, frozen

from .config import Admin, Auth, AuthKey
from .errors import AuthError, ConfigError, RateLimited

BEARER = b"bearer "


def digest(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


@frozen
class KeyTable:
    """Who a bearer key belongs to."""

    by_digest: Mapping[str, AuthKey]

    @classmethod
    def from_config(cls, auth: Auth, environ: Mapping[str, str] = os.environ) -> KeyTable:
        """Raises: ConfigError: a key_env names an unset variable."""
        table: dict[str, AuthKey] = {}
        missing = []
        for key in auth.keys:
            if key.key_sha256 is not None:
                table[key.key_sha256.lower()] = key
            elif key.key_env is not None:
                value = environ.get(key.key_env)
                if not value:
                    missing.append(f"$.auth.keys: key {key.id!r}: environment variable {key.key_env} is not set")
                else:
                    table[digest(value)] = key
        if missing:
            raise ConfigError(missing)
        return cls(by_digest=table)

    @property
    def enabled(self) -> bool:
        return bool(self.by_digest)

    def identify(self, authorization: bytes | None) -> AuthKey:
        """The key behind an ``Authorization: Bearer ...`` header.

        Raises:
            AuthError: no header, not a bearer key, or an unknown key.
        """
        if not authorization:
            raise AuthError("Missing API key: send 'Authorization: Bearer <key>'.")
        if authorization[: len(BEARER)].lower() != BEARER:
            raise AuthError("Expected 'Authorization: Bearer <key>'.")
        key = self.by_digest.get(digest(authorization[len(BEARER) :].strip()))
        if key is None:
            raise AuthError("Incorrect API key provided.")
        return key


#: Clients that may use the admin endpoints without a key: the machine's own operator.
LOOPBACK = frozenset({"127.0.0.1", "::1"})


@frozen
class AdminGate:
    """Loopback clients, or any client with the admin key (compared by SHA-256)."""

    digest: str | None = None

    @classmethod
    def from_config(cls, admin: Admin, environ: Mapping[str, str] = os.environ) -> AdminGate:
        """Raises: ConfigError: ``key_env`` names an unset variable."""
        if admin.key_sha256 is not None:
            return cls(digest=admin.key_sha256.lower())
        if admin.key_env is not None:
            value = environ.get(admin.key_env)
            if not value:
                raise ConfigError([f"$.admin.key_env: environment variable {admin.key_env} is not set"])
            return cls(digest=digest(value))
        return cls()

    def allows(self, client: str | None, authorization: bytes | None) -> bool:
        if client in LOOPBACK:
            return True
        if self.digest is None or not authorization or authorization[: len(BEARER)].lower() != BEARER:
            return False
        return digest(authorization[len(BEARER) :].strip()) == self.digest


def same_origin(origin: bytes | None, host: bytes | None) -> bool:
    """Whether a request's ``Origin`` (sent by browsers) is the gateway's own, or absent (any other client).

    A web page open in the operator's browser may otherwise reach the loopback-only admin
    surfaces (the live feed's WebSocket, whose handshake no same-origin rule guards, and a
    POST to ``/_/reload``): the browser runs on loopback too.
    """
    if origin is None:
        return True
    scheme, sep, authority = origin.partition(b"://")
    return bool(sep) and scheme.lower() in (b"http", b"https") and host is not None and authority.lower() == host.lower()


@define
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0


@define
class KeyLimiter:
    """Per-key request rate and concurrency."""

    _buckets: dict[str, _Bucket] = field(factory=dict)

    def admit(self, key: AuthKey, now: float) -> None:
        """Count one request in for ``key``; pair with ``release``.

        Raises:
            RateLimited: over the key's concurrency or rate, with the seconds to wait.
        """
        rate = key.requests_per_minute
        bucket = self._buckets.get(key.id)
        if bucket is None:
            bucket = self._buckets[key.id] = _Bucket(tokens=float(rate), stamp=now)
        if key.max_concurrent and bucket.in_flight >= key.max_concurrent:
            raise RateLimited(f"key {key.id!r} has {key.max_concurrent} requests in flight already (its limit)")
        if rate:
            bucket.tokens = min(float(rate), bucket.tokens + (now - bucket.stamp) * rate / 60)
            bucket.stamp = now
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) * 60 / rate
                raise RateLimited(
                    f"key {key.id!r} is over its limit of {rate} requests per minute", retry_after_s=math.ceil(wait)
                )
            bucket.tokens -= 1
        bucket.in_flight += 1

    def release(self, key: AuthKey) -> None:
        bucket = self._buckets.get(key.id)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1
