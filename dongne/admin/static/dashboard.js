// dongne admin dashboard: vanilla JS, no dependencies.
//
// Data: /admin/api/regions (GeoJSON, drawn once as SVG), /admin/api/state (a
// first snapshot) and /admin/stream (server-sent events, a snapshot a second).
// User text (titles, nicks) is only ever set with textContent.
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const MAP_WIDTH = 1000;
  const PAD = 24;

  const byId = (id) => document.getElementById(id);

  function html(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  // Keyed update: reuse the child with the same key, create the missing ones,
  // drop the rest, keep the order of `items`.
  function sync(parent, items, keyOf, create, update) {
    const old = new Map();
    for (const child of Array.from(parent.children)) old.set(child.dataset.key, child);
    const nodes = items.map((item) => {
      const key = String(keyOf(item));
      let node = old.get(key);
      if (node) old.delete(key);
      else {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      return node;
    });
    for (const node of old.values()) node.remove();
    nodes.forEach((node, i) => {
      if (parent.children[i] !== node) parent.insertBefore(node, parent.children[i] || null);
    });
  }

  // ---- formatting ---------------------------------------------------------------

  function sloClass(value) {
    if (value === null || value === undefined) return "slo-none";
    if (value >= 0.9) return "slo-good";
    if (value >= 0.7) return "slo-warn";
    return "slo-bad";
  }

  const percent = (v) => (v === null || v === undefined ? "—" : `${Math.round(v * 100)} %`);

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
  }

  const clockTime = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

  // ---- the map ----------------------------------------------------------------

  // Rings of a Polygon or MultiPolygon geometry.
  function ringsOf(geometry) {
    if (geometry.type === "Polygon") return geometry.coordinates;
    if (geometry.type === "MultiPolygon") return geometry.coordinates.flat();
    return [];
  }

  function bboxOf(rings) {
    const b = [Infinity, Infinity, -Infinity, -Infinity];
    for (const ring of rings) {
      for (const [lng, lat] of ring) {
        b[0] = Math.min(b[0], lng); b[1] = Math.min(b[1], lat);
        b[2] = Math.max(b[2], lng); b[3] = Math.max(b[3], lat);
      }
    }
    return b;
  }

  const union = (boxes) => boxes.reduce(
    (a, b) => [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[2], b[2]), Math.max(a[3], b[3])],
    [Infinity, Infinity, -Infinity, -Infinity]);

  // Equirectangular, x scaled by cos(lat0). A region far from all the others
  // (Jeju's Chuja islands, 45 km north) is drawn at the same scale in an inset
  // in the top-left corner, as printed maps of Jeju do.
  function makeProjection(regions) {
    const isOutlier = (r) => {
      const rest = union(regions.filter((o) => o !== r).map((o) => o.bbox));
      const k = Math.cos(((rest[1] + rest[3]) / 2) * Math.PI / 180);
      const size = Math.max((rest[2] - rest[0]) * k, rest[3] - rest[1]);
      const dx = Math.max(0, rest[0] - r.bbox[2], r.bbox[0] - rest[2]) * k;
      const dy = Math.max(0, rest[1] - r.bbox[3], r.bbox[1] - rest[3]);
      return Math.hypot(dx, dy) > 0.25 * size;
    };
    let outliers = regions.length > 3 ? regions.filter(isOutlier) : [];
    if (outliers.length > 2) outliers = [];
    const main = union(regions.filter((r) => !outliers.includes(r)).map((r) => r.bbox));
    const k = Math.cos(((main[1] + main[3]) / 2) * Math.PI / 180);
    const scale = (MAP_WIDTH - 2 * PAD) / ((main[2] - main[0]) * k || 1);
    const height = (main[3] - main[1]) * scale + 2 * PAD;
    const base = (lng, lat) => [PAD + (lng - main[0]) * k * scale, PAD + (main[3] - lat) * scale];
    const insets = [];
    let left = 8;
    for (const r of outliers) {
      const margin = 0.012;
      const box = [r.bbox[0] - margin, r.bbox[1] - margin, r.bbox[2] + margin, r.bbox[3] + margin];
      const w = (box[2] - box[0]) * k * scale;
      const h = (box[3] - box[1]) * scale;
      const x0 = left, y0 = 8;
      left += w + 8;
      insets.push({
        box, frame: [x0, y0, w, h], name: r.name,
        project: (lng, lat) => [x0 + (lng - box[0]) * k * scale, y0 + (box[3] - lat) * scale],
      });
    }
    const project = (lng, lat) => {
      for (const inset of insets) {
        const b = inset.box;
        if (lng >= b[0] - 0.05 && lng <= b[2] + 0.05 && lat >= b[1] - 0.05 && lat <= b[3] + 0.05) {
          return inset.project(lng, lat);
        }
      }
      return base(lng, lat);
    };
    return { project, insets, width: MAP_WIDTH, height };
  }

  function pathData(rings, project) {
    return rings.map((ring) => ring.map(([lng, lat], i) => {
      const [x, y] = project(lng, lat);
      return `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    }).join("") + "Z").join("");
  }

  // Area-weighted centroid of the largest ring: where the label goes.
  function labelPoint(rings, project) {
    let best = null;
    for (const ring of rings) {
      const pts = ring.map(([lng, lat]) => project(lng, lat));
      let a = 0, cx = 0, cy = 0;
      for (let i = 0; i < pts.length - 1; i++) {
        const [x0, y0] = pts[i], [x1, y1] = pts[i + 1];
        const f = x0 * y1 - x1 * y0;
        a += f; cx += (x0 + x1) * f; cy += (y0 + y1) * f;
      }
      if (a !== 0 && (!best || Math.abs(a) > best.area)) best = { area: Math.abs(a), x: cx / (3 * a), y: cy / (3 * a) };
    }
    return best || { x: 0, y: 0 };
  }

  const map = { regions: [], projection: null, labels: new Map(), shapes: new Map() };

  function drawMap(geojson) {
    const regions = (geojson.features || []).map((f) => {
      const rings = ringsOf(f.geometry || {});
      const props = f.properties || {};
      return { name: String(props.name), nameKo: props.name_ko || null, rings, bbox: bboxOf(rings) };
    }).filter((r) => r.rings.length);
    const proj = makeProjection(regions);
    const root = byId("map");
    root.setAttribute("viewBox", `0 0 ${proj.width} ${proj.height.toFixed(0)}`);
    root.replaceChildren();
    const frames = svg("g", { class: "insets" });
    for (const inset of proj.insets) {
      const [x, y, w, h] = inset.frame;
      frames.append(svg("rect", { class: "inset-frame", x, y, width: w, height: h, rx: 4 }));
    }
    const shapes = svg("g", { class: "regions" });
    const labels = svg("g", { class: "labels" });
    for (const r of regions) {
      const shape = svg("path", { class: "region slo-none", d: pathData(r.rings, proj.project), "fill-rule": "evenodd" });
      shape.setAttribute("data-region", r.name);
      const tip = svg("title");
      tip.textContent = r.nameKo ? `${r.name} · ${r.nameKo}` : r.name;
      shape.append(tip);
      shapes.append(shape);
      map.shapes.set(r.name, { shape, tip });
      const at = labelPoint(r.rings, proj.project);
      const label = svg("text", { class: "region-label", x: at.x.toFixed(1), y: at.y.toFixed(1), "text-anchor": "middle" });
      label.setAttribute("data-region-label", r.name);
      const name = svg("tspan", { x: at.x.toFixed(1) });
      name.textContent = r.name;
      const sub = svg("tspan", { class: "sub", x: at.x.toFixed(1), dy: "14" });
      sub.textContent = "";
      label.append(name, sub);
      labels.append(label);
      map.labels.set(r.name, sub);
    }
    map.cells = svg("g", { class: "cells" });
    map.places = svg("g", { class: "places" });
    map.questions = svg("g", { class: "questions" });
    root.append(frames, shapes, map.cells, map.places, labels, map.questions);
    map.regions = regions;
    map.projection = proj;
  }

  function renderMap(state) {
    if (!map.projection) return;
    const slo = (state.slo && state.slo.regions) || {};
    const locals = state.locals_by_region || {};
    for (const r of map.regions) {
      const s = slo[r.name] || null;
      const value = s ? s.within_10m : null;
      const entry = map.shapes.get(r.name);
      const cls = sloClass(value);
      entry.shape.setAttribute("class", `region ${cls}`);
      entry.shape.setAttribute("data-slo", cls.slice(4));
      const name = r.nameKo ? `${r.name} · ${r.nameKo}` : r.name;
      entry.tip.textContent = `${name}\nanswered ≤ 10 min: ${percent(value)}\nlocals online: ${locals[r.name] || 0}`;
      const n = locals[r.name] || 0;
      map.labels.get(r.name).textContent = `${n} local${n === 1 ? "" : "s"} online`;
    }
    const project = map.projection.project;
    const hot = state.hotspots || {};
    const cells = hot.cells || [];
    const maxCell = Math.max(1, ...cells.map((c) => c.questions));
    sync(map.cells, cells, (c) => c.cell.join(","), () => svg("circle", { class: "map-cell" }), (node, c) => {
      const [x, y] = project(c.centre_lng, c.centre_lat);
      node.setAttribute("cx", x.toFixed(1));
      node.setAttribute("cy", y.toFixed(1));
      node.setAttribute("r", (7 + 13 * Math.sqrt(c.questions / maxCell)).toFixed(1));
      node.setAttribute("data-map-cell", c.cell.join(","));
    });
    const places = (hot.hotspots || []).filter((h) => typeof h.lat === "number" && typeof h.lng === "number");
    sync(map.places, places, (h) => h.name, (h) => {
      const node = svg("rect", { class: "map-place", width: 9, height: 9 });
      node.append(svg("title"));
      return node;
    }, (node, h) => {
      const [x, y] = project(h.lng, h.lat);
      node.setAttribute("x", (x - 4.5).toFixed(1));
      node.setAttribute("y", (y - 4.5).toFixed(1));
      node.setAttribute("transform", `rotate(45 ${x.toFixed(1)} ${y.toFixed(1)})`);
      node.setAttribute("data-map-hotspot", h.name);
      node.firstChild.textContent = `${h.name}: ${h.questions} questions, ${h.open} open`;
    });
    sync(map.questions, state.open || [], (q) => q.question_id, () => {
      const node = svg("circle", { r: 5.5 });
      node.append(svg("title"));
      return node;
    }, (node, q) => {
      const [x, y] = project(q.location.lng, q.location.lat);
      node.setAttribute("cx", x.toFixed(1));
      node.setAttribute("cy", y.toFixed(1));
      node.setAttribute("class", q.urgency === "urgent" ? "map-question urgent" : "map-question");
      node.setAttribute("data-map-question-id", q.question_id);
      node.firstChild.textContent = q.title;
    });
  }

  // ---- tables and lists ---------------------------------------------------------------

  let clockOffset = 0; // server ms minus browser ms
  const serverNow = () => Date.now() + clockOffset;

  function setAge(cell, createdAt) {
    const age = (serverNow() - createdAt) / 1000;
    cell.textContent = duration(age);
    cell.className = `num age${age >= 600 ? " bad" : age >= 300 ? " warn" : ""}`;
  }

  function renderQuestions(state) {
    const open = (state.open || []).slice().reverse(); // newest first
    const tbody = byId("questions-table").tBodies[0];
    sync(tbody, open, (q) => q.question_id, () => {
      const row = html("tr");
      for (let i = 0; i < 6; i++) row.append(html("td"));
      row.cells[4].className = "num";
      return row;
    }, (row, q) => {
      row.setAttribute("data-question-id", q.question_id);
      row.dataset.createdAt = q.created_at;
      setAge(row.cells[0], q.created_at);
      const title = html("span", { class: "title" }, q.title);
      const parts = [title];
      if ((q.hashtags || []).length) parts.push(html("span", { class: "tags" }, q.hashtags.map((t) => `#${t}`).join(" ")));
      if (q.urgency === "urgent") parts.push(html("span", { class: "badge urgent" }, "urgent"));
      row.cells[1].replaceChildren(...parts);
      row.cells[2].textContent = q.region || "—";
      row.cells[3].replaceChildren(html("span", { class: "badge" }, q.stage ? q.stage.toLowerCase() : "—"));
      row.cells[4].textContent = q.answer_count;
      row.cells[5].textContent = q.asker_nick;
    });
    byId("questions-empty").hidden = open.length > 0;
    const total = state.open_questions || 0; // the list holds the newest only (OPEN_LISTED)
    byId("open-count").textContent = total > open.length ? `newest ${open.length} of ${total}` : String(open.length);
  }

  function tickAges() {
    for (const row of byId("questions-table").tBodies[0].rows) setAge(row.cells[0], Number(row.dataset.createdAt));
  }

  function renderRegions(state) {
    const slo = (state.slo && state.slo.regions) || {};
    const locals = state.locals_by_region || {};
    const openBy = state.open_by_region || {}; // all open questions, not only the ones listed
    sync(byId("regions-table").tBodies[0], map.regions, (r) => r.name, (r) => {
      const row = html("tr", { "data-region-row": r.name });
      const name = html("td");
      name.append(html("i", { class: "chip slo-none" }), html("span", {}, r.name));
      if (r.nameKo) name.append(html("span", { class: "ko" }, r.nameKo));
      row.append(name, html("td", { class: "num" }), html("td", { class: "num" }), html("td", { class: "num" }), html("td", { class: "num" }));
      return row;
    }, (row, r) => {
      const s = slo[r.name] || null;
      const value = s ? s.within_10m : null;
      row.cells[0].firstChild.className = `chip ${sloClass(value)}`;
      row.cells[1].textContent = locals[r.name] || 0;
      row.cells[2].textContent = openBy[r.name] || 0;
      row.cells[3].textContent = percent(value);
      row.cells[4].textContent = s ? s.questions : 0;
    });
  }

  function renderHotspots(state) {
    const hot = state.hotspots || {};
    const spots = hot.hotspots || [];
    const cells = (hot.cells || []).slice(0, 5);
    byId("hotspots-window").textContent = hot.window_ms ? `last ${Math.round(hot.window_ms / 60000)} min` : "";
    sync(byId("hotspots-list"), spots, (h) => h.name, () => {
      const li = html("li");
      li.append(html("span"), html("span", { class: "meta" }));
      return li;
    }, (li, h) => {
      li.setAttribute("data-hotspot", h.name);
      li.firstChild.textContent = h.name_ko ? `${h.name} · ${h.name_ko}` : h.name;
      li.lastChild.textContent = `${h.region} · ${h.questions} asked, ${h.open} open, ${h.askers} askers`;
    });
    byId("hotspots-empty").hidden = spots.length > 0;
    sync(byId("cells-list"), cells, (c) => c.cell.join(","), () => {
      const li = html("li");
      li.append(html("span"), html("span", { class: "meta" }));
      return li;
    }, (li, c) => {
      li.setAttribute("data-hotspot-cell", c.cell.join(","));
      li.firstChild.textContent = `${c.centre_lat.toFixed(4)}, ${c.centre_lng.toFixed(4)}`;
      li.lastChild.textContent = `${c.questions} asked, ${c.open} open, ${c.askers} askers`;
    });
    byId("cells-empty").hidden = cells.length > 0;
  }

  function renderAlerts(state) {
    const alerts = state.alerts || [];
    sync(byId("alerts-list"), alerts, (a) => `${a.question_id}@${a.raised_at}`, () => {
      const li = html("li");
      li.append(html("span", { class: "title" }), html("span", { class: "meta" }));
      return li;
    }, (li, a) => {
      const q = a.question || {};
      li.setAttribute("data-alert-question-id", a.question_id);
      li.firstChild.textContent = q.title || a.question_id;
      const notified = a.notified === null || a.notified === undefined ? "" : `, ${a.notified} notified`;
      li.lastChild.textContent =
        `${clockTime(a.raised_at)} · ${q.region || "—"} · unanswered after ${duration(a.age_s)}` +
        ` · stage ${a.stage ? a.stage.toLowerCase() : "—"}${notified}`;
    });
    byId("alerts-empty").hidden = alerts.length > 0;
  }

  // This node and its peers on the same database (on SQLite: this node alone).
  function renderNodes(state) {
    const cluster = state.cluster || { nodes: [], shared: false, lease: null };
    sync(byId("nodes-list"), cluster.nodes, (n) => n.node_id, () => {
      const li = html("li");
      li.append(html("span", { class: "title" }), html("span", { class: "meta" }));
      return li;
    }, (li, n) => {
      li.setAttribute("data-node-id", n.node_id);
      li.firstChild.textContent = n.self ? `${n.node_id} (this node)` : n.node_id;
      const lease = cluster.lease && cluster.lease.holder === n.node_id ? " · leads escalation" : "";
      li.lastChild.textContent =
        `${n.host} pid ${n.pid} · up since ${clockTime(n.started_at)}` +
        ` · heartbeat ${duration(Math.max(0, (state.now - n.heartbeat_at) / 1000))} ago${lease}`;
    });
    byId("nodes-count").textContent = cluster.nodes.length;
    byId("nodes-note").textContent = cluster.shared ? "sharing one PostgreSQL database" : "SQLite: one node";
  }

  // Rates from successive samples of the counters, on the server's clock.
  let sample = null;
  function rate(prev, next, key) {
    const dt = (next.now - prev.now) / 1000;
    const d = next[key] - prev[key];
    return d >= 0 ? (d / dt).toFixed(1) : "—";
  }

  function renderStats(state) {
    byId("stat-connections").textContent = state.connections;
    byId("stat-users-online").textContent = state.users_online;
    byId("stat-locals-online").textContent = state.locals_online;
    byId("stat-open-questions").textContent = state.open_questions;
    byId("stat-slow-consumers").textContent = state.slow_consumers;
    byId("stat-slo-10m").textContent = percent(state.slo && state.slo.overall ? state.slo.overall.within_10m : null);
    if (sample === null) {
      sample = state;
    } else if (state.now - sample.now >= 500) {
      byId("stat-frames-rate").textContent = rate(sample, state, "frames_in");
      byId("stat-deliveries-rate").textContent = rate(sample, state, "deliveries");
      sample = state;
    }
  }

  function render(state) {
    clockOffset = state.now - Date.now();
    byId("updated").textContent = clockTime(state.now);
    renderStats(state);
    renderMap(state);
    renderRegions(state);
    renderQuestions(state);
    renderHotspots(state);
    renderAlerts(state);
    renderNodes(state);
  }

  // ---- plumbing ---------------------------------------------------------------------

  function setLive(state, text) {
    const badge = byId("live-status");
    badge.dataset.state = state;
    badge.textContent = text;
  }

  async function fetchJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      window.location.assign("/admin"); // shows the login form and why
      throw new Error(`signed out (${response.status})`);
    }
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  function connect() {
    const source = new EventSource("/admin/stream");
    source.onopen = () => setLive("live", "live");
    source.onmessage = (event) => {
      setLive("live", "live");
      render(JSON.parse(event.data));
    };
    source.addEventListener("signed-out", () => {
      source.close();
      window.location.assign("/admin");
    });
    source.onerror = () => {
      setLive("reconnecting", "reconnecting…");
      if (source.readyState === EventSource.CLOSED) {
        // Refused (e.g. the token expired): find out why, or retry later.
        fetchJSON("/admin/api/state").then(() => setTimeout(connect, 2000), () => {});
      }
    };
  }

  async function start() {
    drawMap(await fetchJSON("/admin/api/regions"));
    render(await fetchJSON("/admin/api/state"));
    connect();
    setInterval(tickAges, 500);
  }

  start().catch((error) => {
    setLive("reconnecting", "error");
    console.error(error);
  });
})();
