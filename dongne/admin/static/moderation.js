// dongne admin: the moderation panel. The page is a protocol client: it gets
// a short-lived admin token from POST /admin/api/session-token (CSRF-checked:
// the X-Dongne-CSRF header carries the token from the page's <meta>), opens a
// WebSocket to the client port, says hello and sends the moderation
// operations of PROTOCOL.md as msgpack (msgpack.js). User text (reported
// answers, notes, reasons, nicks) is only ever set with textContent.
"use strict";

(() => {
  const POLL_MS = 3000;
  const byId = (id) => document.getElementById(id);
  const { encode, decode } = window.DongneMsgpack;
  const csrfMeta = document.querySelector('meta[name="dongne-csrf"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  class OpError extends Error {
    constructor(error) {
      super(error && error.message ? error.message : "request failed");
      this.code = error && error.code ? error.code : "internal";
    }
  }

  // ---- formatting ---------------------------------------------------------------

  let clockOffset = 0; // server ms minus browser ms, from hello
  const serverNow = () => Date.now() + clockOffset;
  const FOREVER = 2 ** 61; // anything this far off is "for good"

  function ago(ms) {
    const s = Math.max(0, Math.floor((serverNow() - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  }

  function until(ms) {
    if (ms === null || ms === undefined || ms >= FOREVER) return "for good";
    return `until ${new Date(ms).toLocaleString([], { hour12: false })}`;
  }

  function setStatus(state, text) {
    const badge = byId("mod-status");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  let messageTimer = null;
  function say(text, isError) {
    const box = byId("mod-message");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = false;
    clearTimeout(messageTimer);
    messageTimer = setTimeout(() => { box.hidden = true; }, isError ? 10000 : 5000);
  }

  // ---- the connection -----------------------------------------------------------

  let ws = null;
  let nextId = 1;
  const pending = new Map();
  let backoff = 1000;
  let poll = null;

  function request(type, data) {
    return new Promise((resolve, reject) => {
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new OpError({ code: "disconnected", message: "not connected to the server" }));
        return;
      }
      const id = nextId++;
      pending.set(id, { resolve, reject });
      ws.send(encode({ type, id, data: data || {} }));
    });
  }

  async function sessionToken() {
    const response = await fetch("/admin/api/session-token", {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Dongne-CSRF": csrf },
    });
    if (response.status === 401 || response.status === 403) {
      window.location.assign("/admin"); // the login form says why (signed out, banned, no admin role)
      throw new Error("signed out");
    }
    if (!response.ok) throw new Error(`session token: HTTP ${response.status}`);
    return response.json();
  }

  function retry() {
    setStatus("reconnecting", "reconnecting…");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 30000);
  }

  async function connect() {
    setStatus("connecting", "connecting…");
    let grant;
    try {
      grant = await sessionToken();
    } catch (error) {
      console.warn(error);
      retry();
      return;
    }
    const socket = new WebSocket(grant.url);
    ws = socket;
    socket.binaryType = "arraybuffer";
    socket.onopen = async () => {
      try {
        const hello = await request("hello", { token: grant.token });
        clockOffset = hello.server_time - Date.now();
        backoff = 1000;
        setStatus("live", "live");
        await refresh();
        poll = setInterval(refresh, POLL_MS);
      } catch (error) {
        say(`Could not sign in to the server: ${error.message}`, true);
        socket.close();
      }
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = decode(event.data);
      } catch (error) {
        console.warn("undecodable frame", error);
        return;
      }
      if (message.type !== "reply") return; // events: the dashboard shows alerts already
      const waiter = pending.get(message.id);
      if (!waiter) return;
      pending.delete(message.id);
      if (message.ok) waiter.resolve(message.data || {});
      else waiter.reject(new OpError(message.error));
    };
    socket.onclose = (event) => {
      if (ws !== socket) return;
      ws = null;
      clearInterval(poll);
      poll = null;
      for (const waiter of pending.values()) {
        waiter.reject(new OpError({ code: "disconnected", message: "the connection closed" }));
      }
      pending.clear();
      if (event.code === 4003) {
        // Banned: final (PROTOCOL.md, "Close codes"); the dashboard refuses this session too.
        say(`This admin account is banned: ${event.reason}`, true);
        setStatus("banned", "banned");
        return;
      }
      retry();
    };
  }

  // ---- reading ------------------------------------------------------------------

  let ipBlocksSupported = true;
  let refreshing = false;

  async function fetchBans() {
    const response = await fetch("/admin/api/bans", { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      window.location.assign("/admin");
      throw new Error("signed out");
    }
    if (!response.ok) throw new Error(`bans: HTTP ${response.status}`);
    return (await response.json()).bans || [];
  }

  async function ipBlocks() {
    if (!ipBlocksSupported) return null;
    try {
      return await request("list_ip_blocks", {});
    } catch (error) {
      if (error.code === "unknown_op") {
        ipBlocksSupported = false;
        return null;
      }
      throw error;
    }
  }

  async function refresh() {
    if (refreshing || !ws) return;
    refreshing = true;
    try {
      const [reports, audit, blocks, bans] = await Promise.all([
        request("list_reports", { status: "open", limit: 100 }),
        request("list_audit", { limit: 15 }),
        ipBlocks(),
        fetchBans(),
      ]);
      renderReports(reports.reports || [], reports.next != null);
      renderAudit(audit.entries || []);
      renderBlocks(blocks);
      renderBans(bans);
    } catch (error) {
      if (error.code !== "disconnected") say(`Could not refresh: ${error.message}`, true);
    } finally {
      refreshing = false;
    }
  }

  // ---- acting -------------------------------------------------------------------

  async function act(card, op, data, done) {
    const buttons = card.querySelectorAll("button");
    for (const b of buttons) b.disabled = true;
    try {
      const result = await request(op, data);
      say(done(result), false);
      await refresh();
    } catch (error) {
      say(`${op} failed: ${error.message}`, true);
    } finally {
      for (const b of buttons) b.disabled = false;
    }
  }

  // A ban takes two clicks: the first arms the button for a few seconds.
  function armed(button, label) {
    if (button.dataset.armed === "1") return true;
    const original = button.textContent;
    button.dataset.armed = "1";
    button.textContent = label;
    setTimeout(() => {
      button.dataset.armed = "";
      button.textContent = original;
    }, 4000);
    return false;
  }

  const REASONS = { spam: "spam", abuse: "abuse", wrong: "wrong", other: "other" };

  function renderReports(reports, more = false) {
    // One card per reported item, keyed by its newest report (the list is newest first).
    const items = new Map();
    for (const r of reports) {
      const key = `${r.item.kind}:${r.item.id}`;
      if (!items.has(key)) items.set(key, { item: r.item, reports: [] });
      items.get(key).reports.push(r);
    }
    const list = byId("reports-list");
    const cards = [];
    const old = new Map(Array.from(list.children).map((c) => [c.dataset.key, c]));
    for (const [key, group] of items) {
      const stamp = group.reports.map((r) => r.report_id).join(",") + (group.item.hidden ? ":h" : "");
      let card = old.get(key);
      if (card && card.dataset.stamp === stamp) {
        old.delete(key);
        card.querySelector(".when").textContent = ago(group.reports[0].created_at);
      } else {
        card = reportCard(group);
        card.dataset.key = key;
        card.dataset.stamp = stamp;
      }
      cards.push(card);
    }
    list.replaceChildren(...cards);
    byId("reports-empty").hidden = cards.length > 0;
    // The newest 100 open reports are listed; more wait their turn (the panel refreshes as they are resolved).
    byId("reports-count").textContent = more ? `${reports.length}+` : String(reports.length);
  }

  function reportCard(group) {
    const { item, reports } = group;
    const newest = reports[0];
    const card = el("li", {
      class: "report",
      "data-report-id": newest.report_id,
      "data-item-kind": item.kind,
      "data-item-id": item.id,
    });
    const head = el("div", { class: "report-head" });
    head.append(el("span", { class: "badge kind" }, item.kind));
    if (item.hidden) head.append(el("span", { class: "badge hidden-badge" }, "hidden"));
    const n = reports.length;
    head.append(
      el("span", { class: "meta-inline" }, `${n} report${n === 1 ? "" : "s"} · by ${item.author_id} · `),
      el("span", { class: "meta-inline when" }, ago(newest.created_at)),
    );
    const text = el("blockquote", { class: "reported-text" }, item.text);
    const why = el("ul", { class: "report-reasons" });
    for (const r of reports) {
      const li = el("li");
      li.append(el("span", { class: `badge reason reason-${REASONS[r.reason] || "other"}` }, r.reason));
      li.append(el("span", { class: "reporter" }, ` from ${r.reporter_id}`));
      if (r.note) li.append(el("span", { class: "note" }, ` “${r.note}”`));
      why.append(li);
    }
    const actions = el("div", { class: "actions" });
    const hide = el("button", { type: "button", class: "btn", "data-action": "hide" }, item.hidden ? "Keep hidden" : "Hide");
    const ban = el("button", { type: "button", class: "btn danger", "data-action": "ban" }, "Ban author");
    const dismiss = el("button", { type: "button", class: "btn quiet", "data-action": "dismiss" },
      item.hidden ? "Dismiss and show" : "Dismiss");
    const resolve = (action) => act(card, "resolve_report", { report_id: newest.report_id, action },
      (r) => `${action === "dismiss" ? "Dismissed" : action === "hide" ? "Hidden" : "Banned the author of"} the ${item.kind} (${r.resolved} report${r.resolved === 1 ? "" : "s"} closed).`);
    hide.addEventListener("click", () => resolve("hide"));
    dismiss.addEventListener("click", () => resolve("dismiss"));
    ban.addEventListener("click", () => { if (armed(ban, "Confirm ban")) resolve("ban"); });
    actions.append(hide, ban, dismiss);
    card.append(head, text, why, actions);
    return card;
  }

  function renderBans(bans) {
    const list = byId("bans-list");
    list.replaceChildren(...bans.map((b) => {
      const li = el("li", { "data-ban-user-id": b.user_id });
      const who = el("span", { class: "title" }, b.nick && b.nick !== b.user_id ? `${b.nick} (${b.user_id})` : b.user_id);
      const meta = el("span", { class: "meta" }, `${until(b.banned_until)}${b.reason ? ` · ${b.reason}` : ""}`);
      const unban = el("button", { type: "button", class: "btn quiet small-btn", "data-action": "unban" }, "Unban");
      unban.addEventListener("click", () => act(li, "unban_user", { user_id: b.user_id, reason: "lifted on the dashboard" },
        () => `Unbanned ${b.user_id}.`));
      const row = el("div", { class: "row" });
      row.append(who, unban);
      li.append(row, meta);
      return li;
    }));
    byId("bans-empty").hidden = bans.length > 0;
  }

  function renderBlocks(result) {
    const box = byId("ip-blocks-box");
    if (result === null) {
      box.hidden = true;
      return;
    }
    box.hidden = false;
    const blocks = result.blocks || [];
    const fixed = result.static || [];
    const list = byId("ip-blocks-list");
    const rows = blocks.map((b) => {
      const li = el("li", { "data-ip-block": b.cidr });
      const row = el("div", { class: "row" });
      const unblock = el("button", { type: "button", class: "btn quiet small-btn", "data-action": "unblock" }, "Unblock");
      unblock.addEventListener("click", () => act(li, "unblock_ip", { cidr: b.cidr }, () => `Unblocked ${b.cidr}.`));
      row.append(el("span", { class: "title mono" }, b.cidr), unblock);
      li.append(row, el("span", { class: "meta" }, `${until(b.until)} · ${b.reason || "no reason"} · by ${b.admin_id}`));
      return li;
    });
    for (const cidr of fixed) {
      const li = el("li", { "data-ip-block": cidr });
      li.append(el("span", { class: "title mono" }, cidr), el("span", { class: "meta" }, "config.toml (stays until removed there)"));
      rows.push(li);
    }
    list.replaceChildren(...rows);
    byId("ip-blocks-empty").hidden = rows.length > 0;
  }

  function renderAudit(entries) {
    byId("audit-list").replaceChildren(...entries.map((e) => {
      const li = el("li", { "data-audit-id": e.id });
      li.append(
        el("span", {}, `${e.admin_id} · ${e.action.replaceAll("_", " ")} · ${e.target}`),
        el("span", { class: "meta" }, `${ago(e.at)}${e.reason ? ` · ${e.reason}` : ""}`),
      );
      return li;
    }));
    byId("audit-empty").hidden = entries.length > 0;
  }

  connect();
})();
