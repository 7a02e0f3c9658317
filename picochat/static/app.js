// picochat web UI: conversations in localStorage, replies streamed from /v1/chat/completions (SSE).
// Everything the model or the user wrote is escaped before a small markdown subset is applied, so no HTML
// from a message ever reaches the page.
"use strict";
(() => {
  const STORE = "picochat.conversations.v1";
  const CURRENT = "picochat.current.v1";
  const SETTINGS = "picochat.settings.v1";
  const DEFAULTS = { temperature: 0.8, top_k: 50, max_tokens: 512, system: "", api_key: "" };

  const $ = (id) => document.getElementById(id);
  const el = {
    app: document.querySelector(".app"), sidebar: $("sidebar"), list: $("conversations"), messages: $("messages"),
    scroller: $("scroller"), input: $("input"), form: $("composer"), send: $("send"), stop: $("stop"),
    banner: $("banner"), modelName: $("model-name"), settings: $("settings"),
  };

  let conversations = load(STORE, []);
  if (!Array.isArray(conversations)) conversations = [];
  let currentId = localStorage.getItem(CURRENT) || null;
  let settings = Object.assign({}, DEFAULTS, load(SETTINGS, {}));
  let streaming = null; // {controller, conv, msg, node}
  // what this server allows and says about its model (GET /info); null until it answers
  let server = null;

  function load(key, fallback) {
    try {
      const v = JSON.parse(localStorage.getItem(key));
      return v === null || v === undefined ? fallback : v;
    } catch (e) {
      return fallback;
    }
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(conversations));
      localStorage.setItem(CURRENT, currentId || "");
    } catch (e) {
      console.warn("picochat: could not save conversations", e);
    }
  }

  function current() {
    return conversations.find((c) => c.id === currentId) || null;
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  // ---- safe markdown -------------------------------------------------------------------------------------
  function escapeHtml(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  // tool calls and their outputs, as the server writes them into the assistant text
  const TOOL_RE = /<\|python_start\|>([\s\S]*?)(?:<\|python_end\|>|$)|<\|output_start\|>([\s\S]*?)(?:<\|output_end\|>|$)/g;
  const MARK = "\u0000";

  function toolChip(t) {
    if (t.kind === "call") {
      return '<span class="tool tool-call" title="The model called the calculator tool">' +
        '<span class="tool-label">python</span><code>' + escapeHtml(t.text) + "</code></span>";
    }
    return '<span class="tool tool-output" title="What the tool answered">' +
      '<span class="tool-label">output</span><code>' + escapeHtml(t.text) + "</code></span>";
  }

  function inline(text) {
    // text is raw; escape first, then a few markdown spans over the escaped text
    const codes = [];
    let s = escapeHtml(text).replace(/`([^`\n]+)`/g, (m, c) => {
      codes.push(c);
      return MARK + "C" + (codes.length - 1) + MARK;
    });
    s = s.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, "$1<em>$2</em>");
    return s.replace(new RegExp(MARK + "C(\\d+)" + MARK, "g"), (m, k) => "<code>" + codes[+k] + "</code>");
  }

  function codeBlock(body, lang) {
    return '<div class="code"><div class="code-head"><span>' + escapeHtml(lang || "code") +
      '</span><button type="button" class="copy-code">Copy</button></div><pre><code>' +
      escapeHtml(body) + "</code></pre></div>";
  }

  function renderMarkdown(text) {
    const tools = [];
    const src = String(text).split(MARK).join("").replace(TOOL_RE, (m, call, out) => {
      tools.push(call !== undefined ? { kind: "call", text: call } : { kind: "output", text: out });
      return MARK + "T" + (tools.length - 1) + MARK;
    });
    const lines = src.split("\n");
    const html = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = () => {
      if (para.length) html.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const flushList = () => {
      if (list) html.push("<" + list.tag + ">" + list.items.map((i) => "<li>" + inline(i) + "</li>").join("") +
        "</" + list.tag + ">");
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushPara();
        flushList();
        const body = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
        html.push(codeBlock(body.join("\n"), fence[1]));
        continue;
      }
      const heading = line.match(/^(#{1,4})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d{1,3}[.)]\s+(.*)$/);
      if (heading) {
        flushPara();
        flushList();
        const level = heading[1].length + 2;
        html.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushPara();
        const tag = bullet ? "ul" : "ol";
        if (list && list.tag !== tag) flushList();
        if (!list) list = { tag, items: [] };
        list.items.push((bullet || numbered)[1]);
      } else if (!line.trim()) {
        flushPara();
        flushList();
      } else {
        flushList();
        para.push(line);
      }
    }
    flushPara();
    flushList();
    return html.join("").replace(new RegExp(MARK + "T(\\d+)" + MARK, "g"), (m, k) => toolChip(tools[+k]));
  }

  // ---- rendering -----------------------------------------------------------------------------------------
  function renderSidebar() {
    el.list.replaceChildren();
    const sorted = conversations.slice().sort((a, b) => (b.updated || 0) - (a.updated || 0));
    for (const conv of sorted) {
      const item = document.createElement("div");
      item.className = "conv" + (conv.id === currentId ? " active" : "");
      item.dataset.id = conv.id;
      const title = document.createElement("button");
      title.type = "button";
      title.className = "conv-title";
      title.textContent = conv.title || "New chat";
      title.title = conv.title || "New chat";
      title.addEventListener("click", () => selectConversation(conv.id));
      const del = document.createElement("button");
      del.type = "button";
      del.className = "conv-delete";
      del.title = "Delete this conversation";
      del.setAttribute("aria-label", "Delete conversation");
      del.textContent = "\u00d7";
      del.addEventListener("click", (e) => {
        e.stopPropagation();
        deleteConversation(conv.id);
      });
      item.append(title, del);
      el.list.appendChild(item);
    }
  }

  function renderMessages() {
    const conv = current();
    el.messages.replaceChildren();
    if (!conv || !conv.messages.length) {
      const empty = document.createElement("div");
      empty.className = "empty";
      const h = document.createElement("h1");
      h.textContent = "What can I help with?";
      const p = document.createElement("p");
      p.className = "trained-on";
      p.textContent = server && server.trained_on
        ? "This model was trained on " + server.trained_on + "."
        : "Ask a question, or try some arithmetic: the model can call a calculator.";
      empty.append(h, p);
      if (server && server.examples && server.examples.length) {
        const tries = document.createElement("div");
        tries.className = "examples";
        for (const text of server.examples) {
          const b = document.createElement("button");
          b.type = "button";
          b.className = "example";
          b.textContent = text;
          b.addEventListener("click", () => send(text));
          tries.appendChild(b);
        }
        empty.appendChild(tries);
      }
      el.messages.appendChild(empty);
      return;
    }
    conv.messages.forEach((m, i) => el.messages.appendChild(messageNode(conv, m, i)));
    scrollToEnd(true);
  }

  function fillAssistant(bubble, m) {
    bubble.innerHTML = renderMarkdown(m.content || "");
    if (streaming && streaming.msg === m) {
      const caret = document.createElement("span");
      caret.className = "caret";
      (bubble.lastElementChild && bubble.lastElementChild.tagName === "P" ? bubble.lastElementChild : bubble)
        .appendChild(caret);
    }
    if (m.stopped) {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = "Stopped";
      bubble.appendChild(note);
    } else if (m.finish === "length") {
      const note = document.createElement("div");
      note.className = "note";
      note.textContent = "Reached the token limit";
      bubble.appendChild(note);
    }
    if (m.error) {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = m.error;
      bubble.appendChild(err);
    }
  }

  function messageNode(conv, m, index) {
    const row = document.createElement("div");
    row.className = "msg " + (m.role === "user" ? "user" : "assistant");
    row.dataset.index = index;
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (m.role === "user") {
      bubble.textContent = m.content;
    } else {
      const avatar = document.createElement("div");
      avatar.className = "avatar";
      avatar.textContent = "p";
      row.appendChild(avatar);
      fillAssistant(bubble, m);
    }
    const body = document.createElement("div");
    body.className = "msg-body";
    body.appendChild(bubble);
    const actions = document.createElement("div");
    actions.className = "actions";
    const busy = streaming !== null;
    if (m.role === "user") {
      actions.appendChild(action("Edit", "edit", () => startEdit(row, conv, index), busy));
    } else {
      actions.appendChild(action("Copy", "copy", () => copyText(m.content || ""), false));
      if (index === conv.messages.length - 1) {
        actions.appendChild(action("Regenerate", "regenerate", () => regenerate(), busy));
      }
    }
    body.appendChild(actions);
    row.appendChild(body);
    return row;
  }

  function action(label, cls, fn, disabled) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "action " + cls;
    b.textContent = label;
    b.disabled = !!disabled;
    b.addEventListener("click", fn);
    return b;
  }

  function scrollToEnd(force) {
    const s = el.scroller;
    if (force || s.scrollHeight - s.scrollTop - s.clientHeight < 120) s.scrollTop = s.scrollHeight;
  }

  let pending = false;
  function updateStreamingNode() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (!streaming) return;
      const node = el.messages.querySelector('.msg[data-index="' + streaming.index + '"] .bubble');
      if (node) fillAssistant(node, streaming.msg);
      scrollToEnd(false);
    });
  }

  function setBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.app.classList.toggle("busy", busy);
  }

  function renderAll() {
    renderSidebar();
    renderMessages();
  }

  // ---- conversations -------------------------------------------------------------------------------------
  function selectConversation(id) {
    if (streaming) return;
    currentId = id;
    save();
    renderAll();
    if (window.innerWidth < 760) el.app.classList.add("sidebar-hidden");
  }

  function newConversation() {
    if (streaming) return;
    currentId = null;
    save();
    renderAll();
    el.input.focus();
  }

  function deleteConversation(id) {
    if (streaming && streaming.conv.id === id) return;
    conversations = conversations.filter((c) => c.id !== id);
    if (currentId === id) currentId = null;
    save();
    renderAll();
  }

  function copyText(text) {
    if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
  }

  // ---- talking to the server -----------------------------------------------------------------------------
  function headers() {
    const h = { "Content-Type": "application/json" };
    if (settings.api_key) h.Authorization = "Bearer " + settings.api_key;
    return h;
  }

  function apiMessages(conv) {
    // leave out exchanges whose reply failed (an empty assistant turn is not a valid message)
    const msgs = [];
    const all = conv.messages;
    for (let i = 0; i < all.length; i++) {
      const m = all[i];
      if (m.role === "user" && i + 1 < all.length && !(all[i + 1].content || "").trim()) {
        i++;
        continue;
      }
      msgs.push({ role: m.role, content: m.content });
    }
    if (settings.system && settings.system.trim()) msgs.unshift({ role: "system", content: settings.system });
    return msgs;
  }

  async function readStream(response, msg) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          let obj;
          try {
            obj = JSON.parse(data);
          } catch (e) {
            continue;
          }
          if (obj.error) {
            msg.error = obj.error.message || "The server reported an error.";
            continue;
          }
          const choice = obj.choices && obj.choices[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) {
            msg.content += choice.delta.content;
            updateStreamingNode();
          }
          if (choice.finish_reason) msg.finish = choice.finish_reason;
        }
      }
    }
  }

  async function generateReply(conv) {
    const msg = { role: "assistant", content: "" };
    const body = {
      model: "picochat", messages: apiMessages(conv), stream: true,
      temperature: Number(settings.temperature), max_tokens: maxTokens(),
    };
    const k = Math.floor(Number(settings.top_k));
    if (k > 0) body.top_k = k;
    conv.messages.push(msg);
    conv.updated = Date.now();
    const controller = new AbortController();
    streaming = { controller, conv, msg, index: conv.messages.length - 1 };
    save();
    setBusy(true);
    renderAll();
    try {
      const res = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      setBanner(false);
      if (!res.ok) {
        let err = null;
        try {
          err = (await res.json()).error;
        } catch (e) { /* not JSON */ }
        msg.error = explain(res.status, err);
      } else {
        await readStream(res, msg);
      }
    } catch (e) {
      if (e.name === "AbortError") {
        msg.stopped = true;
      } else {
        msg.error = "Could not reach the server.";
        setBanner(true);
      }
    } finally {
      streaming = null;
      conv.updated = Date.now();
      save();
      setBusy(false);
      renderAll();
    }
  }

  function send(text) {
    if (streaming || !text.trim()) return;
    let conv = current();
    if (!conv) {
      conv = { id: newId(), title: "", messages: [], updated: Date.now() };
      conversations.push(conv);
      currentId = conv.id;
    }
    conv.messages.push({ role: "user", content: text });
    if (!conv.title) conv.title = text.trim().replace(/\s+/g, " ").slice(0, 60);
    generateReply(conv);
  }

  function stop() {
    if (streaming) streaming.controller.abort();
  }

  function regenerate() {
    const conv = current();
    if (streaming || !conv || !conv.messages.length) return;
    if (conv.messages[conv.messages.length - 1].role === "assistant") conv.messages.pop();
    generateReply(conv);
  }

  function startEdit(row, conv, index) {
    if (streaming) return;
    const bubble = row.querySelector(".bubble");
    const actions = row.querySelector(".actions");
    const box = document.createElement("div");
    box.className = "edit-box";
    const area = document.createElement("textarea");
    area.className = "edit-area";
    area.value = conv.messages[index].content;
    const buttons = document.createElement("div");
    buttons.className = "edit-buttons";
    const cancel = action("Cancel", "edit-cancel secondary", () => renderMessages(), false);
    const ok = action("Save & submit", "edit-save", () => {
      const text = area.value;
      if (!text.trim()) return;
      conv.messages = conv.messages.slice(0, index);
      conv.messages.push({ role: "user", content: text });
      generateReply(conv);
    }, false);
    buttons.append(cancel, ok);
    box.append(area, buttons);
    bubble.replaceWith(box);
    actions.hidden = true;
    area.focus();
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        ok.click();
      } else if (e.key === "Escape") {
        cancel.click();
      }
    });
  }

  // ---- server health -------------------------------------------------------------------------------------
  function setBanner(show) {
    el.banner.hidden = !show;
  }

  // the largest reply this server allows, and the user's setting within it
  function maxTokens() {
    const wanted = Math.max(1, Math.floor(Number(settings.max_tokens)) || DEFAULTS.max_tokens);
    return server && server.max_tokens ? Math.min(wanted, server.max_tokens) : wanted;
  }

  // a failed request's message, plus what the user can change to make it work
  function explain(status, err) {
    const text = (err && err.message) || "HTTP " + status;
    if (status === 401) return text + " Set the API key in Settings.";
    if (err && err.code === "context_length_exceeded") {
      return text + " The conversation no longer fits the model's context" +
        (server ? " of " + server.context + " tokens" : "") + ": start a new chat, or shorten your message.";
    }
    if (err && err.param === "max_tokens") return text + " Lower Max tokens in Settings.";
    if (status === 429) return text + " The server is busy: try again in a moment.";
    return text;
  }

  async function loadInfo() {
    try {
      const res = await fetch("/info", { cache: "no-store" });
      if (!res.ok) return;
      const first = server === null;
      server = await res.json();
      if (first && !streaming) renderMessages();
    } catch (e) { /* the health check shows the banner */ }
  }

  async function checkHealth() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 4000);
    try {
      const res = await fetch("/health", { signal: controller.signal, cache: "no-store" });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const info = await res.json();
      if (info.model) {
        el.modelName.textContent = info.model;
        document.title = info.model;
      }
      if (server === null) loadInfo();
      setBanner(false);
    } catch (e) {
      setBanner(true);
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- settings ------------------------------------------------------------------------------------------
  const fields = {
    temperature: $("set-temperature"), top_k: $("set-top-k"), max_tokens: $("set-max-tokens"),
    system: $("set-system"), api_key: $("set-api-key"),
  };

  function openSettings() {
    for (const [k, f] of Object.entries(fields)) f.value = settings[k];
    const note = $("server-limits");
    if (server) {
      fields.max_tokens.max = server.max_tokens;
      fields.max_tokens.value = maxTokens();
      note.textContent = "This server allows at most " + server.max_tokens + " tokens per reply (the model's " +
        "context is " + server.context + " tokens, prompt included); a larger setting is lowered to it. " +
        "Calculator tool: " + (server.tool ? "on" : "off") + ".";
    } else {
      fields.max_tokens.removeAttribute("max");
      note.textContent = "The server's limits are not known yet.";
    }
    el.settings.showModal();
  }

  function saveSettings() {
    const num = (v, d, lo, hi) => {
      const x = Number(v);
      return Number.isFinite(x) ? Math.min(hi, Math.max(lo, x)) : d;
    };
    settings = {
      temperature: num(fields.temperature.value, DEFAULTS.temperature, 0, 2),
      top_k: Math.floor(num(fields.top_k.value, DEFAULTS.top_k, 0, 1e9)),
      max_tokens: Math.floor(num(fields.max_tokens.value, DEFAULTS.max_tokens, 1, server ? server.max_tokens : 1e9)),
      system: fields.system.value,
      api_key: fields.api_key.value.trim(),
    };
    localStorage.setItem(SETTINGS, JSON.stringify(settings));
  }

  // ---- wiring --------------------------------------------------------------------------------------------
  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = el.input.value;
    if (!text.trim() || streaming) return;
    el.input.value = "";
    autosize();
    send(text);
  });
  el.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.form.requestSubmit();
    }
  });
  function autosize() {
    el.input.style.height = "auto";
    el.input.style.height = Math.min(el.input.scrollHeight, 200) + "px";
  }
  el.input.addEventListener("input", autosize);
  el.stop.addEventListener("click", stop);
  $("new-chat").addEventListener("click", newConversation);
  $("settings-btn").addEventListener("click", openSettings);
  $("settings-cancel").addEventListener("click", () => el.settings.close());
  $("settings-form").addEventListener("submit", () => saveSettings());
  $("toggle-sidebar").addEventListener("click", () => el.app.classList.toggle("sidebar-hidden"));
  el.messages.addEventListener("click", (e) => {
    const btn = e.target.closest(".copy-code");
    if (!btn) return;
    const code = btn.closest(".code").querySelector("pre");
    copyText(code.textContent);
    btn.textContent = "Copied";
    setTimeout(() => { btn.textContent = "Copy"; }, 1200);
  });
  window.addEventListener("storage", (e) => {
    if (e.key === STORE && !streaming) {
      conversations = load(STORE, []);
      renderAll();
    }
  });

  if (currentId && !current()) currentId = null;
  renderAll();
  checkHealth(); // loads /info once the server answers
  setInterval(checkHealth, 5000);
  el.input.focus();

  window.picochat = { renderMarkdown, escapeHtml };
})();
