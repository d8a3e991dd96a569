// A small Markdown renderer for untrusted text (model output). It builds DOM nodes with
// createElement and text nodes only: nothing is ever parsed as HTML, so `<img onerror=…>` in an
// answer is shown as the characters it is. It covers what chat answers use: fenced code,
// headings, lists (nested by indentation), block quotes, rules, paragraphs; inline code, bold,
// italic, strikethrough and http(s) links. Everything else stays text.
"use strict";

(() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w#+.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?/;
  const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const BLANK = /^\s*$/;

  function el(tag, children = [], attrs = {}) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    for (const child of children) {
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  // Inline spans: the earliest match wins; code spans are literal, the others nest.
  const INLINE = [
    { re: /(`+)([\s\S]*?[^`])\1(?!`)/, make: (m) => el("code", [m[2].replace(/^ (.*) $/, "$1")]) },
    { re: /\\([!-/:-@[-`{-~])/, make: (m) => document.createTextNode(m[1]) },
    {
      re: /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/,
      make: (m) =>
        el("a", inline(m[1]), {
          href: m[2],
          rel: "noopener noreferrer nofollow",
          target: "_blank",
        }),
    },
    { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: (m) => el("strong", inline(m[1])) },
    { re: /__(?=\S)([\s\S]*?\S)__(?!\w)/, make: (m) => el("strong", inline(m[1])) },
    { re: /~~(?=\S)([\s\S]*?\S)~~/, make: (m) => el("del", inline(m[1])) },
    { re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*/, make: (m) => el("em", inline(m[1])) },
    { re: /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/, make: (m) => el("em", inline(m[1])) },
  ];

  function inline(text) {
    const out = [];
    let rest = text;
    while (rest) {
      let best = null;
      for (const rule of INLINE) {
        const m = rule.re.exec(rest);
        if (m && (best === null || m.index < best.m.index)) best = { m, rule };
      }
      if (best === null) {
        out.push(...lines(rest));
        break;
      }
      if (best.m.index > 0) out.push(...lines(rest.slice(0, best.m.index)));
      out.push(best.rule.make(best.m));
      rest = rest.slice(best.m.index + best.m[0].length);
    }
    return out;
  }

  // A single newline inside a paragraph is a line break, as chat answers mean it.
  function lines(text) {
    const out = [];
    text.split("\n").forEach((line, i) => {
      if (i > 0) out.push(el("br"));
      if (line) out.push(document.createTextNode(line));
    });
    return out;
  }

  function indentOf(line) {
    return line.length - line.trimStart().length;
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line);
  }

  function blocks(source) {
    const src = source.split("\n");
    const out = [];
    let i = 0;
    while (i < src.length) {
      const line = src[i];
      if (BLANK.test(line)) {
        i++;
        continue;
      }
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        // An unclosed fence (an answer still streaming) runs to the end.
        while (i < src.length && !src[i].trimStart().startsWith(fence)) body.push(src[i++]);
        i++;
        const attrs = m[2] ? { "data-lang": m[2] } : {};
        out.push(el("pre", [el("code", [body.join("\n")], attrs)]));
      } else if ((m = HEADING.exec(line))) {
        out.push(el(`h${Math.min(m[1].length + 2, 6)}`, inline(m[2])));
        i++;
      } else if (RULE.test(line)) {
        out.push(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        while (i < src.length && QUOTE.test(src[i])) body.push(src[i++].replace(QUOTE, ""));
        out.push(el("blockquote", blocks(body.join("\n"))));
      } else if ((m = ITEM.exec(line))) {
        const [list, next] = listAt(src, i);
        out.push(list);
        i = next;
      } else {
        const body = [line];
        i++;
        while (i < src.length && !BLANK.test(src[i]) && !startsBlock(src[i])) body.push(src[i++]);
        out.push(el("p", inline(body.join("\n").trim())));
      }
    }
    return out;
  }

  // A list: items at the first item's indentation; deeper lines belong to the item above.
  function listAt(src, start) {
    const first = ITEM.exec(src[start]);
    const base = first[1].length;
    const ordered = /\d/.test(first[2]);
    const items = [];
    let i = start;
    let loose = false;
    while (i < src.length) {
      const m = ITEM.exec(src[i]);
      if (!m || m[1].length !== base || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      const contentIndent = base + m[2].length + 1;
      i++;
      while (i < src.length) {
        if (BLANK.test(src[i])) {
          const next = src.slice(i).find((l) => !BLANK.test(l));
          if (next === undefined || indentOf(next) <= base) break;
          loose = true;
          body.push("");
          i++;
          continue;
        }
        const sub = ITEM.exec(src[i]);
        if (sub && sub[1].length <= base) break;
        if (!sub && indentOf(src[i]) <= base && startsBlock(src[i])) break;
        body.push(src[i].slice(Math.min(indentOf(src[i]), contentIndent)));
        i++;
      }
      items.push(body.join("\n"));
      if (i < src.length && BLANK.test(src[i])) {
        const next = src.slice(i).find((l) => !BLANK.test(l));
        const sub = next === undefined ? null : ITEM.exec(next);
        if (!sub || sub[1].length !== base) break;
        loose = true;
        while (BLANK.test(src[i])) i++;
      }
    }
    const attrs = {};
    if (ordered && parseInt(first[2], 10) !== 1) attrs.start = String(parseInt(first[2], 10));
    const children = items.map((item) => {
      const content = blocks(item);
      // A tight item's lone paragraph shows without the paragraph's margins.
      if (!loose && content.length && content[0].tagName === "P") {
        content.splice(0, 1, ...content[0].childNodes);
      }
      return el("li", content);
    });
    return [el(ordered ? "ol" : "ul", children, attrs), i];
  }

  // The answer as a fragment of DOM nodes.
  function renderMarkdown(text) {
    const fragment = document.createDocumentFragment();
    fragment.append(...blocks(String(text).replace(/\r\n?/g, "\n")));
    return fragment;
  }

  window.renderMarkdown = renderMarkdown;
})();
