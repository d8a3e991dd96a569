"""The playground (`GET /`), in a real headless Chromium against real `sluice api` and
`sluice worker` processes: chat, status and figures, Markdown as text, API keys, errors, and
answers that survive a reload, a dropped network and a killed API process.

One browser serves the module (tests/chromium.py drives it through puppeteer-core); each test
opens the page in a fresh context, so storage never leaks from one to the next.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api.routes.playground import ASSETS
from tests.chromium import Browser, install, node_available
from tests.procs import (
    RedisServer,
    Stack,
    free_port,
    sluice_env,
    start_api,
    start_stack,
)
from tests.sse import SSEResult, parse_sse

ROOT = Path(__file__).parents[1]
PAGE_JS = ROOT / "api" / "playground"
DOCS = ROOT / "docs"
RATE = "30"  # tokens/s: an answer takes about 3 s, time to reload, stop or kill in the middle
KEY = "sk-playground-test"
CHAT_STORE = "sluice.playground.chat"


STATUS = "document.querySelector('[data-testid=status]').textContent"


def status_is(*states: str) -> str:
    """A page expression: the status line reads one of `states`."""
    return f"{json.dumps(list(states))}.includes({STATUS})"


DONE = status_is("done")
STATUS_IS_ERROR = "document.querySelector('[data-testid=status]').textContent.startsWith('error')"
MODELS_LISTED = "document.querySelectorAll('[data-testid=model] option').length > 0"
OUTPUT_TEXT = "(document.querySelector('[data-testid=output]')?.innerText ?? '')"
STORED_ANSWER = f"JSON.parse(sessionStorage.getItem('{CHAT_STORE}')).turns.at(-1)"
PROMPT_VALUE = "document.querySelector('[data-testid=prompt]').value"
STREAM_ID = "document.querySelector('[data-testid=output]').closest('article').dataset.streamId"


def squeeze(text: str) -> str:
    return " ".join(text.split())


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not node_available():
        pytest.skip("Node.js is not installed")
    install()
    chromium = Browser()
    yield chromium
    chromium.close()


def fresh(redis_server: RedisServer, db: int, name: str, workers: int, **settings: str) -> Stack:
    return start_stack(name, redis_server.fresh_url(db), workers, backend="synthetic", **settings)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    """API + one worker. A stream nobody reads keeps generating for 30 s: a Stop that only hung
    up would let the answer finish, where one that cancels ends it at once."""
    running = fresh(
        redis_server, 5, "playground", 1, synthetic_tokens_per_s=RATE, resume_grace_s="30"
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed(redis_server: RedisServer) -> Iterator[Stack]:
    """Authentication on: a static key, and keys made by `sluice keys create`."""
    running = fresh(
        redis_server, 7, "playground-keys", 1, api_keys=KEY, synthetic_tokens_per_s="200"
    )
    yield running
    running.stop()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Browser]:
    """The page on `stack`, models listed; at the end, no console error was logged."""
    browser.open(f"{stack.base_url}/")
    browser.wait(MODELS_LISTED)
    yield browser
    assert browser.problems() == []


def ask(browser: Browser, prompt: str) -> None:
    """Types the prompt and sends it with Enter."""
    browser.type("prompt", prompt)
    browser.press("Enter")


def fill_prompt(browser: Browser, text: str) -> None:
    """Puts several lines in the prompt at once (typed, each Enter would send)."""
    browser.eval(f"document.querySelector('[data-testid=prompt]').value = {json.dumps(text)}")


def read_stream(base_url: str, stream_id: str, key: str | None = None) -> SSEResult:
    """The whole stream as the API replays it (from its first entry)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"{base_url}/v1/streams/{stream_id}"
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        lines = list(response.iter_lines())
        events, comments = parse_sse(lines)
        return SSEResult(response.status_code, response.headers, events, comments)


