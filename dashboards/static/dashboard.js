// optstudy's live dashboard: plain JavaScript over the JSON API of optstudy.dashboards.app (nothing from elsewhere).
// The study page asks /api/study/NAME?since=G every poll_ms: G is the generation it has; the answer holds only the
// trials that changed after G and every view's URL, whose key changes only when its picture can; an image is
// fetched again only when its URL changed.
"use strict";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : Number(v.toPrecision(5)).toString();
  return String(v);
}

function link(href, text) {
  if (!href) return document.createTextNode(text);
  const a = el("a", {href: href, target: "_blank", rel: "noopener"}, text);
  return a;
}

function clock() { return new Date().toLocaleTimeString(); }

// --- home: every study --------------------------------------------------------------------------------------------
function optstudyHome() {
  const body = document.querySelector("#studies tbody");
  async function poll() {
    try {
      const res = await fetch("/api/studies");
      const data = await res.json();
      document.getElementById("storage").textContent = data.storage;
      body.replaceChildren(...data.studies.map(studyRow));
      document.getElementById("status").textContent = `${data.studies.length} studies · live, updated ${clock()}`;
      window.optstudy = {studies: data.studies.map(s => s.name), updated: Date.now()};
    } catch (err) {
      document.getElementById("status").textContent = `not reachable (${err}); retrying`;
    }
    setTimeout(poll, 3000);
  }
  poll();
}

function studyRow(s) {
  const tr = el("tr", {"data-study": s.name});
  const name = el("td");
  name.appendChild(link(s.url, s.name));
  tr.appendChild(name);
  const cells = [s.trials, s.states.COMPLETE, s.states.PRUNED, s.states.FAIL, s.states.RUNNING, s.states.WAITING,
    s.surplus, s.model, s.data, s.epochs, (s.seeds || []).join(", "), (s.optimizers || []).join(", "),
    `${s.objective} (${s.direction})`, s.best, s.best_trial];
  for (const c of cells) tr.appendChild(el("td", {}, fmt(c)));
  return tr;
}

