// sluice playground: chat over sluice's OpenAI-compatible API, with answers that survive a
// reload, a dropped network or a restarted API process.
//
// Every answer is a sluice stream. The page keeps the open stream's id, the id of the last
// event it has applied and the text so far in sessionStorage, written together after every
// event; after a reload (or a cut connection) it asks `GET /v1/streams/{id}` for everything
// after that event, so each piece of text is appended exactly once. Model output is untrusted:
// it is rendered by markdown.js, which builds DOM nodes and never parses HTML.
"use strict";

(() => {
  const CHAT_STORE = "sluice.playground.chat"; // sessionStorage: the conversation, the open stream
  const KEY_STORE = "sluice.playground.key"; // sessionStorage, or localStorage if remembered
  const PREFS_STORE = "sluice.playground.prefs"; // localStorage: model, system prompt, sampling
  const MAX_BACKOFF_MS = 5000;
  const OFFLINE_WAIT_MS = 30000; // offline, no point in trying: wait for `online` (or this)
  const STALL_MS = 60000; // no byte (not even a keepalive) for this long: reconnect

  const $ = (id) => document.getElementById(id);
  const ui = {
    conversation: $("conversation"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    composer: $("composer"),
    model: $("model"),
    modelHint: $("model-hint"),
    system: $("system"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    rememberKey: $("remember-key"),
    status: $("status"),
    ttft: $("ttft"),
    rate: $("tokens-per-s"),
    newChat: $("new-chat"),
    settings: $("settings"),
  };

  // ---- storage ----------------------------------------------------------------------------

  function readJSON(storage, key, fallback) {
    try {
      const value = JSON.parse(storage.getItem(key));
      return value && typeof value === "object" ? value : fallback;
    } catch {
      return fallback;
    }
  }

  function writeJSON(storage, key, value) {
    try {
      storage.setItem(key, JSON.stringify(value));
    } catch {
      // Storage full or denied: the page works on, it just cannot resume after a reload.
    }
  }

  /** {turns: [{role, content, ...}], open: {streamId, lastEventId, turn} | null} */
  let chat = readJSON(sessionStorage, CHAT_STORE, null);
  if (!chat || !Array.isArray(chat.turns)) chat = { turns: [], open: null };
  const saveChat = () => writeJSON(sessionStorage, CHAT_STORE, chat);

  const prefs = readJSON(localStorage, PREFS_STORE, {});
  const savePrefs = () => writeJSON(localStorage, PREFS_STORE, prefs);

  function storedKey() {
    return localStorage.getItem(KEY_STORE) ?? sessionStorage.getItem(KEY_STORE) ?? "";
  }

  function storeKey() {
    const key = ui.apiKey.value.trim();
    const [keep, drop] = ui.rememberKey.checked
      ? [localStorage, sessionStorage]
      : [sessionStorage, localStorage];
    drop.removeItem(KEY_STORE);
    if (key) keep.setItem(KEY_STORE, key);
    else keep.removeItem(KEY_STORE);
  }

  // ---- the API ----------------------------------------------------------------------------

  // Relative URLs: the page talks to the origin (and path prefix) that served it, and only
  // there (its Content-Security-Policy says so too), so the key goes nowhere else.
  function api(path, init = {}) {
    const headers = new Headers(init.headers || {});
    const key = ui.apiKey.value.trim();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    return fetch(path, { ...init, headers, cache: "no-store", credentials: "same-origin" });
  }

  class HttpError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  /** What a person wants to read about a refused request. */
  async function httpError(response) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // not JSON: a proxy's page, say
    }
    const status = response.status;
    const code = error.code || null;
    let message = error.message || `${status} ${response.statusText}`.trim();
    if (status === 401) {
      message = ui.apiKey.value.trim()
        ? "this API key was refused: check it under Settings → API key"
        : "this server needs an API key: enter it under Settings → API key";
    } else if (status === 429) {
      const after = Number.parseInt(response.headers.get("Retry-After") || "", 10);
      const why = code === "queue_full" ? "the queue is full" : "rate limit reached";
      message = Number.isFinite(after)
        ? `${why}: try again in ${after} s`
        : `${why}: try again in a moment`;
    } else if (status === 503 && code === "no_workers") {
      message = "no worker is up to serve this model: start one (sluice worker), then send again";
    } else if (status === 503 && code === "redis_unavailable") {
      message = "the server cannot reach Redis: try again once it is back";
    } else if (status === 413) {
      message = "this conversation is too large for the server: start a new chat";
    }
    return new HttpError(status, message, code);
  }

  // ---- status line and figures ------------------------------------------------------------

  function setStatus(text) {
    ui.status.textContent = text;
    ui.status.dataset.state = text.split(/[:\s]/, 1)[0];
  }

  function showMetrics(turn) {
    const m = turn && turn.metrics;
    if (!m || !m.firstAt) {
      ui.ttft.textContent = "–";
      ui.rate.textContent = "–";
      return;
    }
    const ttft = m.firstAt - m.sentAt;
    ui.ttft.textContent = ttft < 1000 ? `${ttft} ms` : `${(ttft / 1000).toFixed(2)} s`;
    const seconds = (m.lastAt - m.firstAt) / 1000;
    ui.rate.textContent = m.tokens > 1 && seconds > 0 ? ((m.tokens - 1) / seconds).toFixed(1) : "–";
  }

  // ---- rendering --------------------------------------------------------------------------

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  const articles = new Map(); // turn index -> its <article>

  function renderConversation() {
    articles.clear();
    ui.conversation.replaceChildren();
    if (!chat.turns.length) {
      ui.conversation.append(
        el("p", { class: "empty" }, [
          "Ask something. Then reload the page while the answer streams: it picks up where it ",
          "left off.",
        ]),
      );
    }
    chat.turns.forEach((turn, index) => {
      const article = turn.role === "user" ? userArticle(turn) : assistantArticle(turn);
      articles.set(index, article);
      ui.conversation.append(article);
      if (turn.role === "assistant") renderAnswer(index);
    });
    markLatest();
    const last = latestAnswer();
    showMetrics(last && last.turn);
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
  }

  function userArticle(turn) {
    return el("article", { class: "turn user" }, [
      el("h2", { class: "who" }, ["You"]),
      el("div", { class: "text" }, [turn.content]),
    ]);
  }

  function assistantArticle(turn) {
    const copy = el("button", { type: "button", class: "copy", "aria-label": "Copy answer" }, [
      "Copy",
    ]);
    copy.addEventListener("click", () => copyAnswer(turn, copy));
    return el("article", { class: "turn assistant" }, [
      el("h2", { class: "who" }, ["Assistant", el("span", { class: "model" }, [turn.model || ""])]),
      el("div", { class: "body markdown" }),
      el("div", { class: "tools" }),
      el("div", { class: "foot" }, [copy, el("span", { class: "note" })]),
    ]);
  }

  function latestAnswer() {
    for (let i = chat.turns.length - 1; i >= 0; i--) {
      if (chat.turns[i].role === "assistant") return { index: i, turn: chat.turns[i] };
    }
    return null;
  }

  // `output` names the latest answer's rendered text, and only that one.
  function markLatest() {
    for (const node of ui.conversation.querySelectorAll('[data-testid="output"]')) {
      node.removeAttribute("data-testid");
    }
    const last = latestAnswer();
    const article = last && articles.get(last.index);
    if (article) article.querySelector(".body").setAttribute("data-testid", "output");
  }

  function renderAnswer(index) {
    const turn = chat.turns[index];
    const article = articles.get(index);
    if (!article) return;
    if (turn.streamId) article.dataset.streamId = turn.streamId;
    const body = article.querySelector(".body");
    const box = ui.conversation;
    const following = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    body.replaceChildren(window.renderMarkdown(turn.content));
    body.setAttribute("aria-busy", String(isOpen(index)));
    renderToolCalls(article.querySelector(".tools"), turn.toolCalls || []);
    const note = article.querySelector(".note");
    note.textContent =
      turn.status === "stopped" ? "stopped"
        : turn.status === "error" ? `error: ${turn.error}`
          : turn.finish === "length" ? "cut at max tokens"
            : "";
    note.dataset.state = turn.status || "";
    if (following) box.scrollTop = box.scrollHeight; // keep up with the answer, unless scrolled up
  }

  // Tool calls (OpenAI's shape): the hook a `tool_calls` delta goes through, shown as one
  // collapsible block per call with its name and arguments. sluice does not stream them yet.
  function applyToolCallDeltas(turn, deltas) {
    turn.toolCalls = turn.toolCalls || [];
    for (const delta of deltas) {
      const index = Number.isInteger(delta.index) ? delta.index : turn.toolCalls.length;
      const call = (turn.toolCalls[index] ||= { id: "", name: "", arguments: "" });
      if (delta.id) call.id = String(delta.id);
      const fn = delta.function || {};
      if (typeof fn.name === "string") call.name += fn.name;
      if (typeof fn.arguments === "string") call.arguments += fn.arguments;
    }
  }

  function renderToolCalls(container, calls) {
    container.replaceChildren(
      ...calls.filter(Boolean).map((call) => {
        let args = call.arguments;
        try {
          args = JSON.stringify(JSON.parse(call.arguments), null, 2);
        } catch {
          // still streaming, or not JSON: shown as it came
        }
        return el("details", { class: "tool-call", "data-testid": "tool-call" }, [
          el("summary", {}, ["Tool call ", el("code", {}, [call.name || "…"])]),
          el("pre", {}, [el("code", {}, [args])]),
        ]);
      }),
    );
  }

  async function copyAnswer(turn, button) {
    try {
      await navigator.clipboard.writeText(turn.content);
    } catch {
      // No clipboard API (a plain-http origin that is not localhost): the old way.
      const area = el("textarea", { class: "visually-hidden" });
      area.value = turn.content;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  }

  // ---- streaming --------------------------------------------------------------------------

  /** The stream ended before [DONE]: resume it. */
  class Cut extends Error {}

  /** The live side of the open stream (nothing of it survives a reload: `chat.open` does). */
  let live = null; // {cancelled, stopping, connection: AbortController, wake}

  const isOpen = (index) => chat.open !== null && chat.open.turn === index;

  function newSession() {
    live = { cancelled: false, stopping: false, connection: new AbortController(), wake: null };
    return live;
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
  }

  /** Entry ids are `<ms>-<seq>`: compared as numbers, they order the stream. */
  function entryAfter(a, b) {
    const [am, as] = a.split("-").map(Number);
    const [bm, bs] = b.split("-").map(Number);
    return am !== bm ? am > bm : as > bs;
  }

  function applyDelta(turn, delta, now) {
    const m = turn.metrics;
    let grew = false;
    if (typeof delta.content === "string" && delta.content) {
      turn.content += delta.content;
      grew = true;
    }
    if (Array.isArray(delta.tool_calls)) {
      applyToolCallDeltas(turn, delta.tool_calls);
      grew = true;
    }
    if (grew && m) {
      m.firstAt ||= now;
      m.lastAt = now;
      m.tokens += 1;
    }
  }

  /** One SSE event; returns true at [DONE]. */
  function onEvent(session, index, id, data) {
    const turn = chat.turns[index];
    const open = chat.open;
    if (data === "[DONE]") return true;
    // Already applied (a replay overlapping what we have): never twice.
    if (id && open.lastEventId && !entryAfter(id, open.lastEventId)) return false;
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch {
      return false;
    }
    const now = Date.now();
    if (chunk.error) {
      if (chunk.error.code === "shutting_down") throw new Cut(); // resume on another process
      turn.error = chunk.error.message || chunk.error.code || "the stream failed";
      turn.errorCode = chunk.error.code || null;
    }
    if (chunk.usage && turn.metrics) turn.metrics.tokens = chunk.usage.completion_tokens;
    const choice = (chunk.choices || [])[0];
    if (choice) {
      if (turn.status === "queued") turn.status = "generating";
      applyDelta(turn, choice.delta || {}, now);
      if (choice.finish_reason) turn.finish = choice.finish_reason;
    }
    if (id) open.lastEventId = id;
    saveChat(); // the text and the id of the last event in it, in one write
    renderAnswer(index);
    if (!turn.error && !session.stopping) setStatus(turn.status);
    showMetrics(turn);
    return false;
  }

  /** Reads one response's event stream; returns at [DONE], throws Cut if it ends before. */
  async function consume(session, index, response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const connection = session.connection;
    let buffer = "";
    let stall = setTimeout(() => connection.abort(), STALL_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) throw new Cut();
        clearTimeout(stall);
        stall = setTimeout(() => connection.abort(), STALL_MS);
        buffer += decoder.decode(value, { stream: true });
        const blocks = buffer.split(/\r?\n\r?\n/);
        buffer = blocks.pop();
        for (const block of blocks) {
          let id = null;
          const data = [];
          for (const line of block.split(/\r?\n/)) {
            if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            else if (line.startsWith("id:")) id = line.slice(3).trim();
          }
          if (data.length && onEvent(session, index, id, data.join("\n"))) return;
        }
      }
    } finally {
      clearTimeout(stall);
      reader.cancel().catch(() => {});
    }
  }

  /** Waits `ms`, or less if the network comes back or the stream is stopped. */
  function pause(session, ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        window.removeEventListener("online", done);
        session.wake = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      window.addEventListener("online", done);
      session.wake = done;
    });
  }

  /** Follows the open stream to its end: `response` if given, then resumes after each cut. */
  async function follow(session, index, response) {
    const turn = chat.turns[index];
    const open = chat.open;
    let attempt = 0;
    for (;;) {
      try {
        if (!response) {
          const headers = open.lastEventId ? { "Last-Event-ID": open.lastEventId } : {};
          session.connection = new AbortController();
          response = await api(`v1/streams/${encodeURIComponent(open.streamId)}`, {
            headers,
            signal: session.connection.signal,
          });
          if (!response.ok) {
            const error = await httpError(response);
            if (error.status === 429 || error.status >= 500) throw new Cut();
            if (error.status === 404) error.message = "this stream has expired";
            turn.error = error.message;
            break;
          }
          attempt = 0;
          if (!session.stopping) setStatus(turn.status);
        }
        await consume(session, index, response);
        break;
      } catch (error) {
        if (session.cancelled) return;
        if (!(error instanceof Cut || error instanceof TypeError || error.name === "AbortError")) {
          turn.error = String(error.message || error);
          break;
        }
        response = null;
        attempt += 1;
        if (!session.stopping) {
          setStatus(navigator.onLine ? "reconnecting" : "offline: waiting for the network");
        }
        // The first retry is at once (a cut connection, a killed server: another may answer);
        // then with backoff; offline, when the network comes back (the `online` event).
        if (!navigator.onLine) await pause(session, OFFLINE_WAIT_MS);
        else if (attempt > 1) await pause(session, Math.min(MAX_BACKOFF_MS, 125 * 2 ** attempt));
        if (session.cancelled) return;
      }
    }
    finish(index);
  }

  function finish(index) {
    const turn = chat.turns[index];
    if (turn.errorCode === "cancelled") turn.status = "stopped";
    else if (turn.error) turn.status = "error";
    else turn.status = "done";
    chat.open = null;
    live = null;
    saveChat();
    renderAnswer(index);
    setBusy(false);
    setStatus(turn.status === "error" ? `error: ${turn.error}` : turn.status);
    showMetrics(turn);
    if (!document.activeElement || document.activeElement === document.body) ui.prompt.focus();
  }

  function requestBody(messages) {
    const body = { messages, stream: true, stream_options: { include_usage: true } };
    if (ui.model.value) body.model = ui.model.value;
    const temperature = Number.parseFloat(ui.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    return body;
  }

  function conversationMessages() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const turn of chat.turns) {
      if (turn.role === "assistant" && !turn.content) continue;
      messages.push({ role: turn.role, content: turn.content });
    }
    return messages;
  }

  async function send() {
    const text = ui.prompt.value;
    if (live || !text.trim()) {
      ui.prompt.focus();
      return;
    }
    chat.turns.push({ role: "user", content: text });
    const body = requestBody(conversationMessages());
    const index = chat.turns.length;
    const turn = {
      role: "assistant",
      content: "",
      model: body.model || "",
      status: "queued",
      metrics: { sentAt: Date.now(), firstAt: null, lastAt: null, tokens: 0 },
    };
    chat.turns.push(turn);
    chat.open = { streamId: null, lastEventId: null, turn: index };
    saveChat();
    ui.prompt.value = "";
    renderConversation();
    ui.prompt.focus();
    const session = newSession();
    setBusy(true);
    setStatus("queued");
    let response;
    try {
      response = await api("v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: session.connection.signal,
      });
      if (!response.ok) throw await httpError(response);
    } catch (error) {
      if (session.cancelled) return;
      // Refused before it began: the message goes back to the prompt, to send again.
      chat.turns.splice(index - 1, 2);
      chat.open = null;
      live = null;
      saveChat();
      renderConversation();
      if (!ui.prompt.value) ui.prompt.value = text;
      setBusy(false);
      const message =
        error instanceof HttpError ? error.message : "cannot reach the server: is it up?";
      setStatus(`error: ${message}`);
      (error.status === 401 ? ui.apiKey : ui.prompt).focus();
      return;
    }
    const streamId = response.headers.get("X-Sluice-Stream-Id");
    turn.streamId = streamId;
    chat.open.streamId = streamId;
    saveChat();
    renderAnswer(index);
    if (session.stopping) cancel();
    await follow(session, index, response);
  }

  /** Stop: the worker stops generating (POST …/cancel); the stream then ends `cancelled`. */
  async function cancel() {
    if (!live) return;
    live.stopping = true;
    ui.stop.disabled = true;
    setStatus("stopping");
    const open = chat.open;
    if (!open || !open.streamId) return; // send() cancels once it has the stream's id
    const index = open.turn;
    const current = live;
    let cancelled = false;
    try {
      const response = await api(`v1/streams/${encodeURIComponent(open.streamId)}/cancel`, {
        method: "POST",
      });
      // 409: it had finished already; either way the stream's own end arrives.
      cancelled = response.ok || response.status === 409;
    } catch {
      // the server is unreachable: stop here, at least
    }
    if (current.wake) current.wake(); // resume now, if between connections, to read the end
    setTimeout(
      () => {
        if (live !== current) return;
        // No end arrived: stop listening anyway.
        current.cancelled = true;
        current.connection.abort();
        chat.turns[index].errorCode = "cancelled";
        chat.turns[index].error = "stopped";
        finish(index);
      },
      cancelled ? 5000 : 0,
    );
  }

  function newChat() {
    if (live) {
      const open = chat.open;
      if (open && open.streamId) {
        api(`v1/streams/${encodeURIComponent(open.streamId)}/cancel`, { method: "POST" }).catch(
          () => {},
        );
      }
      live.cancelled = true;
      live.connection.abort();
      if (live.wake) live.wake();
      live = null;
    }
    chat = { turns: [], open: null };
    saveChat();
    renderConversation();
    setBusy(false);
    setStatus("ready");
    ui.prompt.focus();
  }

  /** After a reload (or a tab restored): the open stream carries on from its last event. */
  function resumeOpenStream() {
    const open = chat.open;
    if (!open || live) return;
    const turn = chat.turns[open.turn];
    if (!turn) {
      chat.open = null;
      saveChat();
      return;
    }
    if (!open.streamId) {
      // Reloaded before the server answered: the request cannot be found again.
      turn.error = "the page was reloaded before the server answered: send it again";
      newSession();
      finish(open.turn);
      return;
    }
    const session = newSession();
    setBusy(true);
    setStatus("resuming");
    follow(session, open.turn, null);
  }

  // ---- models -----------------------------------------------------------------------------

  async function loadModels() {
    let ids = [];
    try {
      const response = await api("v1/models");
      if (!response.ok) throw await httpError(response);
      ids = ((await response.json()).data || []).map((m) => String(m.id));
    } catch (error) {
      ui.modelHint.textContent = "";
      ui.model.replaceChildren();
      const message =
        error instanceof HttpError ? error.message : "cannot reach the server: is it up?";
      if (!live) setStatus(`error: ${message}`);
      if (error.status === 401) ui.apiKey.setAttribute("aria-invalid", "true");
      return;
    }
    ui.apiKey.removeAttribute("aria-invalid");
    const wanted = ui.model.value || prefs.model;
    ui.model.replaceChildren(...ids.map((id) => el("option", { value: id }, [id])));
    if (ids.includes(wanted)) ui.model.value = wanted;
    ui.modelHint.textContent = ids.length
      ? ""
      : "No worker serves a model right now: start one (sluice worker).";
    if (!live && ui.status.dataset.state === "error") setStatus("ready");
  }

  // ---- wiring -----------------------------------------------------------------------------

  function restoreSettings() {
    ui.system.value = prefs.system || "";
    ui.temperature.value = prefs.temperature ?? "";
    ui.maxTokens.value = prefs.maxTokens ?? "";
    ui.apiKey.value = storedKey();
    ui.rememberKey.checked = localStorage.getItem(KEY_STORE) !== null;
    if (window.matchMedia("(max-width: 760px)").matches) ui.settings.open = false;
  }

  function wire() {
    ui.composer.addEventListener("submit", (event) => {
      event.preventDefault();
      send();
    });
    ui.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      } else if (event.key === "Escape" && live) {
        cancel();
      }
    });
    ui.stop.addEventListener("click", () => {
      cancel();
      ui.prompt.focus();
    });
    ui.newChat.addEventListener("click", newChat);
    ui.model.addEventListener("change", () => {
      prefs.model = ui.model.value;
      savePrefs();
    });
    ui.system.addEventListener("input", () => {
      prefs.system = ui.system.value;
      savePrefs();
    });
    ui.temperature.addEventListener("input", () => {
      prefs.temperature = ui.temperature.value;
      savePrefs();
    });
    ui.maxTokens.addEventListener("input", () => {
      prefs.maxTokens = ui.maxTokens.value;
      savePrefs();
    });
    ui.apiKey.addEventListener("change", () => {
      storeKey();
      loadModels();
    });
    ui.rememberKey.addEventListener("change", storeKey);
    window.addEventListener("offline", () => {
      if (live) setStatus("offline: waiting for the network");
    });
    // The network is back: a connection that looks open may be dead; resuming costs nothing
    // (it starts after the last event applied), so reconnect at once.
    window.addEventListener("online", () => {
      if (live && !live.wake && chat.open && chat.open.streamId) live.connection.abort();
      loadModels();
    });
    // A page restored from the back/forward cache lost its connections.
    window.addEventListener("pageshow", (event) => {
      if (event.persisted) resumeOpenStream();
    });
  }

  restoreSettings();
  wire();
  renderConversation();
  const last = latestAnswer();
  if (last && !chat.open) {
    const t = last.turn;
    setStatus(t.status === "error" ? `error: ${t.error}` : t.status || "ready");
  }
  loadModels();
  resumeOpenStream();
  ui.prompt.focus();

  // For tests and for whoever wires tool calls into sluice: feed one `choices[0].delta`
  // (OpenAI's shape) to the latest answer, as if it had streamed.
  window.sluicePlayground = {
    feedDelta(delta) {
      let last = latestAnswer();
      if (!last) {
        chat.turns.push({ role: "assistant", content: "", status: "done", metrics: null });
        renderConversation();
        last = latestAnswer();
      }
      applyDelta(last.turn, delta, Date.now());
      saveChat();
      renderAnswer(last.index);
    },
  };
})();