def assert_same_answer_once(browser: Browser, base_url: str, key: str | None = None) -> str:
    """The page's answer is the stream's text, exactly: nothing missing, nothing twice."""
    stream_id = str(browser.eval(STREAM_ID))
    replay = read_stream(base_url, stream_id, key)
    assert replay.status == 200
    assert not replay.errors
    assert browser.eval(f"{STORED_ANSWER}.content") == replay.text
    assert squeeze(browser.text("output")) == squeeze(replay.text)
    return stream_id


# ---- a tiny round-robin HTTP proxy ---------------------------------------------------------


@dataclass
class Forwarded:
    """A request the proxy forwarded, and where."""

    line: str
    headers: dict[str, str]
    body: bytes
    port: int


class RoundRobinProxy:
    """HTTP/1.1 on loopback in front of several API processes: each connection carries one
    request, sent to the next upstream that accepts a connection; the response streams back
    as it comes. `cut()` drops every open connection and refuses new ones, as a network that
    goes away would; `restore()` brings it back. It runs its own event loop in a thread."""

    def __init__(self, *upstream_ports: int) -> None:
        self.upstreams = list(upstream_ports)
        self.forwarded: list[Forwarded] = []
        self.refusing = False
        self._turn = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def requests(self, method: str, path_prefix: str) -> list[Forwarded]:
        """The requests `method path_prefix…` forwarded, in order."""
        return [r for r in list(self.forwarded) if r.line.startswith(f"{method} {path_prefix}")]

    def cut(self) -> None:
        def drop() -> None:
            self.refusing = True
            for writer in list(self._open):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(drop)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(lambda: setattr(self, "refusing", False))

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _upstream(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in self.upstreams:
            port = self.upstreams[self._turn % len(self.upstreams)]
            self._turn += 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # that one is down: the next
            return port, reader, writer
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self._open.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *headers = head[:-4].split(b"\r\n")
            fields = {}
            for header in headers:
                name, _, value = header.decode().partition(":")
                fields[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(fields.get("content-length", 0)))
            upstream = await self._upstream()
            if upstream is None:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            port, upstream_reader, upstream_writer = upstream
            self.forwarded.append(Forwarded(request_line.decode(), fields, body, port))
            upstream_writer.write(_one_request(request_line, headers) + body)
            response_head = await upstream_reader.readuntil(b"\r\n\r\n")
            status_line, *response_headers = response_head[:-4].split(b"\r\n")
            writer.write(_one_request(status_line, response_headers))
            while chunk := await upstream_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.transport.abort()  # the upstream died mid-response: so does this one
        finally:
            self._open.discard(writer)
            if upstream_writer is not None:
                upstream_writer.transport.abort()
            writer.close()


def _one_request(first_line: bytes, headers: list[bytes]) -> bytes:
    """The head again, saying `Connection: close`: one request per connection."""
    kept = [h for h in headers if not h.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([first_line, *kept, b"Connection: close"]) + b"\r\n\r\n"


# ---- served by the API -------------------------------------------------------------------------


def test_page_and_its_files_are_served_by_the_api(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        for path in ("/", "/playground"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/html")
            assert 'data-testid="prompt"' in response.text
            policy = response.headers["content-security-policy"]
            assert "script-src 'self'" in policy
            assert "connect-src 'self'" in policy
        for name in ASSETS:
            response = client.get(f"/playground/{name}")
            assert response.status_code == 200, name
            assert response.content == (PAGE_JS / name).read_bytes()
        for missing in (
            "/playground/index.html",
            "/playground/..%2Fmain.py",
            "/playground/nope.js",
        ):
            response = client.get(missing)
            assert response.status_code == 404
            assert response.json()["error"]["type"] == "invalid_request_error"
        paths = client.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/playground")]


def test_the_page_references_nothing_but_its_own_files() -> None:
    """No CDN, no build: every URL in the page is one of the files the API serves."""
    html = (PAGE_JS / "index.html").read_text()
    referenced = set(re.findall(r'(?:src|href)="([^"]+)"', html))
    assert referenced == {f"playground/{name}" for name in ASSETS}


def test_the_page_ships_in_the_package_and_the_api_image() -> None:
    """`pip install .` (the Dockerfile's) carries every file the page serves."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "api.playground" in setuptools["packages"]
    patterns = setuptools["package-data"]["api.playground"]
    for name in ["index.html", *ASSETS]:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^COPY api api$", dockerfile, re.M)


def test_the_page_never_parses_text_as_html() -> None:
    for name in ("app.js", "markdown.js"):
        source = (PAGE_JS / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{name} uses {sink}"


def test_playground_false_serves_no_page(redis_server: RedisServer) -> None:
    env = sluice_env(redis_server.fresh_url(8), free_port(), playground="false")
    api, url = start_api("playground-off", env)
    try:
        for path in ("/", "/playground", "/playground/app.js"):
            response = httpx.get(f"{url}{path}", timeout=10)
            assert response.status_code == 404
            assert response.json()["error"]["message"] == "no such route"
    finally:
        api.stop()


# ---- in the browser ------------------------------------------------------------------------


def test_page_loads_without_errors_and_lists_the_models(page: Browser) -> None:
    options = page.eval(
        "[...document.querySelectorAll('[data-testid=model] option')].map(o => o.value)"
    )
    assert options == ["synthetic"]
    assert page.text("status") == "ready"
    assert page.focused() == "prompt"
    # Every control has a label a screen reader reads out.
    unlabelled = page.eval(
        """[...document.querySelectorAll('input, select, textarea, button')]
             .filter(e => !(e.labels?.length || e.getAttribute('aria-label')
                            || e.textContent.trim()))
             .map(e => e.id || e.outerHTML)"""
    )
    assert unlabelled == []
    assert page.problems() == []


def test_an_answer_streams_token_by_token_with_live_status_and_figures(
    page: Browser, stack: Stack
) -> None:
    page.eval(
        """(() => {
          window.seen = {texts: [], statuses: [], rates: []};
          const note = () => {
            const text = document.querySelector('[data-testid=output]')?.innerText ?? '';
            if (text !== seen.texts.at(-1)) seen.texts.push(text);
            const status = document.querySelector('[data-testid=status]').textContent;
            if (status !== seen.statuses.at(-1)) seen.statuses.push(status);
            const rate = document.querySelector('[data-testid=tokens-per-s]').textContent;
            if (status === 'generating' && rate !== seen.rates.at(-1)) seen.rates.push(rate);
          };
          new MutationObserver(note).observe(document.body,
            {subtree: true, childList: true, characterData: true});
        })()"""
    )
    # Shift+Enter is a new line, not a send.
    page.type("prompt", "first line")
    page.press("Enter", shift=True)
    page.type("prompt", "second line")
    assert page.eval(PROMPT_VALUE) == "first line\nsecond line"
    assert page.eval("document.querySelectorAll('article').length") == 0
    page.eval("document.querySelector('[data-testid=prompt]').value = ''")
    ask(page, "Explain streaming")
    assert page.focused() == "prompt"
    assert page.eval(PROMPT_VALUE) == ""
    assert page.eval("document.querySelector('[data-testid=send]').disabled")
    assert not page.eval("document.querySelector('[data-testid=stop]').disabled")
    page.wait(DONE)

    seen: dict[str, list[str]] = page.eval("window.seen")
    texts = [squeeze(t) for t in seen["texts"] if t]
    # Token by token (a relay that falls behind sends a few at once), not the answer at once.
    assert len(texts) >= 10, texts
    for shorter, longer in itertools.pairwise(texts):
        assert longer.startswith(shorter)
        assert len(longer) > len(shorter)
    assert seen["statuses"] == ["queued", "generating", "done"]
    rates = [float(r) for r in seen["rates"] if r[0].isdigit()]
    assert len(set(rates)) >= 2, rates  # updated live
    assert all(0 < r < 200 for r in rates), rates  # about 30
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", page.text("ttft"))
    assert_same_answer_once(page, stack.base_url)


def test_a_reload_mid_answer_completes_the_same_answer_once(page: Browser, stack: Stack) -> None:
    page.type("max-tokens", "4")
    ask(page, "first question")
    page.wait(DONE)
    assert page.eval(f"{STORED_ANSWER}.content") == "You asked: first question"
    assert page.eval("document.querySelector('article.assistant .note').textContent") == (
        "cut at max tokens"
    )
    page.eval("document.querySelector('[data-testid=max-tokens]').value = ''")
    page.eval(
        "document.querySelector('[data-testid=max-tokens]').dispatchEvent(new Event('input'))"
    )
    ask(page, "Tell me about queues")
    page.wait(f"{OUTPUT_TEXT}.length > 60 && {status_is('generating')}")
    before = page.eval(f"{STORED_ANSWER}.content")
    page.reload()
    # The conversation is back at once, the answer so far with it; then the rest streams in.
    assert page.eval("[...document.querySelectorAll('article')].map(a => a.className)") == [
        "turn user",
        "turn assistant",
        "turn user",
        "turn assistant",
    ]
    assert page.eval("document.querySelector('article.assistant .body').textContent") == (
        "You asked: first question"
    )
    assert page.eval("document.querySelectorAll('article.user .text')[1].textContent") == (
        "Tell me about queues"
    )
    assert page.eval(f"{STORED_ANSWER}.content").startswith(before)
    page.wait(DONE)
    text = page.eval(f"{STORED_ANSWER}.content")
    assert len(before) < len(text)  # it was cut mid-answer
    assert_same_answer_once(page, stack.base_url)
    assert page.eval(f"JSON.parse(sessionStorage.getItem('{CHAT_STORE}')).open") is None


def test_the_network_going_away_and_back_resumes_the_answer_once(
    browser: Browser, stack: Stack
) -> None:
    proxy = RoundRobinProxy(stack.port)
    try:
        browser.open(f"{proxy.url}/")
        browser.wait(MODELS_LISTED)
        browser.type("system", "Be brief.")
        browser.type("temperature", "0.2")
        browser.type("max-tokens", "500")
        ask(browser, "Tell me about networks")
        browser.wait(f"{OUTPUT_TEXT}.length > 60")
        browser.offline(True)
        proxy.cut()  # the open connection dies, and nothing gets through until it is back
        browser.wait(status_is("offline: waiting for the network"), timeout=5)
        stored = browser.eval(f"JSON.parse(sessionStorage.getItem('{CHAT_STORE}'))")
        cut_at = len(stored["turns"][-1]["content"])
        time.sleep(1)
        proxy.restore()
        browser.offline(False)
        # Back at once on `online`, not after a backoff: offline, the page waits for it.
        browser.wait(f"{STORED_ANSWER}.content.length > {cut_at}", timeout=3)
        browser.wait(DONE)
        assert_same_answer_once(browser, stack.base_url)
        (resumed, *_) = proxy.requests("GET", "/v1/streams/")
        assert resumed.headers["last-event-id"] == stored["open"]["lastEventId"]
        (sent,) = proxy.requests("POST", "/v1/chat/completions")
        assert json.loads(sent.body) == {
            "model": "synthetic",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me about networks"},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.2,
            "max_tokens": 500,
        }
    finally:
        proxy.stop()


def test_stop_cancels_generation_on_the_worker(page: Browser, stack: Stack) -> None:
    ask(page, "Tell me a long story")
    page.wait(f"{OUTPUT_TEXT}.length > 40")
    page.click("stop")
    page.wait(status_is("stopped"), timeout=5)
    assert page.focused() == "prompt"
    assert not page.eval("document.querySelector('[data-testid=send]').disabled")
    stream_id = str(page.eval(STREAM_ID))
    replay = read_stream(stack.base_url, stream_id)
    # The stream was ended by the cancel, long before the answer's end: the worker stopped.
    assert [e["code"] for e in replay.errors] == ["cancelled"]
    assert not [c for c in replay.chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert page.eval(f"{STORED_ANSWER}.content") == replay.text
    assert "Every stream ends" not in replay.text
    assert page.eval("document.querySelector('article.assistant .note').textContent") == "stopped"


MARKDOWN_PROMPT = """<img src=x onerror="document.title='pwned'"> and <script>alert(1)</script>

- **one**
- two with `code`

```py
print("<b>hi</b>")
```"""


def test_answers_render_as_markdown_with_html_shown_as_text(page: Browser) -> None:
    title = page.eval("document.title")
    # Typed as one value (Enter in the prompt would send it); sent with the Send button.
    fill_prompt(page, MARKDOWN_PROMPT)
    page.click("send")
    assert page.focused() == "prompt"
    page.wait(DONE)
    output = "document.querySelector('[data-testid=output]')"
    assert page.eval(f"{output}.querySelector('p').textContent").startswith(
        "You asked: <img src=x onerror=\"document.title='pwned'\"> and <script>"
    )
    assert page.eval("document.querySelectorAll('img, script:not([src])').length") == 0
    assert page.eval("document.title") == title
    assert page.eval(f"[...{output}.querySelectorAll('ul > li')].map(li => li.textContent)") == [
        "one",
        "two with code",
    ]
    assert page.eval(f"{output}.querySelector('li strong').textContent") == "one"
    assert page.eval(f"{output}.querySelector('li code').textContent") == "code"
    assert page.eval(f"{output}.querySelector('pre code').textContent") == 'print("<b>hi</b>")'
    assert page.eval(f"{output}.querySelector('pre code').dataset.lang") == "py"
    assert page.eval("document.querySelectorAll('b').length") == 0
    # The user's own turn is text too.
    assert page.eval("document.querySelector('article.user .text').textContent") == (
        MARKDOWN_PROMPT
    )


MARKDOWN_CASES = {
    "# Title\n\ntext *em* **strong** ~~del~~": (
        "<h3>Title</h3><p>text <em>em</em> <strong>strong</strong> <del>del</del></p>"
    ),
    "[x](javascript:alert(1)) and [y](https://example.com/a_b)": (
        '<p>[x](javascript:alert(1)) and <a href="https://example.com/a_b" '
        'rel="noopener noreferrer nofollow" target="_blank">y</a></p>'
    ),
    "1. a\n2. b\n   - c\n   - d\n3. e": (
        "<ol><li>a</li><li>b<ul><li>c</li><li>d</li></ul></li><li>e</li></ol>"
    ),
    "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
    "- a\n\n- b": "<ul><li><p>a</p></li><li><p>b</p></li></ul>",
    "> quote\n> more": "<blockquote><p>quote<br>more</p></blockquote>",
    "```\nunclosed <b>": "<pre><code>unclosed &lt;b&gt;</code></pre>",
    "a_b_c and 2 * 3 * 4": "<p>a_b_c and 2 * 3 * 4</p>",
    "<b>x</b>\nnext": "<p>&lt;b&gt;x&lt;/b&gt;<br>next</p>",
    "para\n- item\n\n---": "<p>para</p><ul><li>item</li></ul><hr>",
    "`a <b> c` and ``x ` y`` and \\*not em\\*": (
        "<p><code>a &lt;b&gt; c</code> and <code>x ` y</code> and *not em*</p>"
    ),
}


def test_the_markdown_renderer_builds_elements_and_keeps_html_as_text(page: Browser) -> None:
    rendered = page.eval(
        f"""Object.fromEntries(Object.keys({json.dumps(MARKDOWN_CASES)}).map(source => {{
              const box = document.createElement('div');
              box.append(window.renderMarkdown(source));
              return [source, box.innerHTML];
            }}))"""
    )
    assert rendered == MARKDOWN_CASES


def test_a_tool_call_delta_renders_as_a_collapsible_block(page: Browser) -> None:
    for delta in (
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_<b>weather</b>", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Par'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]},
    ):
        page.eval(f"window.sluicePlayground.feedDelta({json.dumps(delta)})")
    block = (
        "document.querySelector('[data-testid=output]').closest('article')"
        ".querySelector('details[data-testid=tool-call]')"
    )
    assert page.eval(f"{block}.open") is False  # collapsed until asked
    assert page.eval(f"{block}.querySelector('summary code').textContent") == "get_<b>weather</b>"
    assert json.loads(page.eval(f"{block}.querySelector('pre').textContent")) == {"city": "Paris"}
    assert page.eval("document.querySelectorAll('b').length") == 0


def test_with_api_keys_on_the_page_asks_for_one_and_works_once_given(
    browser: Browser, keyed: Stack
) -> None:
    browser.open(f"{keyed.base_url}/")
    browser.wait(
        status_is("error: this server needs an API key: enter it under Settings → API key")
    )
    assert browser.eval("document.querySelectorAll('[data-testid=model] option').length") == 0
    ask(browser, "hello")  # without a key: refused, and the message is kept to send again
    browser.wait("document.activeElement.dataset.testid === 'api-key'")
    assert browser.text("status").startswith("error: this server needs an API key")
    assert browser.eval(PROMPT_VALUE) == "hello"

    browser.type("api-key", KEY)
    browser.press("Tab")  # the key is taken when the field is left
    browser.wait(MODELS_LISTED)
    assert browser.text("status") == "ready"
    assert browser.eval("sessionStorage.getItem('sluice.playground.key')") == KEY
    assert browser.eval("localStorage.getItem('sluice.playground.key')") is None
    browser.click("send")
    browser.wait(DONE)
    assert_same_answer_once(browser, keyed.base_url, KEY)

    browser.click("remember-key")
    assert browser.eval("localStorage.getItem('sluice.playground.key')") == KEY
    assert browser.eval("sessionStorage.getItem('sluice.playground.key')") is None


def create_key(stack: Stack, name: str, *limits: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sluice", "keys", "create", name, *limits],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_a_429_says_when_to_retry(browser: Browser, keyed: Stack) -> None:
    key = create_key(keyed, "one-a-minute", "--rpm", "1")
    browser.open(f"{keyed.base_url}/")
    browser.type("api-key", key)
    browser.press("Tab")
    browser.wait(MODELS_LISTED)
    ask(browser, "first")
    browser.wait(DONE)
    ask(browser, "second")
    browser.wait(STATUS_IS_ERROR)
    match = re.fullmatch(r"error: rate limit reached: try again in (\d+) s", browser.text("status"))
    assert match, browser.text("status")
    assert 1 <= int(match[1]) <= 60
    assert browser.eval(PROMPT_VALUE) == "second"  # kept, to send again later
    assert browser.eval("document.querySelectorAll('article.assistant').length") == 1


def test_a_503_says_no_worker_is_up(browser: Browser, redis_server: RedisServer) -> None:
    env = sluice_env(redis_server.fresh_url(9), free_port())
    api, url = start_api("playground-no-worker", env)
    try:
        browser.open(f"{url}/")
        browser.wait("document.getElementById('model-hint').textContent.includes('No worker')")
        ask(browser, "anyone there?")
        browser.wait(STATUS_IS_ERROR)
        assert browser.text("status") == (
            "error: no worker is up to serve this model: start one (sluice worker), then send again"
        )
        assert browser.eval(PROMPT_VALUE) == "anyone there?"
    finally:
        api.stop()


def test_an_api_process_killed_mid_answer_the_page_resumes_on_another(
    browser: Browser, stack: Stack
) -> None:
    first, _ = stack.add_replica()
    second, _ = stack.add_replica()
    apis = {int(p.env["SLUICE_PORT"]): p for p in (first, second)}
    proxy = RoundRobinProxy(*apis)
    try:
        browser.open(f"{proxy.url}/")
        browser.wait(MODELS_LISTED)
        ask(browser, "Tell me about failover")
        browser.wait(f"{OUTPUT_TEXT}.length > 60")
        (sent,) = proxy.requests("POST", "/v1/chat/completions")
        apis[sent.port].signal(signal.SIGKILL)
        browser.wait(DONE)
        (survivor,) = set(apis) - {sent.port}
        (resumed,) = proxy.requests("GET", "/v1/streams/")
        assert resumed.port == survivor
        assert resumed.headers["last-event-id"]
        assert_same_answer_once(browser, f"http://127.0.0.1:{survivor}")
        assert not apis[sent.port].alive()
    finally:
        proxy.stop()
        for api in apis.values():
            api.stop()


def test_keyboard_only_escape_stops_new_chat_and_copy(page: Browser, stack: Stack) -> None:
    ask(page, "hello")
    page.wait(f"{OUTPUT_TEXT}.length > 30")
    page.press("Escape")  # from the prompt, where the focus stays
    page.wait(status_is("stopped"), timeout=5)
    # Tab from the prompt reaches Send, and the Copy button of the answer is a real button.
    page.press("Tab")
    assert page.focused() == "send"
    page.grant_clipboard(stack.base_url)
    page.eval("document.querySelector('article.assistant .copy').focus()")
    page.press("Enter")
    page.wait("document.querySelector('article.assistant .copy').textContent === 'Copied'")
    assert page.eval("navigator.clipboard.readText()") == page.eval(f"{STORED_ANSWER}.content")
    page.eval("document.querySelector('[data-testid=new-chat]').focus()")
    page.press("Enter")
    assert page.eval("document.querySelectorAll('article').length") == 0
    assert page.focused() == "prompt"
    assert page.eval(f"JSON.parse(sessionStorage.getItem('{CHAT_STORE}')).turns") == []


SCREENSHOT_PROMPT = """Explain streaming APIs:

- **tokens** as the model makes them
- a `resume` after a reload

```sh
curl -N localhost:8080/v1/chat/completions
```"""
SHOTS = {
    "playground-light.png": {"dark": False, "height": 940},
    "playground-dark.png": {"dark": True, "height": 940},
    "playground-phone.png": {"dark": False, "width": 390, "height": 844, "mobile": True},
}


def test_phone_width_and_screenshots(browser: Browser, stack: Stack, tmp_path: Path) -> None:
    """Readable at a phone's width: nothing wider than the screen, the settings folded away.
    Screenshots of a finished answer (desktop light and dark, phone) land in tmp, or in docs/
    with SLUICE_UPDATE_SCREENSHOTS=1 (README shows them)."""
    out = DOCS if os.environ.get("SLUICE_UPDATE_SCREENSHOTS") == "1" else tmp_path
    for name, options in SHOTS.items():
        browser.open(f"{stack.base_url}/", **options)
        browser.wait(MODELS_LISTED)
        fill_prompt(browser, SCREENSHOT_PROMPT)
        browser.click("send")
        browser.wait(DONE)
        browser.eval("document.activeElement.blur()")
        if options.get("mobile"):
            assert browser.eval("document.documentElement.scrollWidth <= window.innerWidth")
            # One column: the conversation has the screen's width, not what a sidebar leaves.
            width = "document.querySelector('main').getBoundingClientRect().width"
            assert browser.eval(f"{width} > 0.9 * window.innerWidth")
            assert browser.eval("document.getElementById('settings').open") is False
        browser.screenshot(out / name)
        assert (out / name).stat().st_size < 200_000
    light = (out / "playground-light.png").read_bytes()
    assert light != (out / "playground-dark.png").read_bytes()