// --- one study ----------------------------------------------------------------------------------------------------
function optstudyStudy() {
  const name = decodeURIComponent(location.pathname.replace(/^\/study\//, ""));
  const api = `/api/study/${encodeURIComponent(name)}`;
  const state = {generation: -1, rows: new Map(), order: [], params: [], selected: new Set(), poll_ms: 2000,
    updates: 0, limit: 200};
  window.optstudy = state;
  document.title = `optstudy: ${name}`;
  document.getElementById("title").textContent = `Study ${name}`;
  const compare = document.getElementById("compare");
  const compareUrl = () => `${api}/compare.png?trials=${[...state.selected].sort((a, b) => a - b).join(",")}` +
    `&g=${state.generation}`;
  compare.src = compareUrl();
  document.getElementById("show-all").addEventListener("click", () => { state.limit = Infinity; render(); });

  async function poll() {
    const started = performance.now();
    try {
      const res = await fetch(`${api}?since=${state.generation}`);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const data = await res.json();
      if (data.changed) apply(data);
      state.lastPollMs = performance.now() - started;
      document.getElementById("status").className = "live";
      document.getElementById("status").textContent =
        `live · generation ${state.generation} · ${state.rows.size} trials · checked ${clock()}`;
    } catch (err) {
      document.getElementById("status").className = "stale";
      document.getElementById("status").textContent = `not reachable (${err.message}); retrying`;
    }
    setTimeout(poll, state.poll_ms);
  }

  function apply(data) {
    const first = state.generation < 0;
    state.generation = data.generation;
    state.poll_ms = data.poll_ms || state.poll_ms;
    summary(data.summary, data.links);
    trials(data.trials, data.params, first);
    views(data.views);
    tables(data);
    state.updates += 1;
    state.appliedAt = Date.now();
    if (state.selected.size) compare.src = compareUrl();
  }

  function summary(s, links) {
    const states = el("table", {id: "state-counts"});
    const head = el("tr"), row = el("tr");
    for (const [k, v] of [...Object.entries(s.states), ["surplus (ignored)", s.surplus], ["total", s.trials]]) {
      head.appendChild(el("th", {}, k));
      row.appendChild(el("td", {class: k}, fmt(v)));
    }
    states.append(head, row);
    document.getElementById("states").replaceChildren(states);
    document.getElementById("budget").textContent =
      `${s.budget || `${fmt(s.model)} on ${fmt(s.data)}, ${fmt(s.epochs)} epochs, seeds ${(s.seeds || []).join(", ")}`}` +
      ` · ${s.objective} (${s.direction})`;
    const best = document.getElementById("best");
    best.replaceChildren();
    if (s.best_trial !== null) {
      const params = Object.entries(s.best_params || {}).map(([k, v]) => `${k}=${fmt(v)}`).join(" ");
      best.appendChild(el("p", {}, `Best: trial ${s.best_trial}, ${s.objective} = ${fmt(s.best)} (${params})`));
    } else {
      best.appendChild(el("p", {class: "note"}, "no completed trial yet (surplus trials are ignored)"));
    }
    const where = document.getElementById("links");
    where.replaceChildren();
    if (links.mlflow) where.appendChild(link(links.mlflow, "MLflow UI"));
    where.appendChild(document.createTextNode(" · "));
    if (links.optuna_dashboard) where.appendChild(link(`${links.optuna_dashboard}/dashboard/studies/${s.study_id}`,
      "optuna-dashboard"));
    if (links.tracking_uri) where.appendChild(document.createTextNode(` · tracking ${links.tracking_uri}`));
  }

  // The table holds the newest SHOWN trials (all of them after "show all"): rows are built only for those, so a
  // study of thousands of trials costs the page a few hundred rows, and an update rebuilds none but the changed.
  function trials(rows, params, first) {
    const known = new Set(state.params);
    const extra = params.filter(p => !known.has(p));
    if (extra.length || first) {
      state.params = [...state.params, ...extra].sort();
      const head = el("tr");
      for (const h of ["compare", "#", "state", "optimizer", "value", ...state.params, "seed values", "MLflow run",
        "optuna-dashboard", "completed", "fail reason"]) head.appendChild(el("th", {}, h));
      document.querySelector("#trial-table thead").replaceChildren(head);
      for (const r of state.rows.values()) r.tr = null;  // new columns: rebuilt when shown
    }
    for (const r of rows) {
      const old = state.rows.get(r.number);
      state.rows.set(r.number, {data: r, tr: null, fresh: !first});
      if (old && old.tr && old.tr.parentNode) {
        const tr = trialRow(r, !first);
        old.tr.replaceWith(tr);
        state.rows.get(r.number).tr = tr;
      }
    }
    state.order = [...state.rows.keys()].sort((a, b) => b - a);  // newest first
    render();
  }

  function render() {
    const body = document.querySelector("#trial-table tbody");
    const shown = state.order.slice(0, state.limit);
    const have = [...body.children].map(tr => +tr.dataset.trial);
    if (have.length !== shown.length || have.some((n, i) => n !== shown[i])) {
      const frag = document.createDocumentFragment();
      for (const n of shown) {
        const r = state.rows.get(n);
        if (!r.tr) r.tr = trialRow(r.data, r.fresh);
        frag.appendChild(r.tr);
      }
      body.replaceChildren(frag);
    }
    const more = document.getElementById("show-all");
    more.hidden = state.order.length <= state.limit;
    more.textContent = `show all ${state.order.length} trials`;
    document.getElementById("trial-count").textContent = `${state.order.length} trials; ` +
      (shown.length < state.order.length ? `the newest ${shown.length} shown` : "newest first") +
      "; new or changed since the page opened: green";
  }

  function trialRow(r, fresh) {
    const tr = el("tr", {"data-trial": r.number, class: fresh ? "new" : ""});
    if (state.selected.has(r.number)) tr.classList.add("selected");
    const box = el("input", {type: "checkbox", "aria-label": `compare trial ${r.number}`});
    box.checked = state.selected.has(r.number);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(r.number); else state.selected.delete(r.number);
      tr.classList.toggle("selected", box.checked);
      compare.src = compareUrl();
    });
    const pick = el("td");
    pick.appendChild(box);
    tr.appendChild(pick);
    tr.appendChild(el("td", {}, r.number));
    tr.appendChild(el("td", {class: r.state}, r.surplus ? `${r.state} (surplus)` : r.state));
    tr.appendChild(el("td", {}, fmt(r.optimizer)));
    tr.appendChild(el("td", {}, fmt(r.value)));
    for (const p of state.params) tr.appendChild(el("td", {}, p in r.params ? fmt(r.params[p]) : ""));
    tr.appendChild(el("td", {}, fmt(r.seed_values)));
    const run = el("td");
    run.appendChild(r.run_url ? link(r.run_url, r.runs > 1 ? `run (1 of ${r.runs})` : "run") : el("span", {}, "—"));
    tr.appendChild(run);
    const optuna = el("td");
    optuna.appendChild(r.optuna_url ? link(r.optuna_url, "trial") : el("span", {}, "—"));
    tr.appendChild(optuna);
    tr.appendChild(el("td", {}, fmt(r.complete)));
    tr.appendChild(el("td", {}, r.fail_reason || ""));
    return tr;
  }

  function views(list) {
    const wanted = new Set(list.map(v => v.id));
    for (const fig of document.querySelectorAll("figure[data-view]")) {
      if (!wanted.has(fig.dataset.view)) fig.remove();
    }
    for (const v of list) {
      let fig = document.querySelector(`figure[data-view="${CSS.escape(v.id)}"]`);
      if (!fig) {
        fig = el("figure", {"data-view": v.id});
        const img = el("img", {alt: v.title});
        fig.appendChild(img);
        if (v.caption) fig.appendChild(el("figcaption", {}, v.caption));
        document.querySelector(`#${v.section} .views`).appendChild(fig);
      }
      const img = fig.querySelector("img");
      if (img.getAttribute("src") !== v.url) img.setAttribute("src", v.url);  // only what changed is fetched
    }
  }

  function tables(data) {
    const rob = document.querySelector("#robustness .content");
    rob.replaceChildren(records(data.robustness, "robustness-table", true));
    const imp = document.querySelector("#importances .content");
    imp.replaceChildren();
    if (data.importances.running && !data.importances.table) {
      imp.appendChild(el("p", {class: "note"}, "computing importances (fANOVA)…"));
    }
    if (data.importances.table) imp.appendChild(records(data.importances.table, "importances-table", false));
    for (const n of data.importances.notes) imp.appendChild(el("p", {class: "note"}, n));
    const notes = document.getElementById("notes");
    notes.replaceChildren(...data.notes.map(n => el("p", {class: "note"}, n)));
  }

  function records(rows, id, transpose) {
    const wrap = el("div", {class: "wide"});
    const table = el("table", {id: id});
    wrap.appendChild(table);
    if (!rows.length) return el("p", {class: "note"}, "nothing yet");
    const cols = Object.keys(rows[0]);
    if (transpose) {  // a row per quantity, a column per optimizer
      const head = el("tr");
      head.appendChild(el("th", {}, "quantity"));
      for (const r of rows) head.appendChild(el("th", {}, fmt(r[cols[0]])));
      table.appendChild(head);
      for (const c of cols.slice(1)) {
        const tr = el("tr");
        tr.appendChild(el("th", {}, c));
        for (const r of rows) tr.appendChild(el("td", {}, fmt(r[c])));
        table.appendChild(tr);
      }
    } else {
      const head = el("tr");
      for (const c of cols) head.appendChild(el("th", {}, c));
      table.appendChild(head);
      for (const r of rows) {
        const tr = el("tr");
        for (const c of cols) tr.appendChild(el("td", {}, fmt(r[c])));
        table.appendChild(tr);
      }
    }
    return wrap;
  }

  poll();
}
