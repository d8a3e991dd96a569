// Drives one headless Chromium for tests/test_playground.py: JSON commands on stdin, one per
// line ({"id", "op", ...}), one JSON answer per command on stdout ({"id", "ok", "value"} or
// {"id", "ok": false, "error"}). The first line out is {"ready": "<browser version>"}.
//
// Chromium comes from @sparticuz/chromium (its binary, unpacked to /tmp once), driven by
// puppeteer-core over the DevTools protocol. Each `open` gets a fresh browser context (its own
// storage), so one browser serves every test.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const userDataDir = mkdtempSync(join(tmpdir(), "sluice-chromium-"));
const browser = await puppeteer.launch({
  executablePath: await chromium.executablePath(),
  headless: true,
  userDataDir,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--font-render-hinting=none",
  ],
});

let context = null;
let page = null;
let problems = []; // console errors and uncaught exceptions of the open page

const sel = (testid) => `[data-testid="${testid}"]`;

async function open({ url, width = 1280, height = 800, dark = false, mobile = false }) {
  if (context) await context.close();
  problems = [];
  context = await browser.createBrowserContext();
  page = await context.newPage();
  page.on("console", (msg) => {
    if (msg.type() === "error") problems.push(`console: ${msg.text()} (${msg.location().url})`);
  });
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  await page.setViewport({ width, height, deviceScaleFactor: 1, isMobile: mobile, hasTouch: mobile });
  await emulate({ dark });
  await page.goto(url, { waitUntil: "load" });
  return page.url();
}

async function emulate({ dark }) {
  await page.emulateMediaFeatures([{ name: "prefers-color-scheme", value: dark ? "dark" : "light" }]);
}

const ops = {
  open,
  emulate,
  eval: ({ expr }) => page.evaluate(expr),
  wait: async ({ expr, timeout = 20000 }) => {
    const handle = await page.waitForFunction(expr, { timeout, polling: 25 });
    return handle.jsonValue();
  },
  type: ({ testid, text }) => page.type(sel(testid), text),
  click: ({ testid }) => page.click(sel(testid)),
  press: async ({ key, shift = false }) => {
    if (shift) await page.keyboard.down("Shift");
    await page.keyboard.press(key);
    if (shift) await page.keyboard.up("Shift");
  },
  focused: () => page.evaluate(() => document.activeElement?.dataset?.testid ?? null),
  reload: async () => {
    await page.reload({ waitUntil: "load" });
    return page.url();
  },
  offline: ({ on }) => page.setOfflineMode(on),
  grantClipboard: ({ origin }) =>
    context.overridePermissions(origin, ["clipboard-read", "clipboard-write", "clipboard-sanitized-write"]),
  screenshot: ({ path, fullPage = false }) => page.screenshot({ path, fullPage, type: "png" }),
  problems: () => problems,
  version: () => browser.version(),
};

async function handle(line) {
  let id = null;
  try {
    const command = JSON.parse(line);
    id = command.id;
    const value = await ops[command.op](command);
    process.stdout.write(`${JSON.stringify({ id, ok: true, value: value ?? null })}\n`);
  } catch (error) {
    process.stdout.write(`${JSON.stringify({ id, ok: false, error: String(error?.stack || error) })}\n`);
  }
}

async function shutdown() {
  await browser.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
  process.exit(0);
}

process.stdout.write(`${JSON.stringify({ ready: await browser.version() })}\n`);
const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (line.trim()) handle(line);
});
lines.on("close", shutdown);
process.on("SIGTERM", shutdown);
