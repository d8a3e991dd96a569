"""A real headless Chromium for tests, driven through tests/browser/driver.mjs (puppeteer-core).

The driver reads one JSON command per line and answers each with one line; `Browser` sends
them and waits for the answers, so a test reads like a script: open, type, click, wait.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.procs import LOGS

BROWSER_DIR = Path(__file__).parent / "browser"
PACKAGES = ("puppeteer-core", "@sparticuz/chromium")


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def install() -> None:
    """`npm ci` in tests/browser (pinned by its package-lock.json) unless already installed."""
    if all((BROWSER_DIR / "node_modules" / name).is_dir() for name in PACKAGES):
        return
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=BROWSER_DIR,
        check=True,
        timeout=300,
        capture_output=True,
    )


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self) -> None:
        LOGS.mkdir(exist_ok=True)
        self._log = (LOGS / "chromium.log").open("ab")
        self._proc = subprocess.Popen(
            ["node", str(BROWSER_DIR / "driver.mjs")],
            cwd=BROWSER_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next = 0
        self.version = json.loads(self._line(60))["ready"]

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(f"the browser driver said nothing for {timeout} s") from None
        if line is None:
            raise BrowserError("the browser driver exited (see tests/.logs/chromium.log)")
        return line

    def call(self, op: str, **args: Any) -> Any:
        self._next += 1
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"id": self._next, "op": op, **args}) + "\n")
        self._proc.stdin.flush()
        return self._answer(30)

    def _answer(self, timeout: float) -> Any:
        while True:
            answer = json.loads(self._line(timeout))
            if answer.get("id") == self._next:
                break
        if not answer["ok"]:
            raise BrowserError(answer["error"])
        return answer["value"]

    # What tests use.

    def open(self, url: str, **options: Any) -> str:
        """A fresh context (empty storage) with one page at `url`; `dark`, `width`, `height`,
        `mobile` set how it is shown."""
        return str(self.call("open", url=url, **options))

    def eval(self, expr: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        return self.call("eval", expr=expr)

    def wait(self, expr: str, timeout: float = 20) -> Any:
        """Waits until the expression is truthy in the page; returns its value."""
        # `timeout` is both the driver's (ms, in the command) and ours (s, a little longer).
        self._next += 1
        assert self._proc.stdin is not None
        command = {"id": self._next, "op": "wait", "expr": expr, "timeout": int(timeout * 1000)}
        self._proc.stdin.write(json.dumps(command) + "\n")
        self._proc.stdin.flush()
        return self._answer(timeout + 10)

    def text(self, testid: str) -> str:
        return str(self.eval(f"document.querySelector('[data-testid=\"{testid}\"]').innerText"))

    def type(self, testid: str, text: str) -> None:
        self.call("type", testid=testid, text=text)

    def click(self, testid: str) -> None:
        self.call("click", testid=testid)

    def press(self, key: str, *, shift: bool = False) -> None:
        self.call("press", key=key, shift=shift)

    def focused(self) -> str | None:
        """The `data-testid` of the element with the focus."""
        value = self.call("focused")
        return None if value is None else str(value)

    def reload(self) -> None:
        self.call("reload")

    def offline(self, on: bool) -> None:
        self.call("offline", on=on)

    def emulate(self, *, dark: bool) -> None:
        self.call("emulate", dark=dark)

    def grant_clipboard(self, origin: str) -> None:
        self.call("grantClipboard", origin=origin)

    def screenshot(self, path: Path) -> None:
        self.call("screenshot", path=str(path))

    def problems(self) -> list[str]:
        """Console errors and uncaught exceptions of the open page."""
        return [str(p) for p in self.call("problems")]

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()
