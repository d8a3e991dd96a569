"""The deployment as Redis sees it, in one round trip: for `/metrics` gauges and `sluice status`."""

from __future__ import annotations

from dataclasses import dataclass

from shared.arq_internals import in_progress_key
from shared.protocol import (
    ACTIVE_KEY,
    QUEUE_NAME,
    REDIS_NOW_LUA,
    TOKENS_KEY,
    WINDOW_LUA,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    WORKER_SLOTS_KEY,
    WORKERS_KEY,
)

# KEYS: queue, workers, worker slots, worker busy, worker loops, active streams, tokens.
# ARGV: worker TTL (ms), in-progress key prefix.
# Returns {queued, running, open streams, tokens in the last minute, then per live worker:
# id, ms since its heartbeat, slots, busy, failing loops}.
STATUS_SCRIPT = (
    REDIS_NOW_LUA
    + WINDOW_LUA
    + """
local now = redis_now_ms()
local queued, running = 0, 0
for _, job in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', ARGV[2] .. job) == 1 then running = running + 1
  else queued = queued + 1 end
end
local out = {queued, running, redis.call('ZCARD', KEYS[6]), math.floor(window_used(KEYS[7], now))}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local id = live[i]
  table.insert(out, id)
  table.insert(out, now - tonumber(live[i + 1]))
  table.insert(out, tonumber(redis.call('HGET', KEYS[3], id)) or 1)
  table.insert(out, tonumber(redis.call('HGET', KEYS[4], id)) or 0)
  table.insert(out, redis.call('HGET', KEYS[5], id) or '')
end
return out
"""
)
STATUS_KEYS = [
    QUEUE_NAME,
    WORKERS_KEY,
    WORKER_SLOTS_KEY,
    WORKER_BUSY_KEY,
    WORKER_LOOPS_KEY,
    ACTIVE_KEY,
    TOKENS_KEY,
]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    id: str
    heartbeat_age_ms: int
    slots: int
    busy: int
    failing_loops: str


@dataclass(frozen=True, slots=True)
class Status:
    queued: int
    running: int
    open_streams: int
    tokens_last_minute: int
    workers: list[WorkerStatus]

    @property
    def slots(self) -> int:
        return sum(w.slots for w in self.workers)

    @classmethod
    def from_reply(cls, reply: list[int | bytes]) -> Status:
        queued, running, streams, tokens, *rest = reply
        workers = [
            WorkerStatus(
                _text(rest[i]),
                int(rest[i + 1]),
                int(rest[i + 2]),
                int(rest[i + 3]),
                _text(rest[i + 4]),
            )
            for i in range(0, len(rest), 5)
        ]
        return cls(int(queued), int(running), int(streams), int(tokens), workers)

    def render(self, model: str) -> str:
        """One screen for a person at a terminal."""
        lines = [
            f"model {model}",
            f"  queue      {self.queued} waiting, {self.running} running",
            f"  streams    {self.open_streams} open",
            f"  tokens/s   {self.tokens_last_minute / 60:.1f} over the last minute",
            f"  workers    {len(self.workers)} live, {self.slots} slots",
        ]
        for w in sorted(self.workers, key=lambda w: w.id):
            loops = f"  failing loops: {w.failing_loops}" if w.failing_loops else ""
            lines.append(
                f"    {w.id:<40} {w.busy}/{w.slots} busy  beat {w.heartbeat_age_ms} ms ago{loops}"
            )
        return "\n".join(lines)


def status_args(heartbeat_ttl_ms: int) -> list[int | str]:
    return [heartbeat_ttl_ms, in_progress_key("")]


def _text(value: int | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
