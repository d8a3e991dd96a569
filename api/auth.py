"""Who is asking: API keys (`Authorization: Bearer <key>`), and what each key may do.

Authentication is on when `SLUICE_API_KEYS` lists keys or `SLUICE_AUTH=required`; off, every
request is `ANONYMOUS` (one key, with the default limits). Named keys live in Redis (see
shared/keys.py); each API process remembers a lookup for `CACHE_S`, so a revoked key stops
working everywhere within that, and a flood of wrong keys costs Redis one lookup a second each.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from shared.errors import InvalidApiKey, RateLimited
from shared.keys import (
    ANONYMOUS,
    KEY_HASHES_KEY,
    KEY_USED_KEY,
    KEYS_KEY,
    KeyRecord,
    Limits,
    key_hash,
    match_static,
)
from shared.scripts import lua
from shared.settings import Settings

RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
]
CACHE_S = 1.0
CACHE_ENTRIES = 10_000
USED_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    limits: Limits
    """Resolved: 0 where there is no limit."""


@dataclass(frozen=True, slots=True)
class KeyUse:
    """A key's use of its windows once a request is admitted: for the x-ratelimit headers."""

    limits: Limits
    requests: int
    tokens: int
    reset_ms: int

    def headers(self) -> dict[str, str]:
        return limit_headers(self.limits, self.requests, self.tokens, self.reset_ms)


def limit_headers(limits: Limits, requests: int, tokens: int, reset_ms: int) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the limits that apply."""
    headers = {}
    for kind, limit, used in (("requests", limits.rpm, requests), ("tokens", limits.tpm, tokens)):
        if limit:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
            headers[f"x-ratelimit-reset-{kind}"] = duration(reset_ms)
    return headers


def duration(ms: int) -> str:
    """As OpenAI writes them: `20ms`, `1s`, `6m0s`."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


def rate_limited(limit: str, limits: Limits, wait_ms: int) -> RateLimited:
    """The 429 for a key at `limit` (`requests`, `tokens` or `streams`); its headers say that
    limit is spent until `wait_ms` from now."""
    maximum, what = {
        "requests": (limits.rpm, "requests per minute"),
        "tokens": (limits.tpm, "generated tokens per minute"),
        "streams": (limits.max_streams, "concurrent streams"),
    }[limit]
    spent = Limits(limits.rpm if limit == "requests" else 0, limits.tpm if limit == "tokens" else 0)
    return RateLimited(
        f"Rate limit reached: {maximum} {what} for this API key. Try again in {duration(wait_ms)}.",
        retry_after_s=max(1, math.ceil(wait_ms / 1000)),
        limit_headers=limit_headers(spent, spent.rpm or 0, spent.tpm or 0, wait_ms),
    )


class Authenticator:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._static = settings.static_api_keys
        self.enabled = settings.auth_enabled
        self._defaults = Limits(
            settings.rate_limit_rpm or 0,
            settings.rate_limit_tpm or 0,
            settings.max_streams_per_key or 0,
        )
        self._lookup = redis.register_script(lua("key_lookup"))
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._used: dict[str, float] = {}

    async def principal(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return Principal(ANONYMOUS, self._defaults)
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise InvalidApiKey(
                "You didn't provide an API key: send `Authorization: Bearer <key>`."
            )
        if name := match_static(key, self._static):
            return Principal(name, self._defaults)
        record = await self._record(key_hash(key))
        if record is None:
            raise InvalidApiKey("Incorrect API key provided.")
        await self._note_use(record.name)
        return Principal(record.name, record.limits.over(self._defaults))

    async def _record(self, digest: str) -> KeyRecord | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self._lookup(keys=[KEY_HASHES_KEY, KEYS_KEY], args=[digest])
        record = KeyRecord.from_json(found[0].decode(), found[1]) if found else None
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache.clear()
        self._cache[digest] = (now + CACHE_S, record)
        return record

    async def _note_use(self, name: str) -> None:
        now = time.monotonic()
        if now - self._used.get(name, -USED_EVERY_S) >= USED_EVERY_S:
            self._used[name] = now
            await self._redis.hset(KEY_USED_KEY, name, str(int(time.time())))  # type: ignore[misc]


async def authenticate(request: Request) -> Principal:
    """The caller of a `/v1/*` route: 401 `invalid_api_key` when auth is on and the key is
    missing, malformed or unknown."""
    authenticator: Authenticator = request.app.state.authenticator
    principal = await authenticator.principal(request.headers.get("authorization"))
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]
