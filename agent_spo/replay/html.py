"""A self-contained static HTML page with the replay views (list, detail, tokens).

One file, no network: the data is embedded as JSON, the styles and the script are
inline, no external scripts or fonts, so the page opens from disk, from an artifact
store or an e-mail. The script builds the views from the data; every model- or
tool-produced string is inserted as text (``textContent``), never as markup.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from agent_spo.replay.episode import EpisodeView

_CSS = """
:root { --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; --dim:#57606a; --line:#d0d7de; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0;
       color: #1f2328; background: #fff; }
header { padding: 12px 20px; border-bottom: 1px solid var(--line); background: #f6f8fa; }
header h1 { font-size: 18px; margin: 0 0 4px; }
main { padding: 12px 20px; }
.muted { color: var(--dim); }
.filters { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 8px 0 12px; }
.filters input[type=text], .filters input[type=number], .filters select { padding: 3px 6px; }
table.list { border-collapse: collapse; width: 100%; }
table.list th, table.list td { border-bottom: 1px solid var(--line); padding: 4px 8px;
  text-align: left; white-space: nowrap; max-width: 260px; overflow: hidden;
  text-overflow: ellipsis; }
table.list tbody tr { cursor: pointer; }
table.list tbody tr:hover { background: #f3f6fa; }
.v-correct { color: var(--ok); font-weight: 600; }
.v-incorrect { color: var(--bad); font-weight: 600; }
.v-no_answer, .v-unparseable, .v-timeout { color: var(--warn); font-weight: 600; }
.grid { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 16px; }
.grid dt { font-weight: 600; } .grid dd { margin: 0; white-space: pre-wrap; }
.turn { border: 1px solid var(--line); border-radius: 6px; margin: 12px 0; }
.turn h3 { margin: 0; padding: 6px 10px; font-size: 14px; background: #f6f8fa;
  border-bottom: 1px solid var(--line); }
.turn .body { padding: 8px 10px; }
pre { margin: 4px 0; padding: 6px 8px; background: #f6f8fa; border-radius: 4px;
  white-space: pre-wrap; word-break: break-word; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; }
pre.code { background: #eef6ff; } pre.seen { background: #f0f7f0; }
.call-head { font-weight: 600; margin-top: 6px; }
.fault { color: var(--bad); } .okay { color: var(--ok); }
.marker { color: var(--warn); } .marker::before { content: "\\2702  "; }
.tokens { line-height: 1.9; font: 12.5px/1.9 ui-monospace, Menlo, Consolas, monospace;
  white-space: pre-wrap; word-break: break-word; }
.tokens span { border-radius: 2px; }
.t-model { background: #b7ebc0; } .t-model.alt { background: #d8f5dd; }
.t-prompt { background: #e5e7eb; color: #57606a; } .t-prompt.alt { background: #eef0f3; }
.t-tool { background: #c9dcf5; color: #24417a; } .t-tool.alt { background: #dde9f9; }
.t-template { background: #e1d9ee; color: #4b3b6b; } .t-template.alt { background: #ece6f5; }
.legend span { padding: 1px 6px; margin-right: 8px; }
a.back { display: inline-block; margin-bottom: 8px; }
"""

_JS = r"""
(function () {
  const DATA = JSON.parse(document.getElementById("replay-data").textContent);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const k of kids) if (k !== null && k !== undefined)
      e.append(typeof k === "string" ? document.createTextNode(k) : k);
    return e;
  };
  const fmt = (x, d) => (x === null || x === undefined) ? "-" :
    (typeof x === "number" && !Number.isInteger(x)) ? x.toFixed(d === undefined ? 3 : d) : String(x);
  const byIndex = new Map(DATA.episodes.map((e) => [e.index, e]));
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- list view
  const verdicts = [...new Set(DATA.rows.map((r) => r.verdict || "-"))].sort();
  for (const v of verdicts) $("f-verdict").append(el("option", {value: v, text: v}));
  function matches(r) {
    if ($("f-failed").checked && r.reward !== null && r.reward > 0) return false;
    if ($("f-tool").checked && r.faults.length === 0) return false;
    const v = $("f-verdict").value; if (v && (r.verdict || "-") !== v) return false;
    const p = $("f-prompt").value.trim(); if (p && !String(r.prompt_id).includes(p)) return false;
    const s = $("f-step").value.trim(); if (s !== "" && String(r.step) !== s) return false;
    return true;
  }
  function renderList() {
    const body = $("rows"); body.replaceChildren();
    let shown = 0;
    for (const r of DATA.rows) {
      if (!matches(r)) continue;
      shown += 1;
      const tr = el("tr", {"data-index": r.index},
        el("td", {text: String(r.index)}), el("td", {text: r.prompt_id}),
        el("td", {text: r.dataset ? r.dataset + " / " + r.sample : "-"}),
        el("td", {text: fmt(r.step)}),
        el("td", {class: "v-" + r.verdict, text: r.verdict || "-"}),
        el("td", {text: r.answer === null ? "-" : r.answer}),
        el("td", {text: r.gold === null ? "-" : r.gold}),
        el("td", {text: String(r.turns)}), el("td", {text: String(r.calls)}),
        el("td", {class: r.faults.length ? "fault" : "", text: r.faults.join(",") || "-"}),
        el("td", {text: r.stop_reason || "-"}), el("td", {text: fmt(r.v_hat, 2)}),
        el("td", {text: fmt(r.lag)}), el("td", {text: fmt(r.total_s, 2)}));
      tr.addEventListener("click", () => { location.hash = "ep-" + r.index; });
      body.append(tr);
    }
    $("count").textContent = shown + " of " + DATA.rows.length + " listed episodes shown";
  }
  for (const id of ["f-failed", "f-tool", "f-verdict", "f-prompt", "f-step"])
    $(id).addEventListener("input", renderList);

  // ---------------------------------------------------------------- detail view
  function pair(dl, k, v, cls) { dl.append(el("dt", {text: k}), el("dd", {class: cls || "", text: v})); }
  function renderCall(c) {
    const box = el("div", {class: "call"});
    box.append(el("div", {class: "call-head"},
      "tool call " + c.name + "  status ",
      el("span", {class: c.fault ? "fault" : "okay", text: c.status || "not run"}),
      "  fault " + (c.fault || "-") + "  latency " + (c.latency_s * 1000).toFixed(1) + " ms" +
      (c.wall_s === null || c.wall_s === undefined ? "" : " (sandbox " + (c.wall_s * 1000).toFixed(1) + " ms)")));
    box.append(c.code === null ? el("div", {class: "marker", text: "the call could not be parsed; nothing ran"})
                               : el("pre", {class: "code", text: c.code}));
    if (c.stdout) box.append(el("div", {text: "stdout"}), el("pre", {text: c.stdout}));
    if (c.stderr) box.append(el("div", {text: "stderr"}), el("pre", {class: "fault", text: c.stderr}));
    if (c.exception) box.append(el("div", {class: "fault", text: c.exception}));
    box.append(el("div", {text: "the model saw"}), el("pre", {class: "seen", text: c.observation}));
    for (const m of c.markers) box.append(el("div", {class: "marker", text: m}));
    return box;
  }
  function renderTokens(ep) {
    const wrap = el("div", {class: "tokens", id: "tokens"});
    const alt = {};
    for (const [piece, kind] of ep.tokens) {
      alt[kind] = !alt[kind];
      wrap.append(el("span", {class: "t-" + kind + (alt[kind] ? "" : " alt"), title: kind, text: piece}));
    }
    const n = ep.tokens.filter((t) => t[1] === "model").length;
    const legend = el("div", {class: "legend"},
      el("span", {class: "t-model", text: "trainable (model)"}),
      el("span", {class: "t-prompt", text: "masked: prompt"}),
      el("span", {class: "t-tool", text: "masked: tool"}),
      el("span", {class: "t-template", text: "masked: template"}),
      n + " of " + ep.tokens.length + " tokens trainable");
    return el("section", {}, el("h2", {text: "tokens"}), legend, wrap);
  }
  function renderDetail(ep) {
    const box = $("detail"); box.replaceChildren();
    box.append(el("a", {class: "back", href: "#", text: "\u2190 all episodes"}));
    box.append(el("h2", {text: "episode #" + ep.index + "  " + ep.prompt_id}));
    const dl = el("dl", {class: "grid", id: "meta"});
    if (ep.source && ep.source.dataset) pair(dl, "source", ep.source.dataset + ", sample " + ep.source.sample);
    pair(dl, "problem", ep.problem);
    pair(dl, "gold", ep.gold === null ? "-" : ep.gold);
    pair(dl, "answer", ep.answer === null ? "-" : ep.answer);
    pair(dl, "verdict", (ep.verdict || "-") + "  " + (ep.reason || "") + "  reward " + fmt(ep.reward, 1), "v-" + ep.verdict);
    pair(dl, "stop", ep.stop_reason || "-");
    const t = ep.tracker;
    if (t.step !== null || t.v_hat_before !== null) {
      pair(dl, "tracker", "step " + fmt(t.step) + "  v\u0302 before " + fmt(t.v_hat_before) +
        "  v\u0302 after " + fmt(t.v_hat_after) + "  advantage " +
        (t.adv !== null ? fmt(t.adv) : "raw " + fmt(t.adv_raw)) + "  policy lag " + fmt(t.lag));
    }
    if (t.note) pair(dl, "", t.note, "muted");
    pair(dl, "policy", "versions " + (ep.policy_versions.join(", ") || "-"));
    pair(dl, "timings", Object.entries(ep.timings).map(([k, v]) => k + " " + v.toFixed(3)).join("  ") || "-");
    box.append(dl);
    for (const turn of ep.turns) {
      const body = el("div", {class: "body"}, el("pre", {text: turn.text}));
      if (turn.call) body.append(renderCall(turn.call));
      for (const m of turn.markers) body.append(el("div", {class: "marker", text: m}));
      box.append(el("div", {class: "turn"},
        el("h3", {text: "turn " + (turn.index + 1) + ": " + turn.tokens + " model tokens, policy v" + turn.policy_version}),
        body));
    }
    if (ep.tokens.length) box.append(renderTokens(ep));
  }
  function route() {
    const m = /^#ep-(\d+)$/.exec(location.hash);
    const ep = m ? byIndex.get(Number(m[1])) : undefined;
    $("list-view").hidden = !!ep; $("detail").hidden = !ep;
    if (ep) renderDetail(ep);
    window.scrollTo(0, 0);
  }
  window.addEventListener("hashchange", route);
  renderList();
  route();
  document.body.setAttribute("data-rendered", "yes");
})();
"""


def _embed(data: dict) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(
    *, title: str, subtitle: str, rows: Sequence[dict], episodes: Sequence[EpisodeView]
) -> str:
    """The whole page as one string."""
    data = {"rows": list(rows), "episodes": [e.to_dict() for e in episodes]}
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><div class="muted">{html.escape(subtitle)}</div></header>
<main>
<section id="list-view">
<div class="filters">
<label><input type="checkbox" id="f-failed"> failed only</label>
<label><input type="checkbox" id="f-tool"> tool error</label>
<label>verdict <select id="f-verdict"><option value="">any</option></select></label>
<label>prompt <input type="text" id="f-prompt" size="18"></label>
<label>step <input type="number" id="f-step" style="width:6em"></label>
<span class="muted" id="count"></span>
</div>
<table class="list">
<thead><tr><th>#</th><th>prompt</th><th>dataset / sample</th><th>step</th><th>verdict</th>
<th>answer</th><th>gold</th><th>turns</th><th>calls</th><th>faults</th><th>stop</th><th>v&#770;</th>
<th>lag</th><th>s</th></tr></thead>
<tbody id="rows"></tbody>
</table>
</section>
<section id="detail" hidden></section>
<noscript>This page draws its views with an inline script; enable JavaScript.</noscript>
</main>
<script type="application/json" id="replay-data">{_embed(data)}</script>
<script>{_JS}</script>
</body>
</html>
"""


def write_page(path: Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_page(**kw), encoding="utf-8")
    return path
