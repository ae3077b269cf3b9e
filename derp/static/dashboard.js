// tailnet-core live dashboard: renders the server-sent snapshots of /dashboard/events.
// Hand-written, no dependencies. Everything is built with DOM calls and textContent
// (never innerHTML with server data). The page works for both variants: derper's
// relay-only snapshot and tailnet serve's full one (coordinator, peers, tunnels).
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f7ed8", "#e4572e", "#17a589", "#a569bd", "#f4a259", "#5d6d7e", "#c0392b"];
  const state = { history: [], built: false, last: 0, snap: null };

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }

  function num(n, unit) {
    if (n === null || n === undefined) return "–";
    const units = ["", "k", "M", "G", "T"];
    let i = 0;
    let v = Number(n);
    while (Math.abs(v) >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    const digits = i === 0 ? (Number.isInteger(v) ? 0 : 1) : (v < 10 ? 2 : v < 100 ? 1 : 0);
    return v.toFixed(digits) + (units[i] ? " " + units[i] : (unit ? " " : "")) + (unit || "");
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i === 0 ? 0 : 1) + " " + units[i];
  }

  function ago(t, now) {
    if (!t) return "–";
    const s = Math.max(0, now - t);
    if (s < 60) return Math.floor(s) + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min ago";
    if (s < 86400) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(1) + " d ago";
  }

  function shortKey(k) {
    if (!k) return "–";
    const i = k.indexOf(":");
    return i >= 0 ? k.slice(0, i + 1) + k.slice(i + 1, i + 9) + "…" : k.slice(0, 8) + "…";
  }

  // ------------------------------------------------------------------ layout

  function card(id, label) {
    return el("div", { class: "card", id: "card-" + id },
      el("div", { class: "label", text: label }),
      el("div", { class: "value", id: id, text: "–" }),
      el("div", { class: "sub", id: id + "-sub", text: "" }));
  }

  function panel(id, title, ...body) {
    return el("section", { class: "panel", id: id }, el("h2", { text: title }), ...body);
  }

  function tablePanel(id, title, columns) {
    const head = el("tr", {}, ...columns.map((c) => el("th", { text: c })));
    return panel(id, title,
      el("p", { class: "muted count", id: id + "-count", text: "" }),
      el("table", {}, el("thead", {}, head), el("tbody", { id: id + "-body" })));
  }

  function chartPanel(id, title) {
    const s = svg("svg", { viewBox: "0 0 600 170", preserveAspectRatio: "none", class: "chart", id: id + "-svg" });
    return panel(id, title, s, el("div", { class: "legend", id: id + "-legend" }));
  }

  function build(snap) {
    const app = document.getElementById("app");
    app.textContent = "";
    const cards = el("div", { class: "cards" });
    if (snap.coordinator) {
      cards.append(card("peers-total", "Coordinator peers"), card("tunnels-total", "Tunnels"));
    }
    cards.append(
      card("derp-conns", "DERP connections"),
      card("packets-rate", "Packets/s relayed"),
      card("bytes-rate", "Bytes/s relayed"),
      card("drops-rate", "Drops/s"),
      card("stun-rate", "STUN requests/s"),
      card("health-verdict", "Health"));
    app.append(cards);
    const charts = el("div", { class: "grid3" },
      chartPanel("chart-packets", "Packets per second"),
      chartPanel("chart-bytes", "Bytes per second"),
      chartPanel("chart-drops", "Drops per second, by reason"));
    app.append(charts);
    if (snap.coordinator) {
      app.append(
        tablePanel("peers", "Peers", ["Name", "Kind", "Node key", "Home region", "Addresses", "Connected", "Last update", "Replica"]),
        tablePanel("tunnels", "Tunnels", ["From", "", "To"]));
    }
    if (snap.relay.workers) {
      app.append(tablePanel("workers", "Workers (derper --workers)",
        ["Worker", "Connections", "Home", "Accepted", "Refused", "Packets in", "Packets out"]));
    }
    app.append(
      el("div", { class: "grid2" },
        tablePanel("talkers", "Top talkers", ["Connection", "Sent/s", "Received/s"]),
        panel("health", "Health", el("div", { id: "health-body" }))),
      tablePanel("conns", "DERP connections", ["Key", "Peer", "Remote address", "Connected", "Home", "Kind", "Sent/s", "Received/s"]),
      el("div", { class: "grid2" },
        tablePanel("mesh", "Mesh links", ["Peer", "State", "Routes"]),
        tablePanel("stun", "STUN", ["Disposition", "Requests"])),
      el("p", { class: "muted foot", id: "foot", text: "" }));
    state.built = true;
  }

  // ------------------------------------------------------------------ rendering

  function setText(id, text) {
    const e = document.getElementById(id);
    if (e) e.textContent = text;
  }

  function fillTable(id, rows, total, noun) {
    const body = document.getElementById(id + "-body");
    if (!body) return;
    body.textContent = "";
    for (const r of rows) body.append(r);
    const shown = rows.length;
    let text = total === undefined ? "" : (total + " " + noun + (total === 1 ? "" : "s"));
    if (total !== undefined && shown < total) text += " (" + shown + " shown)";
    setText(id + "-count", text);
    if (!shown) {
      const cols = body.parentElement.querySelectorAll("th").length;
      body.append(el("tr", { class: "empty" }, el("td", { colspan: String(cols), text: "none" })));
    }
  }

  function td(text, cls, title) {
    const a = { text: text };
    if (cls) a.class = cls;
    if (title) a.title = title;
    return el("td", a);
  }

  function badge(sev) {
    return el("span", { class: "badge sev-" + (sev || "ok"), text: sev || "ok" });
  }

  function renderChart(id, series, fmt) {
    const s = document.getElementById(id + "-svg");
    if (!s) return;
    s.textContent = "";
    const pts = state.history;
    let max = 0;
    for (const ser of series) for (const p of pts) max = Math.max(max, ser.get(p) || 0);
    const top = max > 0 ? max * 1.1 : 1;
    for (let i = 1; i <= 3; i++) {
      const y = 160 - (150 * i) / 3;
      s.append(svg("line", { x1: 0, x2: 600, y1: y, y2: y, class: "grid" }));
    }
    const lbl = svg("text", { x: 4, y: 14, class: "axis" });
    lbl.textContent = fmt(top);
    s.append(lbl);
    const n = Math.max(pts.length, 2);
    const legend = document.getElementById(id + "-legend");
    legend.textContent = "";
    series.forEach((ser, k) => {
      const color = COLORS[k % COLORS.length];
      const coords = pts.map((p, i) => {
        const x = (600 * (i + (n - pts.length))) / (n - 1);
        const y = 160 - (150 * (ser.get(p) || 0)) / top;
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      if (coords.length) s.append(svg("polyline", { points: coords.join(" "), stroke: color, class: "line" }));
      const last = pts.length ? ser.get(pts[pts.length - 1]) : 0;
      const sw = el("span", { class: "swatch" });
      sw.style.background = color;
      legend.append(el("span", { class: "key" }, sw, document.createTextNode(ser.name + " " + fmt(last || 0))));
    });
  }

  function render(snap) {
    if (!state.built) build(snap);
    const now = snap.now;
    const relay = snap.relay;
    const r = relay.rates;
    setText("derp-conns", num(relay.connections));
    setText("derp-conns-sub", relay.home_connections + " home · " + relay.accepts + " accepted");
    setText("packets-rate", num(r.packets_out));
    setText("packets-rate-sub", "in " + num(r.packets_in) + "/s · total " + num(relay.totals.packets_out));
    setText("bytes-rate", bytes(r.bytes_out) + "/s");
    setText("bytes-rate-sub", "total " + bytes(relay.totals.bytes_out));
    setText("drops-rate", num(r.drops));
    setText("drops-rate-sub", "total " + num(relay.totals.drops));
    setText("stun-rate", relay.stun.enabled ? num(relay.stun.rate) : "off");
    setText("stun-rate-sub", relay.stun.enabled ? "total " + num(relay.totals.stun) : "");
    const h = snap.health || {};
    const verdict = document.getElementById("health-verdict");
    if (verdict) {
      verdict.textContent = "";
      verdict.append(badge(h.severity));
    }
    setText("health-verdict-sub", h.time ? "checked " + ago(Date.parse(h.time) / 1000, now) : "");

    // charts
    renderChart("chart-packets", [
      { name: "in", get: (p) => p.packets_in },
      { name: "out", get: (p) => p.packets_out }], num);
    renderChart("chart-bytes", [
      { name: "in", get: (p) => p.bytes_in },
      { name: "out", get: (p) => p.bytes_out }], (v) => bytes(v) + "/s");
    const reasons = Object.keys(relay.drops).filter((k) => relay.drops[k].total > 0);
    renderChart("chart-drops", (reasons.length ? reasons : ["unknown_dest"]).map((k) => (
      { name: k, get: (p) => (p.drops || {})[k] || 0 })), num);

    // coordinator
    const keyNames = {};
    if (snap.coordinator) {
      const c = snap.coordinator;
      setText("peers-total", num(c.peers_total));
      setText("peers-total-sub", Object.entries(c.peers_by_kind).map(([k, v]) => v + " " + k).join(" · "));
      setText("tunnels-total", num(c.tunnels_total));
      setText("tunnels-total-sub", c.backend + (c.healthy ? "" : " · refusing peers"));
      const rows = c.peers.map((p) => {
        if (p.node_key) keyNames[p.node_key] = p.name;
        const tr = el("tr", { "data-peer-id": p.id, "data-kind": p.kind },
          td(p.name, "name", p.id), td(p.kind), td(shortKey(p.node_key), "mono", p.node_key || ""),
          td(p.home_region ? String(p.home_region) : "–"), td((p.addresses || []).join(", "), "mono"),
          td(ago(p.connected_since, now), "", new Date(p.connected_since * 1000).toISOString()),
          td(ago(p.last_update, now)), td(p.replica ? p.replica.slice(0, 8) : "–", "mono", p.replica || ""));
        return tr;
      });
      fillTable("peers", rows, c.peers_total, "peer");
      fillTable("tunnels", c.tunnels.map((t) => el("tr", { "data-src": t.src, "data-dst": t.dst },
        td(t.src_name, "", t.src), td("→", "arrow"), td(t.dst_name, "", t.dst))), c.tunnels_total, "tunnel");
    }

    // workers of derper --workers N (the totals above are over all of them)
    if (relay.workers) {
      fillTable("workers", relay.workers.map((w) => el("tr", { "data-worker": String(w.worker) },
        td(String(w.worker) + (w.worker === relay.worker ? " (this page)" : "")),
        td(num(w.connections), "num"), td(num(w.home_connections), "num"), td(num(w.accepts), "num"),
        td(num(w.accepts_rejected), "num"), td(num(w.packets_in), "num"),
        td(num(w.packets_out), "num"))), relay.workers.length, "worker");
    }

    // DERP connections and top talkers
    const named = (c) => c.name || keyNames[c.key] || "";
    fillTable("conns", relay.conns.map((c) => el("tr", { "data-key": c.key },
      td(shortKey(c.key), "mono", c.key), td(named(c)), td(c.remote, "mono"), td(ago(c.since, now)),
      td(c.home ? "yes" : ""), td(c.mesh ? "mesh" : c.prober ? "prober" : "client"),
      td(c.tx_rate === null ? "–" : bytes(c.tx_rate) + "/s", "num"),
      td(c.rx_rate === null ? "–" : bytes(c.rx_rate) + "/s", "num"))), relay.conns_total, "connection");
    if (relay.workers) {
      const e = document.getElementById("conns-count");
      if (e) e.textContent += " on worker " + relay.worker;
    }
    const talkers = relay.conns.filter((c) => (c.tx_rate || 0) + (c.rx_rate || 0) > 0).slice(0, 5);
    fillTable("talkers", talkers.map((c) => el("tr", {},
      td(named(c) || shortKey(c.key), "", c.key), td(bytes(c.tx_rate) + "/s", "num"), td(bytes(c.rx_rate) + "/s", "num"))));
    fillTable("mesh", relay.mesh.map((m) => el("tr", {},
      td(m.url, "mono"), td(m.self ? "this node" : m.connected ? "connected" : "down", m.connected || m.self ? "ok" : "bad"),
      td(String(m.routes), "num"))));
    fillTable("stun", Object.entries(relay.stun.requests).map(([k, v]) => el("tr", {}, td(k), td(num(v), "num"))));

    // health
    const hb = document.getElementById("health-body");
    if (hb) {
      hb.textContent = "";
      const list = el("ul", { class: "health" });
      for (const [name, sec] of Object.entries(h.sections || {})) {
        list.append(el("li", { "data-section": name }, badge(sec.severity), document.createTextNode(" " + name + (sec.error ? ": " + sec.error : ""))));
      }
      hb.append(list);
      if (h.link) hb.append(el("a", { href: h.link, text: "full report" }));
    }
    setText("foot", "server key " + relay.key + " · up " + ago(now - snap.uptime, now).replace(" ago", "") +
      " · updated " + new Date(now * 1000).toLocaleTimeString());
    // Raw totals for scripts and tests (the cards show rounded numbers).
    document.body.dataset.packetsOut = String(relay.totals.packets_out);
    document.body.dataset.derpConnections = String(relay.connections);
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  }

  // ------------------------------------------------------------------ feed

  function connect() {
    const url = document.body.dataset.events;
    const status = document.getElementById("status");
    const es = new EventSource(url);
    es.addEventListener("history", (ev) => {
      state.history = JSON.parse(ev.data).points || [];
    });
    es.addEventListener("snapshot", (ev) => {
      const snap = JSON.parse(ev.data);
      if (snap.point && state.snap && snap.point.t > state.last) {
        state.history.push(snap.point);
        if (state.history.length > 120) state.history.shift();
      }
      if (snap.point) state.last = snap.point.t;
      state.snap = snap;
      render(snap);
      status.textContent = "live";
      status.className = "status live";
    });
    es.onerror = () => {
      status.textContent = es.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…";
      status.className = "status down";
      if (es.readyState === EventSource.CLOSED) setTimeout(connect, 2000);
    };
  }

  document.addEventListener("DOMContentLoaded", connect);
})();
