"""API keys: static ones from `SLUICE_API_KEYS`, and named ones managed at run time in Redis.

A named key is stored only as its SHA-256 (`KEY_HASHES_KEY`: hash -> name) beside its record
(`KEYS_KEY`: name -> JSON with its limits and creation time); the key itself is shown once, by
`sluice keys create`. Presented keys are hashed and looked up, so no stored secret is ever
compared; static keys are compared in constant time. A key never appears in a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass

from redis import Redis as SyncRedis

from shared.protocol import PREFIX
from shared.scripts import lua

KEYS_KEY = PREFIX + "keys"
"""Hash: key name -> its record (JSON: `KeyRecord` less the name)."""
KEY_HASHES_KEY = PREFIX + "key-hashes"
"""Hash: SHA-256 of a key (hex) -> its name."""
KEY_USED_KEY = PREFIX + "key-used"
"""Hash: key name -> when it was last used (unix seconds, refreshed at most once a minute)."""
ANONYMOUS = "anonymous"
"""Who every request is while authentication is off."""
KEY_PREFIX = "sk-sluice-"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-key limits; None: the deployment's default (`SLUICE_RATE_LIMIT_*`), 0: none."""

    rpm: int | None = None
    tpm: int | None = None
    max_streams: int | None = None

    def over(self, defaults: Limits) -> Limits:
        """These limits, with `defaults` where these say nothing."""
        return Limits(
            defaults.rpm if self.rpm is None else self.rpm,
            defaults.tpm if self.tpm is None else self.tpm,
            defaults.max_streams if self.max_streams is None else self.max_streams,
        )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    limits: Limits
    created: int

    def to_json(self) -> str:
        return json.dumps({"limits": asdict(self.limits), "created": self.created})

    @classmethod
    def from_json(cls, name: str, raw: str | bytes) -> KeyRecord:
        data = json.loads(raw)
        return cls(name, Limits(**data["limits"]), int(data["created"]))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def static_key_name(key: str) -> str:
    """A static key's name: a fingerprint that identifies it in logs without revealing it."""
    return "static-" + key_hash(key)[:8]


def match_static(presented: str, keys: list[str]) -> str | None:
    """The name of the static key `presented` is, comparing each in constant time."""
    found = None
    for key in keys:
        if hmac.compare_digest(presented.encode(), key.encode()):
            found = static_key_name(key)
    return found


def new_record(name: str, limits: Limits) -> KeyRecord:
    return KeyRecord(name, limits, int(time.time()))


class KeyExists(ValueError):
    """`sluice keys create` for a name that is taken."""


class UnknownKey(LookupError):
    """`sluice keys revoke` for a name no key has."""


def create_key(redis: SyncRedis, name: str, limits: Limits) -> str:
    """A new key named `name`, stored hashed; the key itself is returned once, never stored."""
    key = new_key()
    record = new_record(name, limits)
    digest, record_json = key_hash(key), record.to_json()
    created = redis.eval(lua("key_create"), 2, KEYS_KEY, KEY_HASHES_KEY, name, digest, record_json)
    if not created:
        raise KeyExists(f"a key named {name!r} exists; revoke it first")
    return key


def list_keys(redis: SyncRedis) -> list[tuple[KeyRecord, int | None]]:
    """Every named key with when it was last used (unix seconds), by name."""
    # (redis-py types its sync and async hash commands alike, as "Awaitable | value".)
    records: dict[bytes, bytes] = redis.hgetall(KEYS_KEY)  # type: ignore[assignment]
    used: dict[bytes, bytes] = redis.hgetall(KEY_USED_KEY)  # type: ignore[assignment]
    return [
        (KeyRecord.from_json(name.decode(), raw), int(used[name]) if name in used else None)
        for name, raw in sorted(records.items())
    ]


def revoke_key(redis: SyncRedis, name: str) -> None:
    if not redis.eval(lua("key_revoke"), 3, KEYS_KEY, KEY_HASHES_KEY, KEY_USED_KEY, name):
        raise UnknownKey(f"no key named {name!r}")
