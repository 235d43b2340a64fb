// filewatch: the live page. Plain JavaScript, no framework, no build step.
//
// Data: GET /files/?detail=1 once (its `version` is where the stream resumes),
// then GET /files/events?since=<version> (Server-Sent Events: add, remove,
// modify, version, reset, dropped), and GET /watchers every 2 s.
//
// The list is one array sorted like /files/ (filename in Unicode code point
// order, then node); a change is applied by binary search, a burst of changes
// by one merge. Only the rows on screen exist in the DOM: rows have a fixed
// height, a spacer gives the scroll height, and a pool of row elements is
// re-filled as the view scrolls.
"use strict";

(() => {
  const ROW_HEIGHT = 28; // px; the same as --row-height in style.css
  const OVERSCAN = 6; // rows rendered above and below the visible ones
  const MAX_SCROLL_PX = 8000000; // taller lists scale scroll positions (browser limits)
  const WATCHERS_PERIOD_MS = 2000;
  const BATCH_DELAY_MS = 20; // changes are applied in batches, at most this late
  const MERGE_AT = 256; // a batch this large is merged in one pass, not spliced
  const RETRY_MIN_MS = 500;
  const RETRY_MAX_MS = 5000;

  const $ = (id) => document.getElementById(id);
  const el = {
    state: $("state"),
    stateDetail: $("state-detail"),
    count: $("count"),
    filter: $("filter"),
    shown: $("shown"),
    viewport: $("viewport"),
    spacer: $("spacer"),
    rows: $("rows"),
    empty: $("empty"),
    watchers: $("watchers-body"),
    watchersNote: $("watchers-note"),
    watchersCount: $("watchers-count"),
    tz: $("tz"),
    table: $("table"),
  };

  // ------------------------------------------------------------ ordering

  const isSurrogate = (u) => u >= 0xd800 && u <= 0xdfff;
  const isHigh = (u) => u >= 0xd800 && u <= 0xdbff;

  // Compares two strings by Unicode code points (JavaScript's < compares UTF-16
  // code units, which puts U+10000.. before U+E000..U+FFFF). Lone surrogates
  // (a name's undecodable bytes, U+DC80..U+DCFF) count as their own code point.
  function compareCodePoints(a, b) {
    if (a === b) return 0;
    const n = Math.min(a.length, b.length);
    let i = 0;
    while (i < n && a.charCodeAt(i) === b.charCodeAt(i)) i++;
    if (i === n) return a.length - b.length; // a prefix sorts first
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (!isSurrogate(x) && !isSurrogate(y)) return x - y;
    // Compare whole code points from the start of the one that differs.
    const j = i > 0 && isHigh(a.charCodeAt(i - 1)) ? i - 1 : i;
    const p = a.codePointAt(j);
    const q = b.codePointAt(j);
    if (p !== q) return p - q;
    return a.codePointAt(i) - b.codePointAt(i); // the same lone high surrogate at j
  }

  const compareEntries = (a, filename, node) =>
    compareCodePoints(a.filename, filename) || compareCodePoints(a.node, node);

  // The first index whose entry is not before (filename, node).
  function lowerBound(list, filename, node) {
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (compareEntries(list[mid], filename, node) < 0) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  // ------------------------------------------------------------ the data

  let files = []; // every entry {filename, node, size, modified}, sorted
  let view = files; // the entries the filter keeps (=== files when there is none)
  let query = ""; // the filter, lower-cased
  let version = 0; // the index version the list is at
  let source = null; // the current EventSource
  let pending = []; // changes not applied yet
  let flushTimer = 0;
  const applied = { one: 0, merged: 0 }; // changes applied each way (for the tests)

  function lowered(entry) {
    if (entry._name === undefined) {
      entry._name = entry.filename.toLowerCase();
      entry._node = entry.node.toLowerCase();
    }
    return entry;
  }

  function keeps(entry) {
    if (!query) return true;
    const e = lowered(entry);
    return e._name.includes(query) || e._node.includes(query);
  }

  function refilter() {
    view = query ? files.filter(keeps) : files;
  }

  function setDetail(entry, change) {
    entry.size = change.size ?? null;
    entry.modified = change.modified ?? null;
    entry._time = undefined;
  }

  const newEntry = (c) => ({
    filename: c.filename,
    node: c.node,
    size: c.size ?? null,
    modified: c.modified ?? null,
  });

  function applyOne(change) {
    const i = lowerBound(files, change.filename, change.node);
    const at = files[i];
    const found = at !== undefined && at.filename === change.filename && at.node === change.node;
    if (change.kind === "remove") {
      if (!found) return;
      files.splice(i, 1);
      if (view !== files && keeps(at)) {
        const j = lowerBound(view, at.filename, at.node);
        if (view[j] === at) view.splice(j, 1);
      }
    } else if (found) {
      setDetail(at, change);
    } else {
      const entry = newEntry(change);
      files.splice(i, 0, entry);
      if (view !== files && keeps(entry)) {
        view.splice(lowerBound(view, entry.filename, entry.node), 0, entry);
      }
    }
  }

  // Many changes at once (a watcher's snapshot): the last change of each key,
  // sorted, merged with the list in one pass.
  function applyMany(batch) {
    const last = new Map();
    for (const c of batch) last.set(c.filename + "\u0000" + c.node, c);
    const changes = Array.from(last.values());
    changes.sort((a, b) => compareEntries(a, b.filename, b.node));
    const out = [];
    let i = 0;
    for (const c of changes) {
      while (i < files.length && compareEntries(files[i], c.filename, c.node) < 0) {
        out.push(files[i++]);
      }
      const found = i < files.length && compareEntries(files[i], c.filename, c.node) === 0;
      if (c.kind === "remove") {
        if (found) i++;
      } else if (found) {
        setDetail(files[i], c);
        out.push(files[i++]);
      } else {
        out.push(newEntry(c));
      }
    }
    while (i < files.length) out.push(files[i++]);
    files = out;
    refilter();
  }

  function flush() {
    if (flushTimer) clearTimeout(flushTimer);
    flushTimer = 0;
    const batch = pending;
    if (batch.length === 0) return;
    pending = [];
    if (batch.length >= MERGE_AT) {
      applyMany(batch);
      applied.merged += batch.length;
    } else {
      for (const c of batch) applyOne(c);
      applied.one += batch.length;
    }
    for (const c of batch) if (c.version > version) version = c.version;
    scheduleRender();
  }

  function queueChange(kind, data) {
    data.kind = kind;
    pending.push(data);
    if (!flushTimer) flushTimer = setTimeout(flush, BATCH_DELAY_MS);
  }

  // ------------------------------------------------------------ the connection

  const STATES = {
    connecting: "loading the list",
    live: "following every change",
    reconnecting: "connection lost, retrying: the list may be out of date",
    behind: "fell behind: reloading the list",
  };
  let conn = "";
  let loading = null; // the reload in flight
  let retryMs = RETRY_MIN_MS;
  let retryTimer = 0;

  function setConn(state, why) {
    if (state !== conn) {
      conn = state;
      el.state.textContent = state;
      el.state.dataset.state = state;
      document.body.dataset.conn = state;
    }
    el.stateDetail.textContent = why || STATES[state];
    updateTitle();
  }

  function closeSource() {
    if (source) source.close();
    source = null;
  }

  function retryLater(why) {
    closeSource();
    setConn(conn === "behind" ? "behind" : "reconnecting", why);
    if (retryTimer) return;
    retryTimer = setTimeout(() => {
      retryTimer = 0;
      reload();
    }, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  }

  // Load the whole list, then follow the stream from its version.
  function reload() {
    if (loading) return loading;
    closeSource();
    pending = [];
    loading = (async () => {
      try {
        const resp = await fetch("/files/?detail=1", {
          cache: "no-store",
          headers: { Accept: "application/json" },
        });
        if (!resp.ok) throw new Error(`GET /files/ answered ${resp.status}`);
        const body = await resp.json();
        files = Array.isArray(body.files) ? body.files : [];
        version = Number(body.version) || 0;
        pending = [];
        refilter();
        firstPaint();
        render();
        subscribe();
      } catch (err) {
        retryLater(`cannot load the list (${err.message || err}): retrying`);
      } finally {
        loading = null;
      }
    })();
    return loading;
  }

  function fallBehind(why) {
    setConn("behind", why);
    reload();
  }

  function parse(event) {
    try {
      return JSON.parse(event.data);
    } catch {
      return null;
    }
  }

  function subscribe() {
    const es = new EventSource(`/files/events?since=${version}`);
    source = es;
    const mine = (handler) => (event) => {
      if (source === es) handler(event);
    };
    es.onopen = mine(() => {
      retryMs = RETRY_MIN_MS;
      setConn("live");
    });
    es.onerror = mine(() => {
      if (es.readyState === EventSource.CLOSED) retryLater(); // refused: we retry ourselves
      else setConn("reconnecting"); // the browser retries, with Last-Event-ID
    });
    for (const kind of ["add", "remove", "modify"]) {
      es.addEventListener(
        kind,
        mine((event) => {
          const data = parse(event);
          if (data && typeof data.filename === "string" && typeof data.node === "string") {
            queueChange(kind, data);
          }
        }),
      );
    }
    es.addEventListener(
      "version",
      mine((event) => {
        const data = parse(event);
        if (!data) return;
        flush();
        const v = Number(data.version);
        if (v === version && Number.isInteger(data.count) && data.count !== files.length) {
          fallBehind(`the list has ${files.length} files, the aggregator ${data.count}: reloading`);
        } else if (v > version) {
          version = v;
        }
        if (conn !== "live" && es.readyState === EventSource.OPEN) setConn("live");
      }),
    );
    es.addEventListener(
      "reset",
      mine((event) => {
        const data = parse(event) || {};
        fallBehind(`the aggregator reset the stream (${data.reason || "no reason given"}): reloading`);
      }),
    );
    es.addEventListener(
      "dropped",
      mine((event) => {
        const data = parse(event) || {};
        fallBehind(`dropped as too slow (${data.reason || "no reason given"}): reloading`);
      }),
    );
  }

  // ------------------------------------------------------------ rendering

  const pool = []; // row elements, re-filled as the view scrolls
  let renderQueued = false;

  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(render);
  }

  const pad = (n) => String(n).padStart(2, "0");

  function formatTime(text) {
    if (!text) return "";
    const d = new Date(text.replace(/(\.\d{3})\d+/, "$1"));
    if (Number.isNaN(d.getTime())) return text;
    return (
      `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
    );
  }

  const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

  function formatSize(size) {
    if (size === null || size === undefined) return "";
    let value = size;
    let unit = 0;
    while (value >= 1024 && unit < UNITS.length - 1) {
      value /= 1024;
      unit++;
    }
    if (unit === 0) return `${size} B`;
    return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${UNITS[unit]}`;
  }

  const LONE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

  // Undecodable bytes arrive as lone surrogates U+DC80..U+DCFF: shown as \xNN.
  function displayName(name) {
    return name.replace(LONE, (s) => {
      const u = s.charCodeAt(0);
      return u >= 0xdc80 && u <= 0xdcff
        ? `\\x${(u - 0xdc00).toString(16).toUpperCase()}`
        : `\\u${u.toString(16).toUpperCase()}`;
    });
  }

  function makeRow() {
    const row = document.createElement("div");
    row.className = "row";
    row.setAttribute("role", "row");
    const name = document.createElement("span");
    name.className = "c-name";
    const node = document.createElement("span");
    node.className = "c-node";
    const size = document.createElement("span");
    size.className = "c-size";
    const time = document.createElement("time");
    time.className = "c-time";
    for (const cell of [name, node, size, time]) cell.setAttribute("role", "cell");
    row.append(name, node, size, time);
    row._cells = { name, node, size, time };
    return row;
  }

  function fill(row, entry, index) {
    const c = row._cells;
    if (row._entry !== entry) {
      row._entry = entry;
      const shown = displayName(entry.filename);
      c.name.textContent = shown;
      c.name.title = shown;
      c.node.textContent = entry.node;
      c.node.title = entry.node;
      row.dataset.filename = entry.filename;
      row.dataset.node = entry.node;
      row._size = undefined;
      row._modified = undefined;
    }
    if (row._size !== entry.size) {
      row._size = entry.size;
      c.size.textContent = formatSize(entry.size);
      c.size.title = entry.size === null ? "size not reported" : `${entry.size} bytes`;
      c.size.dataset.bytes = entry.size === null ? "" : String(entry.size);
    }
    if (row._modified !== entry.modified) {
      row._modified = entry.modified;
      if (entry._time === undefined) entry._time = formatTime(entry.modified);
      c.time.textContent = entry._time;
      c.time.dateTime = entry.modified || "";
      c.time.title = entry.modified || "time not reported";
    }
    if (row._index !== index) {
      row._index = index;
      row.setAttribute("aria-rowindex", String(index + 2)); // the header is row 1
    }
    const odd = (index & 1) === 1;
    if (row._odd !== odd) {
      row._odd = odd;
      row.classList.toggle("odd", odd);
    }
  }

  function render() {
    renderQueued = false;
    const n = view.length;
    const vp = el.viewport;
    const total = n * ROW_HEIGHT;
    const height = Math.min(total, MAX_SCROLL_PX);
    el.spacer.style.height = `${height}px`;
    const viewHeight = vp.clientHeight || ROW_HEIGHT * 20;
    const top = vp.scrollTop;
    const scale = height > viewHeight ? (total - viewHeight) / (height - viewHeight) : 1;
    const realTop = top * scale;
    const first = Math.min(Math.floor(realTop / ROW_HEIGHT), Math.max(0, n - 1));
    const start = Math.max(0, first - OVERSCAN);
    const end = Math.min(n, first + Math.ceil(viewHeight / ROW_HEIGHT) + 1 + OVERSCAN);
    const offset = top - (realTop - first * ROW_HEIGHT) - (first - start) * ROW_HEIGHT;
    el.rows.style.transform = `translateY(${Math.round(offset)}px)`;

    const count = end - start;
    while (pool.length < count) {
      const row = makeRow();
      pool.push(row);
      el.rows.append(row);
    }
    for (let k = 0; k < pool.length; k++) {
      const row = pool[k];
      if (k < count) {
        fill(row, view[start + k], start + k);
        if (row.hidden) row.hidden = false;
      } else if (!row.hidden) {
        row.hidden = true;
        row._entry = null;
      }
    }
    el.empty.hidden = n > 0;
    if (!painted) el.empty.textContent = "Loading the list\u2026";
    else if (files.length === 0) el.empty.textContent = "No files.";
    else el.empty.textContent = "No file matches the filter.";
    renderCount();
  }

  const grouped = (n) => n.toLocaleString("en-US");

  function renderCount() {
    const all = files.length;
    el.count.textContent = `${grouped(all)} ${all === 1 ? "file" : "files"}`;
    el.count.dataset.count = String(all);
    el.count.title = `index version ${version}`;
    el.shown.textContent = query ? `${grouped(view.length)} of ${grouped(all)} shown` : "";
    el.shown.dataset.count = String(view.length);
    el.table.setAttribute("aria-rowcount", String(view.length + 1));
    updateTitle();
  }

  // The tab says it too: "filewatch: 4 files", "(reconnecting) filewatch: 4 files".
  function updateTitle() {
    const all = painted ? `: ${grouped(files.length)} ${files.length === 1 ? "file" : "files"}` : "";
    const title = `${conn && conn !== "live" ? `(${conn}) ` : ""}filewatch${all}`;
    if (document.title !== title) document.title = title;
  }

  // First paint: the first rows and the count are on screen (two frames after
  // they were put in the DOM). Recorded for people and for the tests.
  let painted = false;

  function firstPaint() {
    if (painted) return;
    painted = true;
    requestAnimationFrame(() =>
      requestAnimationFrame(() => {
        const ms = performance.now();
        performance.mark("filewatch-first-paint");
        document.documentElement.dataset.firstPaintMs = ms.toFixed(1);
      }),
    );
  }

  // ------------------------------------------------------------ the watchers

  function ago(text, now) {
    if (!text) return { shown: "never", title: "not seen yet" };
    const t = Date.parse(text.replace(/(\.\d{3})\d+/, "$1"));
    if (Number.isNaN(t)) return { shown: text, title: text };
    const s = Math.max(0, Math.round((now - t) / 1000));
    let shown;
    if (s < 2) shown = "just now";
    else if (s < 90) shown = `${s} s ago`;
    else if (s < 5400) shown = `${Math.round(s / 60)} min ago`;
    else if (s < 129600) shown = `${Math.round(s / 3600)} h ago`;
    else shown = formatTime(text);
    return { shown, title: `${formatTime(text)} (${text})` };
  }

  function cell(tr, text, className, title) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    if (title) td.title = title;
    tr.append(td);
    return td;
  }

  function renderWatchers(watchers) {
    const now = Date.now();
    const rows = [];
    const sorted = watchers.slice().sort((a, b) => compareCodePoints(a.name, b.name));
    for (const w of sorted) {
      const tr = document.createElement("tr");
      tr.dataset.name = w.name;
      tr.dataset.state = w.state;
      cell(tr, w.name, "w-name", w.name);
      cell(tr, w.protocol || "\u2014", "w-protocol");
      const state = cell(tr, "", "w-state");
      const badge = document.createElement("span");
      badge.className = `badge ${w.state === "connected" ? "ok" : "bad"}`;
      badge.textContent = w.state;
      state.append(badge);
      cell(tr, grouped(Number(w.files) || 0), "w-files num");
      const seen = ago(w.last_seen, now);
      cell(tr, seen.shown, "w-seen", seen.title);
      rows.push(tr);
    }
    el.watchers.replaceChildren(...rows);
    const lost = watchers.filter((w) => w.state !== "connected").length;
    el.watchersCount.textContent = lost
      ? `${watchers.length} (${lost} lost)`
      : String(watchers.length);
    el.watchersNote.textContent = watchers.length ? "" : "No watcher has connected yet.";
    el.watchersNote.classList.remove("error");
    el.watchers.parentElement.classList.remove("stale");
  }

  let watchersAt = null; // when /watchers was last read

  async function pollWatchers() {
    try {
      const resp = await fetch("/watchers", {
        cache: "no-store",
        headers: { Accept: "application/json" },
      });
      if (!resp.ok) throw new Error(`GET /watchers answered ${resp.status}`);
      const body = await resp.json();
      renderWatchers(Array.isArray(body.watchers) ? body.watchers : []);
      watchersAt = new Date();
    } catch (err) {
      const asOf = watchersAt ? `; shown as of ${formatTime(watchersAt.toISOString())}` : "";
      el.watchersNote.textContent = `Cannot read /watchers (${err.message || err})${asOf}`;
      el.watchersNote.classList.add("error");
      el.watchers.parentElement.classList.add("stale");
    } finally {
      setTimeout(pollWatchers, WATCHERS_PERIOD_MS);
    }
  }

  // ------------------------------------------------------------ start

  let filterTimer = 0;
  el.filter.addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      const next = el.filter.value.trim().toLowerCase();
      if (next === query) return;
      query = next;
      flush();
      refilter();
      el.viewport.scrollTop = 0;
      render();
    }, 60);
  });
  el.viewport.addEventListener("scroll", scheduleRender, { passive: true });
  window.addEventListener("resize", scheduleRender);

  const offsetMin = -new Date().getTimezoneOffset();
  const sign = offsetMin >= 0 ? "+" : "-";
  const abs = Math.abs(offsetMin);
  el.tz.textContent = `UTC${sign}${pad(Math.floor(abs / 60))}:${pad(abs % 60)}`;

  // For people debugging in the console, and for the tests.
  window.filewatchPage = Object.freeze({
    compareCodePoints,
    version: () => version,
    keys: () => files.map((e) => [e.filename, e.node]),
    applied: () => ({ ...applied }),
  });

  setConn("connecting");
  reload();
  pollWatchers();
})();
