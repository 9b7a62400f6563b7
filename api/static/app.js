/* mesh coordinator status page.
 *
 * Plain browser JavaScript, no build step and no libraries. Reads the coordinator's REST API with relative URLs,
 * refreshes every 3 s and updates the DOM in place (keyed rows, charts redrawn only when their data changes), so
 * nothing flickers and focus survives a refresh. API text is only ever inserted with textContent / setAttribute.
 */
(function () {
  "use strict";

  var REFRESH_MS = 3000;
  var REQUEST_TIMEOUT_MS = 8000;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var RUN_STATUSES = ["running", "created", "stopped", "finished", "failed"];
  var PEER_STATUSES = ["alive", "lost", "left"];
  var PEER_ORDER = { alive: 0, lost: 1, left: 2 };

  var state = {
    summary: null,
    runs: null, // {items, total}
    selected: readHashRun(), // run id or null
    detail: { runId: null, history: null, peers: null, events: null },
    lastOk: null, // Date of the last fully successful refresh
    clockSkewMs: 0, // server time - browser time, from the Date header
    timer: null,
    inFlight: false,
    generation: 0,
  };

  // ---------------------------------------------------------------- helpers

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (attrs[k] === null || attrs[k] === undefined || attrs[k] === false) return;
        if (k === "text") node.textContent = String(attrs[k]);
        else if (k === "class") node.className = attrs[k];
        else node.setAttribute(k, attrs[k] === true ? "" : String(attrs[k]));
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG_NS, tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        node.setAttribute(k, String(attrs[k]));
      });
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  /** Set text only when it changed (keeps selections and avoids needless layout). */
  function setText(node, text) {
    text = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  function setAttr(node, name, value) {
    if (value === null || value === undefined) {
      if (node.hasAttribute(name)) node.removeAttribute(name);
    } else if (node.getAttribute(name) !== String(value)) {
      node.setAttribute(name, String(value));
    }
  }

  function isNum(v) {
    return typeof v === "number" && isFinite(v);
  }

  var DASH = "\u2014";

  function fmtLoss(v) {
    if (!isNum(v)) return DASH;
    var a = Math.abs(v);
    if (a !== 0 && (a < 0.001 || a >= 1e6)) return v.toExponential(2);
    return v.toFixed(a >= 100 ? 2 : 4);
  }

  var intFmt = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  var oneFmt = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });

  function fmtRate(v) {
    if (!isNum(v)) return DASH;
    return v >= 1000 ? intFmt.format(v) : oneFmt.format(v);
  }

  function fmtInt(v) {
    return isNum(v) ? intFmt.format(v) : DASH;
  }

  function parseTime(iso) {
    if (!iso) return null;
    var t = Date.parse(iso);
    return isNaN(t) ? null : new Date(t);
  }

  function pad2(n) {
    return (n < 10 ? "0" : "") + n;
  }

  function fmtDateTime(iso) {
    var d = parseTime(iso);
    if (!d) return DASH;
    return d.getFullYear() + "-" + pad2(d.getMonth() + 1) + "-" + pad2(d.getDate()) + " " + pad2(d.getHours()) + ":" + pad2(d.getMinutes());
  }

  function fmtClock(d) {
    return pad2(d.getHours()) + ":" + pad2(d.getMinutes()) + ":" + pad2(d.getSeconds());
  }

  function serverNow() {
    return Date.now() + state.clockSkewMs;
  }

  function fmtAgo(iso) {
    var d = parseTime(iso);
    if (!d) return DASH;
    var s = Math.max(0, Math.round((serverNow() - d.getTime()) / 1000));
    if (s < 120) return s + "s ago";
    var m = Math.floor(s / 60);
    if (m < 120) return m + "m ago";
    var h = Math.floor(m / 60);
    if (h < 48) return h + "h ago";
    return Math.floor(h / 24) + "d ago";
  }

  function shortId(id) {
    id = String(id || "");
    return id.length > 16 ? id.slice(0, 6) + "\u2026" + id.slice(-6) : id;
  }

  function badge(status) {
    var span = el("span", { class: "badge badge-" + String(status || "unknown").replace(/[^a-z_-]/gi, "") });
    span.textContent = status || "unknown";
    return span;
  }

  function updateBadge(span, status) {
    var cls = "badge badge-" + String(status || "unknown").replace(/[^a-z_-]/gi, "");
    if (span.className !== cls) span.className = cls;
    setText(span, status || "unknown");
  }

  function announce(msg) {
    var a = $("announcer");
    a.textContent = "";
    window.setTimeout(function () {
      a.textContent = msg;
    }, 50);
  }

  /**
   * Keyed list reconciliation: keep one DOM node per key, update it in place, insert/move only what is out of
   * order and drop nodes whose key disappeared.
   */
  function syncChildren(parent, items, keyOf, create, update) {
    var existing = new Map();
    Array.prototype.forEach.call(parent.children, function (child) {
      if (child.dataset.key !== undefined) existing.set(child.dataset.key, child);
    });
    var wanted = new Set();
    items.forEach(function (item, i) {
      var key = String(keyOf(item, i));
      wanted.add(key);
      var node = existing.get(key);
      if (!node) {
        node = create(item);
        node.dataset.key = key;
      }
      update(node, item);
      var at = parent.children[i];
      if (at !== node) parent.insertBefore(node, at || null);
    });
    existing.forEach(function (node, key) {
      if (!wanted.has(key)) node.remove();
    });
    // Anything left over without a key (should not happen) goes too.
    while (parent.children.length > items.length) parent.lastElementChild.remove();
  }

  // ---------------------------------------------------------------- API

  function ApiError(message, status) {
    this.message = message;
    this.status = status;
  }

  function api(path) {
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = ctrl
      ? window.setTimeout(function () {
          ctrl.abort();
        }, REQUEST_TIMEOUT_MS)
      : null;
    return fetch(path, { headers: { Accept: "application/json" }, cache: "no-store", signal: ctrl ? ctrl.signal : undefined })
      .then(
        function (resp) {
          var date = Date.parse(resp.headers.get("Date") || "");
          if (!isNaN(date)) state.clockSkewMs = date - Date.now();
          return resp.text().then(function (body) {
            var data = null;
            try {
              data = body ? JSON.parse(body) : null;
            } catch (e) {
              data = null;
            }
            if (!resp.ok) {
              var msg = data && data.error && data.error.message ? data.error.message : resp.statusText || "request failed";
              if (resp.status === 401) msg = "this coordinator requires a bearer token for reads; the status page cannot send one";
              throw new ApiError("GET " + path + " returned HTTP " + resp.status + " (" + msg + ")", resp.status);
            }
            if (data === null) throw new ApiError("GET " + path + " did not return JSON", resp.status);
            return data;
          });
        },
        function (err) {
          var aborted = err && err.name === "AbortError";
          throw new ApiError("GET " + path + (aborted ? " timed out" : " failed: no response from the server"), 0);
        }
      )
      .finally(function () {
        if (timer) window.clearTimeout(timer);
      });
  }

  // ---------------------------------------------------------------- refresh loop

  function defaultRun(items) {
    for (var i = 0; i < items.length; i++) if (items[i].status === "running") return items[i].run_id;
    return items.length ? items[0].run_id : null;
  }

  function refresh() {
    if (state.inFlight) return;
    state.inFlight = true;
    window.clearTimeout(state.timer);
    var errors = [];
    var gen = ++state.generation;

    var top = Promise.allSettled([api("api/v1/summary"), api("api/v1/runs?limit=100")]).then(function (res) {
      if (res[0].status === "fulfilled") state.summary = res[0].value;
      else errors.push(res[0].reason);
      if (res[1].status === "fulfilled") {
        var page = res[1].value || {};
        state.runs = { items: Array.isArray(page.items) ? page.items : [], total: page.total };
      } else errors.push(res[1].reason);
    });

    top
      .then(function () {
        if (state.runs) {
          var items = state.runs.items;
          var known = items.some(function (r) {
            return r.run_id === state.selected;
          });
          if (!known) selectRun(defaultRun(items), { quiet: true, noFetch: true });
        }
        render();
        // Both top-level requests got no response at all: the server is down, skip the per-run requests.
        if (errors.length >= 2 && errors.every(function (e) {
          return e && !e.status;
        })) return null;
        return loadDetail(state.selected, errors);
      })
      .then(function () {
        if (gen !== state.generation) return;
        finishRefresh(errors);
      })
      .catch(function (err) {
        // A bug in rendering must not stop the loop; report it once in the banner.
        errors.push({ message: "page error: " + (err && err.message ? err.message : String(err)) });
        finishRefresh(errors);
      })
      .finally(function () {
        state.inFlight = false;
        schedule();
      });
  }

  function loadDetail(runId, errors) {
    if (!runId) {
      state.detail = { runId: null, history: null, peers: null, events: null };
      renderDetail();
      return Promise.resolve();
    }
    var enc = encodeURIComponent(runId);
    return Promise.allSettled([
      api("api/v1/runs/" + enc + "/history"),
      api("api/v1/peers?run_id=" + enc + "&limit=200"),
      api("api/v1/runs/" + enc + "/events?limit=20"),
    ]).then(function (res) {
      if (state.selected !== runId) return; // the user picked another run meanwhile
      var d = state.detail.runId === runId ? state.detail : { runId: runId, history: null, peers: null, events: null };
      var keys = ["history", "peers", "events"];
      res.forEach(function (r, i) {
        if (r.status === "fulfilled") d[keys[i]] = Array.isArray(r.value && r.value.items) ? r.value.items : [];
        else if (errors) errors.push(r.reason);
      });
      state.detail = d;
      renderDetail();
    });
  }

  function finishRefresh(errors) {
    var banner = $("error-banner");
    var dot = $("refresh-dot");
    if (errors.length) {
      var unreachable = errors.some(function (e) {
        return !e || !e.status;
      });
      setText(banner.querySelector(".banner-title"), unreachable ? "Coordinator API unreachable." : "Coordinator API error.");
      var parts = [(errors[0] && errors[0].message ? errors[0].message : "A request failed") + (errors.length > 1 ? " and " + (errors.length - 1) + " more request" + (errors.length > 2 ? "s" : "") + " failed." : ".")];
      parts.push(state.lastOk ? "Showing data from " + fmtClock(state.lastOk) + "; retrying every 3 s." : "Retrying every 3 s.");
      setText($("error-message"), parts.join(" "));
      if (banner.hidden) banner.hidden = false;
      dot.className = "refresh-dot is-error";
    } else {
      state.lastOk = new Date();
      if (!banner.hidden) banner.hidden = true;
      dot.className = "refresh-dot is-ok";
    }
    if (!state.runs) setText($("runs-loading"), errors.length ? "Runs could not be loaded yet." : "Loading runs\u2026");
    if (!state.summary) setText($("bootstrap-loading"), errors.length ? "Not loaded yet." : "Loading\u2026");
    var upd = $("last-updated");
    setText(upd, state.lastOk ? "Last updated " + fmtClock(state.lastOk) : "Not loaded yet");
    setAttr(upd, "title", state.lastOk ? state.lastOk.toISOString() : null);
  }

  function schedule() {
    window.clearTimeout(state.timer);
    if (document.hidden) return; // resumes on visibilitychange
    state.timer = window.setTimeout(refresh, REFRESH_MS);
  }

  // ---------------------------------------------------------------- selection

  function readHashRun() {
    var m = /(?:^#|&)run=([^&]*)/.exec(window.location.hash || "");
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]) || null;
    } catch (e) {
      return null;
    }
  }

  function selectRun(runId, opts) {
    opts = opts || {};
    if (runId === state.selected && !opts.force) return;
    state.selected = runId;
    if (window.history && window.history.replaceState) {
      var url = window.location.pathname + window.location.search + (runId ? "#run=" + encodeURIComponent(runId) : "");
      window.history.replaceState(null, "", url);
    }
    if (state.detail.runId !== runId) state.detail = { runId: runId, history: null, peers: null, events: null };
    renderRuns();
    renderDetail();
    if (!opts.quiet && runId) announce("Run " + runId + " selected");
    if (!opts.noFetch && runId) {
      var errors = [];
      loadDetail(runId, errors).then(function () {
        if (errors.length) finishRefresh(errors);
      });
    }
  }

  // ---------------------------------------------------------------- rendering: header

  function render() {
    renderSummary();
    renderRuns();
  }

  function chip(label, count, kind) {
    var li = el("li", { class: "chip chip-" + kind + (count ? "" : " is-zero") });
    li.appendChild(el("span", { class: "chip-count", text: fmtInt(count) }));
    li.appendChild(document.createTextNode(" " + label));
    return li;
  }

  function renderSummary() {
    var s = state.summary;
    if (!s) return;
    var runs = s.runs || {};
    var peers = s.peers || {};
    var totalRuns = RUN_STATUSES.reduce(function (acc, k) {
      return acc + (isNum(runs[k]) ? runs[k] : 0);
    }, 0);
    setText($("runs-total"), fmtInt(totalRuns));
    var runChips = RUN_STATUSES.map(function (k) {
      return { k: k, n: isNum(runs[k]) ? runs[k] : 0 };
    });
    syncChildren(
      $("runs-by-status"),
      runChips,
      function (c) {
        return c.k;
      },
      function (c) {
        return chip(c.k, c.n, c.k);
      },
      function (node, c) {
        setText(node.firstChild, fmtInt(c.n));
        node.classList.toggle("is-zero", !c.n);
      }
    );
    setText($("peers-alive"), fmtInt(isNum(peers.alive) ? peers.alive : 0));
    syncChildren(
      $("peers-by-status"),
      PEER_STATUSES.map(function (k) {
        return { k: k, n: isNum(peers[k]) ? peers[k] : 0 };
      }),
      function (c) {
        return c.k;
      },
      function (c) {
        return chip(c.k, c.n, c.k);
      },
      function (node, c) {
        setText(node.firstChild, fmtInt(c.n));
        node.classList.toggle("is-zero", !c.n);
      }
    );
    setText($("version"), s.version ? "v" + s.version : "");

    var addrs = Array.isArray(s.bootstrap) ? s.bootstrap : [];
    syncChildren(
      $("bootstrap-list"),
      addrs,
      function (a) {
        return a;
      },
      function (a) {
        var code = el("code", { class: "addr", text: a });
        var btn = el("button", { type: "button", class: "btn btn-copy", "aria-label": "Copy address " + a, text: "Copy" });
        btn.addEventListener("click", function () {
          copyText(a, code, btn);
        });
        return el("li", { class: "bootstrap-item" }, [code, btn]);
      },
      function () {}
    );
    $("bootstrap-empty").hidden = addrs.length > 0;
    $("bootstrap-loading").hidden = true;

    var running = isNum(runs.running) ? runs.running : 0;
    var title = "mesh coordinator" + (running ? " \u00b7 " + running + " running" : "");
    if (document.title !== title) document.title = title;
  }

  function copyText(text, codeNode, btn) {
    function done(ok) {
      btn.textContent = ok ? "Copied" : "Press Ctrl+C";
      btn.classList.toggle("is-done", ok);
      announce(ok ? "Address copied" : "Address selected; press Ctrl+C to copy");
      window.setTimeout(function () {
        btn.textContent = "Copy";
        btn.classList.remove("is-done");
      }, 1800);
    }
    function selectIt() {
      var range = document.createRange();
      range.selectNodeContents(codeNode);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () {
          done(true);
        },
        function () {
          selectIt();
          done(false);
        }
      );
    } else {
      // Plain http on a non-local host: the async clipboard API is not available; select the text instead.
      selectIt();
      done(false);
    }
  }

  // ---------------------------------------------------------------- rendering: runs table

  function renderRuns() {
    if (!state.runs) return;
    var items = state.runs.items;
    var table = $("runs-table");
    var tbody = table.tBodies[0];
    syncChildren(
      tbody,
      items,
      function (r) {
        return r.run_id;
      },
      createRunRow,
      updateRunRow
    );
    table.hidden = items.length === 0;
    $("runs-empty").hidden = items.length !== 0;
    $("runs-loading").hidden = true;
    var total = isNum(state.runs.total) ? state.runs.total : items.length;
    setText($("runs-count"), total > items.length ? "showing " + items.length + " of " + total : total === 1 ? "1 run" : total + " runs");
  }

  function createRunRow(run) {
    var tr = el("tr", { class: "run-row" });
    var btn = el("button", { type: "button", class: "link-btn run-link" });
    tr.appendChild(el("th", { scope: "row", class: "cell-run" }, [btn]));
    tr.appendChild(el("td", { class: "cell-task" }));
    tr.appendChild(el("td", { class: "cell-status" }, [badge(run.status)]));
    tr.appendChild(el("td", { class: "num cell-epoch" }));
    tr.appendChild(el("td", { class: "num cell-loss" }));
    tr.appendChild(el("td", { class: "num cell-rate" }));
    tr.appendChild(el("td", { class: "num cell-peers" }));
    tr.appendChild(el("td", { class: "cell-created" }));
    tr.addEventListener("click", function (ev) {
      if (ev.target.closest && ev.target.closest("a")) return;
      // Let people select text in a row without changing the selection.
      var sel = window.getSelection && window.getSelection();
      if (sel && String(sel).length && !ev.target.closest("button")) return;
      selectRun(tr.dataset.key);
    });
    return tr;
  }

  function updateRunRow(tr, run) {
    var p = run.progress || {};
    var cells = tr.children;
    var btn = cells[0].firstChild;
    setText(btn, run.run_id);
    var selected = run.run_id === state.selected;
    setAttr(btn, "aria-current", selected ? "true" : null);
    setAttr(btn, "title", "Show run " + run.run_id);
    tr.classList.toggle("is-selected", selected);
    setText(cells[1], run.task);
    setAttr(cells[1], "title", run.task);
    updateBadge(cells[2].firstChild, run.status);
    setText(cells[3], fmtInt(p.epoch));
    setText(cells[4], fmtLoss(p.loss));
    setText(cells[5], fmtRate(p.samples_per_second));
    setText(cells[6], fmtInt(p.peers_alive));
    setText(cells[7], fmtDateTime(run.created_at));
    setAttr(cells[7], "title", run.created_at || null);
  }

  // ---------------------------------------------------------------- rendering: run detail

  function selectedRun() {
    if (!state.runs || !state.selected) return null;
    for (var i = 0; i < state.runs.items.length; i++) if (state.runs.items[i].run_id === state.selected) return state.runs.items[i];
    return null;
  }

  function renderDetail() {
    var section = $("run-detail");
    var run = selectedRun();
    var runId = state.selected;
    if (!runId || (!run && state.runs)) {
      if (!section.hidden) section.hidden = true;
      return;
    }
    if (section.hidden) section.hidden = false;
    setText($("run-title"), runId);

    var statusBox = $("run-status");
    if (run) {
      if (!statusBox.firstChild) statusBox.appendChild(badge(run.status));
      else updateBadge(statusBox.firstChild, run.status);
      var p = run.progress || {};
      setText(
        $("run-subtitle"),
        "task " + run.task + " \u00b7 epoch " + fmtInt(p.epoch) + " \u00b7 " + fmtInt(p.samples) + " samples" + (run.stopped_at ? " \u00b7 stopped " + fmtDateTime(run.stopped_at) : "")
      );
    }

    var d = state.detail.runId === runId ? state.detail : { history: null, peers: null, events: null };
    if (run) renderParams(run, d.history);
    renderCharts(d.history);
    renderPeers(d.peers);
    renderEvents(d.events);
  }

  function renderParams(run, history) {
    var h = run.hyperparameters || {};
    // the lr the run stepped with at its latest epoch in the history (it moves with --lr-schedule)
    var withLr = (Array.isArray(history) ? history : []).filter(function (p) {
      return isNum(p.lr);
    });
    var latest = withLr.reduce(function (a, b) {
      return !a || b.epoch > a.epoch ? b : a;
    }, null);
    var rows = [
      ["optimizer", h.optimizer],
      ["lr", h.lr],
      ["lr now", latest ? String(latest.lr) + " at epoch " + latest.epoch : null],
      ["lr schedule", h.lr_schedule && h.lr_schedule !== "constant" ? h.lr_schedule + " to epoch " + h.total_epochs : null],
      ["warm-up", h.warmup_epochs ? h.warmup_epochs + " epochs" : null],
      ["weight decay", h.weight_decay ? h.weight_decay : null],
      ["clip grad norm", isNum(h.clip_grad_norm) ? h.clip_grad_norm : null],
      ["batch size", h.batch_size],
      ["target batch", h.target_batch_size],
      ["averaging", h.averaging === "diloco" ? "diloco, " + h.inner_steps + " inner steps" : h.averaging],
      ["outer lr / momentum", h.averaging === "diloco" ? h.outer_lr + " / " + h.outer_momentum : null],
      ["compression", h.compression],
      ["aggregation", h.aggregation],
      ["matchmaking", isNum(h.matchmaking_time) ? h.matchmaking_time + " s" : null],
      ["avg. timeout", isNum(h.averaging_timeout) ? h.averaging_timeout + " s" : null],
      ["seed", h.seed],
      ["peers min/max", (isNum(run.min_peers) ? run.min_peers : "?") + " / " + (isNum(run.max_peers) ? run.max_peers : "?")],
      ["updated", fmtDateTime(run.updated_at)],
    ].filter(function (r) {
      return r[1] !== null && r[1] !== undefined && r[1] !== "";
    });
    syncChildren(
      $("run-params"),
      rows,
      function (r) {
        return r[0];
      },
      function (r) {
        return el("div", { class: "param" }, [el("dt", { text: r[0] }), el("dd")]);
      },
      function (node, r) {
        setText(node.lastChild, r[1]);
      }
    );
  }

  function renderCharts(history) {
    var pts = Array.isArray(history) ? history.slice() : null;
    if (pts) {
      pts.sort(function (a, b) {
        return a.epoch - b.epoch;
      });
    }
    drawChart($("loss-chart"), {
      key: "loss",
      title: "Loss by epoch",
      points: pts
        ? pts.map(function (p) {
            return { x: p.epoch, y: isNum(p.loss) ? p.loss : null };
          })
        : null,
      // the held-out loss, at the epochs a peer evaluated (--eval-every): a second series
      extra: pts
        ? pts
            .filter(function (p) {
              return isNum(p.eval_loss);
            })
            .map(function (p) {
              return { x: p.epoch, y: p.eval_loss };
            })
        : [],
      extraLabel: "held-out",
      format: fmtLoss,
      zero: false,
      emptyText: "No loss reported yet",
    });
    drawChart($("throughput-chart"), {
      key: "throughput",
      title: "Samples per second by epoch",
      points: pts
        ? pts.map(function (p) {
            return { x: p.epoch, y: isNum(p.samples_per_second) ? p.samples_per_second : null };
          })
        : null,
      format: fmtRate,
      zero: true,
      area: true,
      emptyText: "No throughput reported yet",
    });
  }

  function renderPeers(peers) {
    var table = $("peers-table");
    var tbody = table.tBodies[0];
    if (!peers) {
      // Not loaded yet for this run (a fresh selection): show nothing rather than another run's peers.
      syncChildren(tbody, [], String, createPeerRow, updatePeerRow);
      setText($("peers-count"), "");
      $("peers-empty").hidden = true;
      return;
    }
    var items = peers.slice().sort(function (a, b) {
      var sa = a.status in PEER_ORDER ? PEER_ORDER[a.status] : 9;
      var sb = b.status in PEER_ORDER ? PEER_ORDER[b.status] : 9;
      if (sa !== sb) return sa - sb;
      return String(a.peer_id) < String(b.peer_id) ? -1 : String(a.peer_id) > String(b.peer_id) ? 1 : 0;
    });
    syncChildren(
      tbody,
      items,
      function (p) {
        return p.peer_id;
      },
      createPeerRow,
      updatePeerRow
    );
    table.hidden = items.length === 0;
    $("peers-empty").hidden = items.length !== 0;
    var alive = items.filter(function (p) {
      return p.status === "alive";
    }).length;
    setText($("peers-count"), items.length ? alive + " alive of " + items.length : "");
  }

  function createPeerRow(peer) {
    var tr = el("tr");
    var idCell = el("td", { class: "cell-peer" }, [el("code", { class: "peer-id" }), el("span", { class: "peer-host muted small" })]);
    tr.appendChild(idCell);
    tr.appendChild(el("td", {}, [badge(peer.status)]));
    tr.appendChild(el("td", { class: "cell-device" }));
    tr.appendChild(el("td", { class: "num" }));
    tr.appendChild(el("td", { class: "num" }));
    tr.appendChild(el("td", { class: "num" }));
    tr.appendChild(el("td", { class: "cell-seen" }));
    return tr;
  }

  function updatePeerRow(tr, peer) {
    var c = tr.children;
    var idNode = c[0].firstChild;
    setText(idNode, shortId(peer.peer_id));
    setAttr(idNode, "title", peer.peer_id);
    var hostNode = c[0].lastChild;
    setText(hostNode, peer.host || "");
    setAttr(hostNode, "title", Array.isArray(peer.addrs) && peer.addrs.length ? peer.addrs.join("\n") : null);
    updateBadge(c[1].firstChild, peer.status);
    var device = peer.device || "";
    if (peer.gpu_name) device = device ? device + " \u00b7 " + peer.gpu_name : peer.gpu_name;
    setText(c[2], device || DASH);
    setAttr(c[2], "title", (device || "") + (peer.version ? " (mesh " + peer.version + ")" : "") || null);
    setText(c[3], fmtInt(peer.epoch));
    setText(c[4], fmtLoss(peer.loss));
    setText(c[5], fmtRate(peer.samples_per_second));
    setText(c[6], fmtAgo(peer.last_seen));
    setAttr(c[6], "title", peer.last_seen || null);
    tr.classList.toggle("is-gone", peer.status !== "alive");
  }

  function renderEvents(events) {
    var list = $("events-list");
    if (!events) {
      list.replaceChildren();
      $("events-empty").hidden = true;
      return;
    }
    syncChildren(
      list,
      events,
      function (e, i) {
        return e.event_id !== undefined && e.event_id !== null ? e.event_id : "i" + i;
      },
      function (e) {
        var li = el("li", { class: "event" });
        li.appendChild(el("time", { class: "event-time muted small" }));
        li.appendChild(el("span", { class: "event-kind" }));
        li.appendChild(el("span", { class: "event-msg" }));
        li.appendChild(el("code", { class: "event-peer muted small" }));
        return li;
      },
      function (li, e) {
        var c = li.children;
        setText(c[0], fmtAgo(e.time));
        setAttr(c[0], "datetime", e.time || null);
        setAttr(c[0], "title", e.time || null);
        setText(c[1], e.kind || "event");
        var kindCls = "event-kind kind-" + String(e.kind || "").replace(/[^a-z0-9_-]/gi, "");
        if (c[1].className !== kindCls) c[1].className = kindCls;
        setText(c[2], e.message || "");
        setText(c[3], e.peer_id ? shortId(e.peer_id) : "");
        setAttr(c[3], "title", e.peer_id || null);
        c[3].hidden = !e.peer_id;
      }
    );
    $("events-empty").hidden = events.length !== 0;
    list.hidden = events.length === 0;
  }

  // ---------------------------------------------------------------- charts (inline SVG)

  /** "Nice" ticks for [min, max]: about `count` of them on round steps (1, 2, 5 x 10^n). */
  function niceScale(min, max, count, integer) {
    if (min === max) {
      var padv = min === 0 ? 1 : Math.abs(min) * 0.1;
      min -= padv;
      max += padv;
    }
    var raw = (max - min) / Math.max(1, count);
    var mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var norm = raw / mag;
    var step = (norm >= 7.5 ? 10 : norm >= 3.5 ? 5 : norm >= 1.5 ? 2 : 1) * mag;
    if (integer) step = Math.max(1, Math.round(step));
    var lo = Math.floor(min / step + 1e-9) * step;
    var hi = Math.ceil(max / step - 1e-9) * step;
    var ticks = [];
    for (var v = lo, i = 0; v <= hi + step * 1e-6 && i < 50; v = lo + step * ++i) ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
    return { min: lo, max: hi, step: step, ticks: ticks };
  }

  function tickLabel(v, step) {
    var a = Math.abs(v);
    if (a >= 10000) {
      var k = v / 1000;
      return (Math.abs(k) >= 100 ? Math.round(k) : +k.toFixed(1)) + "k";
    }
    var decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(step) + 1e-9)));
    return v.toFixed(decimals);
  }

  function drawChart(container, opts) {
    var width = Math.max(260, Math.floor(container.clientWidth || 560));
    var height = width < 480 ? 200 : 240;
    var extra = opts.extra || [];
    var sig = JSON.stringify([width, opts.points, extra]);
    if (container.dataset.sig === sig) return;
    container.dataset.sig = sig;

    var titleId = container.id + "-title";
    var descId = container.id + "-desc";
    var root = svg("svg", {
      width: width,
      height: height,
      viewBox: "0 0 " + width + " " + height,
      role: "img",
      "aria-labelledby": titleId + " " + descId,
      class: "chart-svg",
    });
    root.appendChild(svg("title", { id: titleId }, opts.title));
    var desc = svg("desc", { id: descId });
    root.appendChild(desc);

    var all = opts.points || [];
    var valid = all.filter(function (p) {
      return isNum(p.x) && isNum(p.y);
    });

    if (!valid.length) {
      var msg = opts.points === null ? "Loading\u2026" : all.length ? opts.emptyText : "No epochs completed yet";
      desc.textContent = msg;
      root.appendChild(svg("rect", { class: "plot-bg", x: 0.5, y: 0.5, width: width - 1, height: height - 1, rx: 6 }));
      root.appendChild(svg("text", { class: "chart-empty", x: width / 2, y: height / 2, "text-anchor": "middle", "dominant-baseline": "middle" }, msg));
      container.replaceChildren(root);
      return;
    }

    var xs = all
      .filter(function (p) {
        return isNum(p.x);
      })
      .map(function (p) {
        return p.x;
      });
    var ys = valid.concat(extra).map(function (p) {
      return p.y;
    });
    var xMin = Math.min.apply(null, xs);
    var xMax = Math.max.apply(null, xs);
    if (xMin === xMax) {
      xMin -= 1;
      xMax += 1;
    }
    var yMin = Math.min.apply(null, ys);
    var yMax = Math.max.apply(null, ys);
    if (opts.zero) yMin = Math.min(0, yMin);
    var yScale = niceScale(yMin, yMax, height < 220 ? 4 : 5, false);
    var xScale = niceScale(xMin, xMax, Math.max(2, Math.min(10, Math.floor(width / 80))), true);
    // The x range stays on the data (integer epochs), ticks inside it only.
    var xTicks = xScale.ticks.filter(function (t) {
      return t >= xMin && t <= xMax && t >= 0;
    });

    var yLabels = yScale.ticks.map(function (t) {
      return tickLabel(t, yScale.step);
    });
    var longest = yLabels.reduce(function (m, s) {
      return Math.max(m, s.length);
    }, 1);
    var m = { top: 14, right: 18, bottom: 40, left: Math.max(36, 10 + longest * 7.2) };
    var pw = width - m.left - m.right;
    var ph = height - m.top - m.bottom;

    function X(v) {
      return m.left + ((v - xMin) / (xMax - xMin)) * pw;
    }
    function Y(v) {
      return m.top + ph - ((v - yScale.min) / (yScale.max - yScale.min)) * ph;
    }
    function r1(v) {
      return Math.round(v * 10) / 10;
    }

    root.appendChild(svg("rect", { class: "plot-bg", x: m.left, y: m.top, width: pw, height: ph }));

    // grid + y ticks
    var grid = svg("g", { class: "grid" });
    var yAxis = svg("g", { class: "axis axis-y" });
    yScale.ticks.forEach(function (t, i) {
      var y = r1(Y(t)) + 0.5;
      grid.appendChild(svg("line", { x1: m.left, x2: m.left + pw, y1: y, y2: y }));
      yAxis.appendChild(svg("text", { x: m.left - 8, y: y, "text-anchor": "end", "dominant-baseline": "middle" }, yLabels[i]));
    });
    var xAxis = svg("g", { class: "axis axis-x" });
    xTicks.forEach(function (t) {
      var x = r1(X(t)) + 0.5;
      grid.appendChild(svg("line", { class: "grid-x", x1: x, x2: x, y1: m.top, y2: m.top + ph }));
      xAxis.appendChild(svg("line", { class: "tick", x1: x, x2: x, y1: m.top + ph, y2: m.top + ph + 5 }));
      xAxis.appendChild(svg("text", { x: x, y: m.top + ph + 18, "text-anchor": "middle" }, String(t)));
    });
    xAxis.appendChild(svg("line", { class: "domain", x1: m.left, x2: m.left + pw, y1: m.top + ph + 0.5, y2: m.top + ph + 0.5 }));
    xAxis.appendChild(svg("text", { class: "axis-title", x: m.left + pw / 2, y: height - 4, "text-anchor": "middle" }, "epoch"));
    root.appendChild(grid);
    root.appendChild(yAxis);
    root.appendChild(xAxis);

    // series: break the line where a value is missing (null loss)
    var segments = [];
    var cur = [];
    all.forEach(function (p) {
      if (isNum(p.x) && isNum(p.y)) cur.push(p);
      else if (cur.length) {
        segments.push(cur);
        cur = [];
      }
    });
    if (cur.length) segments.push(cur);

    var d = segments
      .map(function (seg) {
        var s = seg
          .map(function (p, i) {
            return (i ? "L" : "M") + r1(X(p.x)) + " " + r1(Y(p.y));
          })
          .join("");
        return seg.length === 1 ? s + "h0" : s; // a lone point still renders (round caps)
      })
      .join("");

    if (opts.area) {
      var base = r1(Y(Math.max(yScale.min, 0)));
      segments.forEach(function (seg) {
        if (seg.length < 2) return;
        var a =
          "M" +
          r1(X(seg[0].x)) +
          " " +
          base +
          seg
            .map(function (p) {
              return "L" + r1(X(p.x)) + " " + r1(Y(p.y));
            })
            .join("") +
          "L" +
          r1(X(seg[seg.length - 1].x)) +
          " " +
          base +
          "Z";
        root.appendChild(svg("path", { class: "area", d: a }));
      });
    }
    // a faint dashed bridge over epochs without a value, so the trend stays readable
    if (segments.length > 1) {
      var g = "";
      for (var si = 1; si < segments.length; si++) {
        var pa = segments[si - 1][segments[si - 1].length - 1];
        var pb = segments[si][0];
        g += "M" + r1(X(pa.x)) + " " + r1(Y(pa.y)) + "L" + r1(X(pb.x)) + " " + r1(Y(pb.y));
      }
      root.appendChild(svg("path", { class: "gap", d: g }));
    }
    root.appendChild(svg("path", { class: "series", d: d }));

    // markers: all of them when there are few points, lone points always
    var dots = svg("g", { class: "markers" });
    segments.forEach(function (seg) {
      seg.forEach(function (p) {
        if (valid.length <= 30 || seg.length === 1) dots.appendChild(svg("circle", { cx: r1(X(p.x)), cy: r1(Y(p.y)), r: seg.length === 1 ? 4 : 2.5, class: seg.length === 1 ? "lone" : "pt" }));
      });
    });
    root.appendChild(dots);

    // the second series (the held-out loss): its own line and a marker per point, each carrying its value
    if (extra.length) {
      var ed = extra
        .map(function (p, i) {
          return (i ? "L" : "M") + r1(X(p.x)) + " " + r1(Y(p.y));
        })
        .join("");
      root.appendChild(svg("path", { class: "series series-extra", d: extra.length === 1 ? ed + "h0" : ed }));
      var edots = svg("g", { class: "markers markers-extra" });
      extra.forEach(function (p) {
        edots.appendChild(svg("circle", { cx: r1(X(p.x)), cy: r1(Y(p.y)), r: 3, "data-epoch": p.x, "data-value": p.y }));
      });
      root.appendChild(edots);
      root.appendChild(
        svg("text", { class: "legend", x: m.left + pw - 4, y: m.top + 12, "text-anchor": "end" }, "\u2014 training   \u2022 " + opts.extraLabel)
      );
    }

    // hover read-out
    var hover = svg("g", { class: "hover", visibility: "hidden" });
    var hLine = svg("line", { y1: m.top, y2: m.top + ph });
    var hDot = svg("circle", { r: 4 });
    var hBox = svg("rect", { rx: 4, height: 22 });
    var hText = svg("text", { "dominant-baseline": "middle" });
    hover.appendChild(hLine);
    hover.appendChild(hDot);
    hover.appendChild(hBox);
    hover.appendChild(hText);
    root.appendChild(hover);
    var hit = svg("rect", { class: "hit", x: m.left, y: m.top, width: pw, height: ph, fill: "transparent" });
    root.appendChild(hit);
    hit.addEventListener("mousemove", function (ev) {
      var box = root.getBoundingClientRect();
      var px = ev.clientX - box.left;
      var best = null;
      valid.forEach(function (p) {
        if (!best || Math.abs(X(p.x) - px) < Math.abs(X(best.x) - px)) best = p;
      });
      if (!best) return;
      var cx = r1(X(best.x));
      var cy = r1(Y(best.y));
      hLine.setAttribute("x1", cx);
      hLine.setAttribute("x2", cx);
      hDot.setAttribute("cx", cx);
      hDot.setAttribute("cy", cy);
      hText.textContent = "epoch " + best.x + ": " + opts.format(best.y);
      var tw = hText.getComputedTextLength ? hText.getComputedTextLength() : 120;
      var bx = cx + 10 + tw + 12 > m.left + pw ? cx - 10 - tw - 12 : cx + 10;
      var by = Math.max(m.top, Math.min(m.top + ph - 22, cy - 30));
      hBox.setAttribute("x", bx);
      hBox.setAttribute("y", by);
      hBox.setAttribute("width", tw + 12);
      hText.setAttribute("x", bx + 6);
      hText.setAttribute("y", by + 11);
      hover.setAttribute("visibility", "visible");
    });
    hit.addEventListener("mouseleave", function () {
      hover.setAttribute("visibility", "hidden");
    });

    var first = valid[0];
    var last = valid[valid.length - 1];
    desc.textContent =
      valid.length === 1
        ? "One point: epoch " + first.x + ", " + opts.format(first.y) + "."
        : valid.length +
          " points from epoch " +
          first.x +
          " (" +
          opts.format(first.y) +
          ") to epoch " +
          last.x +
          " (" +
          opts.format(last.y) +
          "); range " +
          opts.format(Math.min.apply(null, ys)) +
          " to " +
          opts.format(Math.max.apply(null, ys)) +
          "." +
          (valid.length < all.length ? " " + (all.length - valid.length) + " epoch(s) without a value." : "");
    if (extra.length) desc.textContent += " Second series: " + opts.extraLabel + " loss at " + extra.length + " epoch(s).";

    container.replaceChildren(root);
  }

  // ---------------------------------------------------------------- start

  function start() {
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) refresh();
      else window.clearTimeout(state.timer);
    });
    window.addEventListener("hashchange", function () {
      var id = readHashRun();
      if (id && id !== state.selected) selectRun(id, { quiet: true });
    });
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      window.clearTimeout(resizeTimer);
      resizeTimer = window.setTimeout(function () {
        if (!$("run-detail").hidden) renderCharts(state.detail.runId === state.selected ? state.detail.history : null);
      }, 100);
    });
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
