// Markdown for the web chat, rendered without ever parsing HTML: model output is untrusted, so
// every piece of it reaches the page as a text node (createTextNode, textContent) inside elements
// this file creates. "<script>" or "<img onerror=...>" in a reply is shown as those characters.
// Links keep only http(s) and mailto URLs. The subset: fenced code blocks (``` or ~~~), headings,
// lists (nested by indentation), block quotes, rules, pipe tables and paragraphs; inline code,
// bold, italic, strikethrough, links and bare http(s) URLs. Anything else stays plain text.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?: +|$)/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const INLINE = new RegExp([
  /(?<tick>`+)(?<code>[^`]|[^`][\s\S]*?[^`])\k<tick>(?!`)/.source,
  /\[(?<label>[^\]\n]+)\]\((?<href>[^\s()]+)\)/.source,
  /(?<url>https?:\/\/[^\s<>()[\]]*[^\s<>()[\].,;:!?'"*_~`])/.source,
  /(?<strong>\*\*|__)(?=\S)(?<strongText>[\s\S]*?\S)\k<strong>/.source,
  /~~(?=\S)(?<del>[\s\S]*?\S)~~/.source,
  /\*(?=[^\s*])(?<em>[\s\S]*?[^\s*])\*/.source,
  /\b_(?=[^\s_])(?<em2>[\s\S]*?[^\s_])_\b/.source,
].join("|"), "g");

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** A fragment of elements for `markdown`; nothing in it comes from parsing HTML. */
export function render(markdown) {
  const fragment = document.createDocumentFragment();
  blocks(markdown.replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) { i++; continue; }
    if ((m = FENCE.exec(line))) { i = codeBlock(lines, i, m, parent); continue; }
    if ((m = HEADING.exec(line))) { inline(m[2], parent.appendChild(el("h" + m[1].length))); i++; continue; }
    if (RULE.test(line)) { parent.appendChild(el("hr")); i++; continue; }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(lines[i++].replace(QUOTE, ""));
      blocks(inner, parent.appendChild(el("blockquote")));
      continue;
    }
    if (ITEM.test(line)) { i = list(lines, i, parent); continue; }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("|")) {
      i = table(lines, i, parent);
      continue;
    }
    const para = [line];
    while (++i < lines.length && lines[i].trim() && !startsBlock(lines[i])) para.push(lines[i]);
    inline(para.join("\n"), parent.appendChild(el("p")));
  }
}

/** A fenced code block with its language and a copy button; unclosed, it runs to the end (as it streams). */
function codeBlock(lines, i, open, parent) {
  const fence = open[1], body = [];
  for (i++; i < lines.length; i++) {
    const close = lines[i].trim();
    if (close[0] === fence[0] && close.length >= fence.length && /^(`+|~+)$/.test(close)) { i++; break; }
    body.push(lines[i]);
  }
  const box = parent.appendChild(el("div", "code"));
  const head = box.appendChild(el("div", "code-head"));
  head.appendChild(el("span", "lang")).textContent = open[2];
  const copy = head.appendChild(el("button", "copy"));
  copy.type = "button";
  copy.textContent = "Copy";
  const code = box.appendChild(el("pre")).appendChild(el("code"));
  if (open[2]) code.className = "language-" + open[2];
  code.textContent = body.join("\n");
  return i;
}

/** A list whose items are the lines at its first marker's indentation; deeper lines belong to the item above. */
function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]), indent = first[1].length, ordered = /\d/.test(first[2]);
  const node = parent.appendChild(el(ordered ? "ol" : "ul"));
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const width = m[0].length, item = [lines[i].slice(width)];
    for (i++; i < lines.length; i++) {
      const line = lines[i], deeper = line.length - line.trimStart().length > indent;
      if (line.trim() && !deeper && (startsBlock(line) || item[item.length - 1] === "")) break;
      if (!line.trim() && !(lines[i + 1] || "").startsWith(" ".repeat(indent + 1))) break;
      item.push(deeper ? line.slice(Math.min(width, line.length - line.trimStart().length)) : line);
    }
    const li = node.appendChild(el("li"));
    blocks(item, li);
    if (li.children.length === 1 && li.firstChild.tagName === "P") li.replaceChildren(...li.firstChild.childNodes);
    while (i < lines.length && !lines[i].trim()) i++;
  }
  return i;
}

function cells(line) {
  return line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim());
}

function table(lines, i, parent) {
  const node = parent.appendChild(el("table"));
  const head = node.appendChild(el("thead")).appendChild(el("tr"));
  for (const c of cells(lines[i])) inline(c, head.appendChild(el("th")));
  const body = node.appendChild(el("tbody"));
  for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
    const row = body.appendChild(el("tr"));
    for (const c of cells(lines[i])) inline(c, row.appendChild(el("td")));
  }
  return i;
}

function text(parent, s) {
  s.split("\n").forEach((part, k) => {
    if (k) parent.appendChild(el("br"));
    if (part) parent.appendChild(document.createTextNode(part));
  });
}

/** A link's URL when it is http(s) or mailto, else null (javascript:, data: and the like stay text). */
function safeUrl(href) {
  try {
    const url = new URL(href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function link(parent, href) {
  const a = parent.appendChild(el("a"));
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

function inline(s, parent) {
  let at = 0;
  for (const m of s.matchAll(INLINE)) {
    const g = m.groups;
    text(parent, s.slice(at, m.index));
    at = m.index + m[0].length;
    if (g.tick) parent.appendChild(el("code")).textContent = g.code;
    else if (g.label && safeUrl(g.href)) inline(g.label, link(parent, safeUrl(g.href)));
    else if (g.label) text(parent, m[0]);
    else if (g.url) link(parent, g.url).textContent = g.url;
    else if (g.strong) inline(g.strongText, parent.appendChild(el("strong")));
    else if (g.del) inline(g.del, parent.appendChild(el("del")));
    else inline(g.em || g.em2, parent.appendChild(el("em")));
  }
  text(parent, s.slice(at));
}
