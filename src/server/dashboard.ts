import type { Context } from "hono";
import { formatName } from "../onnx/format.ts";
import { heatmapSvg } from "../fusion/heatmap.ts";
import { escapeXml } from "../markup.ts";
import { type AnalysisRunner, type BenchRunner, measuredSpeedups } from "./jobs.ts";
import type { BenchReport } from "../bench/run.ts";
import { frontierChartSvg } from "./frontier_chart.ts";
import { benchChartSvg, decodeChartSvg } from "./bench_charts.ts";
import type { Services } from "./services.ts";

const esc = escapeXml;

/** The decode cases of a report as a table: device, plan, tokens/s. */
function decodeTable(r: BenchReport): string {
  if (!r.decode.length) return "";
  const rows = r.decode.map((d) => {
    const t = d.tokens_per_second;
    return `<tr><td>${d.device}</td><td>${esc(d.plan)}</td><td>${t.median.toFixed(1)} [${t.min.toFixed(1)}-${
      t.max.toFixed(1)
    }]</td></tr>`;
  });
  return `<table><tr><th>device</th><th>plan</th><th>tokens/s (median [min-max])</th></tr>${
    rows.join("")
  }</table>`;
}

function benchStatus(job: BenchRunner): string {
  if (job.running) return `running: ${job.progress?.stage ?? ""}`;
  if (job.status === "failed") return `failed: ${job.error}`;
  if (job.status === "cancelled") return "cancelled";
  return job.last ? "" : "no benchmark yet";
}

function analysisStatus(job: AnalysisRunner): string {
  if (job.running) {
    const p = job.progress;
    return `running: ${p?.stage ?? ""} ${p ? `${p.done}/${p.total}` : ""}`;
  }
  if (job.status === "failed") return `failed: ${job.error}`;
  return job.last ? "" : "no analysis yet";
}

function page(s: Services): string {
  const { host, analysis, bench } = s;
  const inst = host.instance;
  const cfg = host.config;
  const free = cfg?.layers.flatMap((l, i) => (l.attention.kind === "none" ? [i] : [])) ?? [];
  const suggested = analysis.last?.suggested_plan ?? inst?.plan ?? { version: 1, ffn_groups: [] };
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fusedge</title>
<style>
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { margin: 0 0 4px; } h2 { margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
code, textarea { font-family: monospace; } textarea { width: 100%; height: 60px; }
.muted { color: #777; } #fuse-result.ok { color: #2a7; } #fuse-result.err { color: #c33; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 6px; min-height: 3em; }
</style></head>
<body>
<h1>fusedge</h1>
<div class="muted">FFN Fusion inference on WebGPU / WASM</div>
<h2>Model</h2>
<table id="model">
<tr><th>model</th><td>${esc(host.name || "loading")}</td></tr>
<tr><th>state</th><td>${esc(s.lifecycle.draining ? "draining" : host.state)}</td></tr>
<tr><th>device</th><td id="device">${esc(inst?.device ?? "-")}</td></tr>
<tr><th>weights</th><td id="weights">${
    inst ? `${esc(formatName(inst.graph))}, ${(inst.weightBytes / 1e6).toFixed(1)} MB` : "-"
  }</td></tr>
<tr><th>architecture</th><td>${
    cfg ? `${esc(cfg.modelType)}, ${cfg.numLayers} layers, hidden ${cfg.hidden}, vocab ${cfg.vocabSize}` : "-"
  }</td></tr>
<tr><th>attention-free layers</th><td>${free.length ? free.join(", ") : "none"}</td></tr>
<tr><th>load time</th><td>${(host.loadMs / 1000).toFixed(2)} s</td></tr>
</table>
<h2>Live</h2>
<table id="live">
<tr><th>throughput</th><td id="live-tps">-</td></tr>
<tr><th>time to first token</th><td id="live-ttft">-</td></tr>
<tr><th>generations</th><td id="live-active">${s.scheduler.active} active, ${s.scheduler.queued} queued</td></tr>
</table>
<h2>Active plan</h2>
<p><code id="active-plan">${esc(inst?.planId ?? "-")}</code> ${
    inst ? `<span class="muted">${inst.ffnBlocks} FFN blocks, ${host.swaps} swaps</span>` : ""
  }</p>
<form id="fuse-form">
<label for="plan">Plan (JSON)</label>
<textarea id="plan" name="plan">${esc(JSON.stringify(suggested))}</textarea>
<label for="token">Admin token</label> <input id="token" type="password" autocomplete="off">
<button type="submit" id="apply">Apply plan</button> <span id="fuse-result"></span>
</form>
<h2>Dependency analysis and the speed/quality frontier</h2>
<form id="analysis-form">
<label for="remove-steps">steps to remove</label>
<input id="remove-steps" type="number" min="0" max="32" value="4" style="width:4em">
<label for="max-loss">perplexity budget (%)</label>
<input id="max-loss" type="number" min="0" step="any" placeholder="none" style="width:5em">
<label for="calibration-tokens">calibration tokens</label>
<input id="calibration-tokens" type="number" min="2" max="4096" value="256" style="width:5em">
<button type="submit" id="measure">Measure</button>
<span id="analysis-status" class="muted">${esc(analysisStatus(analysis))}</span>
</form>
<label for="frontier-x">x axis</label>
<select id="frontier-x">
<option value="auto">measured speed-up when benchmarked</option><option value="steps">steps removed</option>
</select>
<button type="button" id="measure-speed">Measure decode speed of the frontier</button>
<span id="speed-status" class="muted"></span>
<div id="frontier">${
    analysis.last?.frontier
      ? frontierChartSvg(analysis.last.frontier, inst?.planId ?? null, measuredSpeedups(bench))
      : ""
  }</div>
<div id="frontier-info" class="muted"></div>
<div id="heatmap">${
    analysis.last
      ? heatmapSvg(analysis.last.analysis, `${analysis.last.model}: block dependency`) +
        `<p>suggested plan: <code>${esc(JSON.stringify(analysis.last.suggested_plan.ffn_groups))}</code></p>`
      : ""
  }</div>
<h2>Benchmark</h2>
<form id="bench-form">
<label for="bench-batch">batch sizes</label>
<input id="bench-batch" value="1,8" style="width:6em">
<label for="bench-rounds">rounds</label>
<input id="bench-rounds" type="number" min="3" max="50" value="3" style="width:4em">
<label for="bench-tokens">tokens a round</label>
<input id="bench-tokens" type="number" min="2" max="1000" value="16" style="width:5em">
<button type="submit" id="bench-run">Run benchmark</button>
<button type="button" id="bench-cancel">Cancel</button>
<progress id="bench-progress" max="1" value="0"${bench.running ? "" : " hidden"}></progress>
<span id="bench-status" class="muted">${esc(benchStatus(bench))}</span>
</form>
<div id="bench">${bench.last ? benchChartSvg(bench.last) + decodeTable(bench.last) : ""}</div>
<div id="bench-decode">${(bench.last && decodeChartSvg(bench.last)) ?? ""}</div>
<h2>Playground</h2>
<p class="muted">One prompt through the active plan and through the unfused model at once, greedy: what fusion
changes in speed and in output (the unfused model is built beside the plan on first use).</p>
<form id="play-form">
<textarea id="play-prompt">def fibonacci(n):</textarea>
<label for="play-tokens">tokens</label>
<input id="play-tokens" type="number" min="1" max="512" value="64" style="width:5em">
<label for="play-key">API key</label> <input id="play-key" type="password" autocomplete="off">
<button type="submit" id="play-run">Run both</button>
<span id="play-status" class="muted"></span>
</form>
<div style="display:flex; gap:16px">
<div style="flex:1"><h3>active plan <code id="play-active-plan"></code></h3>
<div id="play-active-speed" class="muted"></div><pre id="play-active-text"></pre></div>
<div style="flex:1"><h3>unfused <code id="play-unfused-plan"></code></h3>
<div id="play-unfused-speed" class="muted"></div><pre id="play-unfused-text"></pre></div>
</div>
<div id="play-diff" class="muted"></div>
<script>
const $ = (id) => document.getElementById(id);
function adminHeaders() {
  const headers = { "content-type": "application/json" };
  if ($("token").value) headers.authorization = "Bearer " + $("token").value;
  return headers;
}
async function applyPlan(planText) {
  const out = $("fuse-result");
  out.textContent = "building…"; out.className = "";
  try {
    const res = await fetch("/fuse", { method: "POST", headers: adminHeaders(), body: planText });
    const body = await res.json();
    if (res.ok) {
      out.textContent = "active: " + body.active.id; out.className = "ok";
      $("active-plan").textContent = body.active.id;
      await refreshFrontier();
    } else { out.textContent = body.error.message; out.className = "err"; }
  } catch (err) { out.textContent = String(err); out.className = "err"; }
}
$("fuse-form").addEventListener("submit", (e) => { e.preventDefault(); applyPlan($("plan").value); });
async function refreshFrontier() {
  const res = await fetch("/analysis/frontier.svg" + ($("frontier-x").value === "steps" ? "?x=steps" : ""));
  $("frontier").innerHTML = res.ok ? await res.text() : "";
}
$("frontier-x").addEventListener("change", refreshFrontier);
// Decodes each budget's best plan in the background benchmark; the chart's x becomes its speed-up.
$("measure-speed").addEventListener("click", async () => {
  const body = { frontier: true, tokens: [1], decode_tokens: 16, rounds: 3 };
  const res = await fetch("/bench", { method: "POST", headers: adminHeaders(), body: JSON.stringify(body) });
  if (!res.ok) { $("speed-status").textContent = (await res.json()).error.message; return; }
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    const job = await (await fetch("/bench")).json();
    if (job.status !== "running") {
      $("speed-status").textContent = job.status === "done" ? "measured" : "failed: " + job.error;
      break;
    }
    $("speed-status").textContent = "benchmark running: " + ((job.progress && job.progress.stage) || "");
  }
  await refreshFrontier();
});
// The live panel follows the server's own counters.
async function live() {
  try {
    const s = await (await fetch("/stats")).json();
    $("live-tps").textContent = s.tokens_per_second.toFixed(1) + " tokens/s (last " + s.window_seconds + " s)";
    $("live-ttft").textContent = s.ttft_ms
      ? "p50 " + s.ttft_ms.p50.toFixed(0) + " ms, p99 " + s.ttft_ms.p99.toFixed(0) + " ms (last " + s.ttft_ms.samples + " requests)"
      : "no requests yet";
    $("live-active").textContent = s.active + " active, " + s.queued + " queued";
  } catch { /* the server is restarting: try again on the next tick */ }
}
live();
setInterval(live, 2000);
// Polls the background analysis: progress while it runs, the chart and heatmap when it is done.
async function poll() {
  const res = await fetch("/analysis");
  if (!res.ok) return;
  const job = await res.json();
  const p = job.progress;
  if (job.status === "running") {
    $("analysis-status").textContent = "running: " + (p && p.stage ? p.stage + " " : "") +
      (p ? p.done + "/" + p.total + " (" + Math.round(100 * p.done / Math.max(1, p.total)) + "%)" : "");
    setTimeout(poll, 1000);
    return;
  }
  $("analysis-status").textContent = job.status === "failed" ? "failed: " + job.error : job.status;
  if (job.status === "done") {
    const heat = await fetch("/analysis/heatmap.svg");
    if (heat.ok) $("heatmap").innerHTML = await heat.text();
    await refreshFrontier();
  }
}
$("analysis-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = {
    remove_steps: Number($("remove-steps").value),
    max_tokens: Number($("calibration-tokens").value),
  };
  if ($("max-loss").value !== "") body.max_loss_increase = Number($("max-loss").value);
  const res = await fetch("/analysis", { method: "POST", headers: adminHeaders(), body: JSON.stringify(body) });
  if (res.ok) { $("analysis-status").textContent = "running"; setTimeout(poll, 300); }
  else $("analysis-status").textContent = (await res.json()).error.message;
});
$("frontier").addEventListener("click", (e) => {
  const point = e.target.closest("circle.plan");
  if (!point) return;
  $("plan").value = point.dataset.plan;
  applyPlan(point.dataset.plan);
});
$("frontier").addEventListener("mouseover", (e) => {
  const point = e.target.closest("circle.plan");
  if (point) $("frontier-info").textContent = point.querySelector("title").textContent;
});
// The benchmark: runs in the server's background worker; its progress while it runs, its charts when done.
function benchRow(d) {
  const t = d.tokens_per_second;
  return "<tr><td>" + d.device + "</td><td>" + d.plan + "</td><td>" + t.median.toFixed(1) + " [" +
    t.min.toFixed(1) + "-" + t.max.toFixed(1) + "]</td></tr>";
}
async function pollBench() {
  const res = await fetch("/bench");
  if (!res.ok) return;
  const job = await res.json();
  const p = job.progress;
  if (job.status === "running") {
    $("bench-progress").hidden = false;
    $("bench-progress").value = p ? p.done / Math.max(1, p.total) : 0;
    $("bench-status").textContent = "running: " + (p && p.stage ? p.stage + " " : "") +
      (p ? p.done + "/" + p.total + " (" + Math.round(100 * p.done / Math.max(1, p.total)) + "%)" : "");
    setTimeout(pollBench, 1000);
    return;
  }
  $("bench-progress").hidden = true;
  $("bench-status").textContent = job.status === "failed" ? "failed: " + job.error : job.status;
  if (job.status !== "done") return;
  const ffn = await fetch("/bench/ffn.svg");
  const rows = job.report.decode.map(benchRow).join("");
  $("bench").innerHTML = (ffn.ok ? await ffn.text() : "") + (rows
    ? "<table><tr><th>device</th><th>plan</th><th>tokens/s (median [min-max])</th></tr>" + rows + "</table>"
    : "");
  const decode = await fetch("/bench/decode.svg");
  $("bench-decode").innerHTML = decode.ok ? await decode.text() : "";
}
$("bench-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const batch = $("bench-batch").value.split(",").map((s) => Number(s.trim())).filter((n) => n > 0);
  const body = { tokens: [1, 8], rounds: Number($("bench-rounds").value), decode_tokens: Number($("bench-tokens").value) };
  if (batch.length) body.batch = batch;
  const res = await fetch("/bench", { method: "POST", headers: adminHeaders(), body: JSON.stringify(body) });
  if (res.ok) { $("bench-status").textContent = "running"; setTimeout(pollBench, 300); }
  else $("bench-status").textContent = (await res.json()).error.message;
});
$("bench-cancel").addEventListener("click", async () => {
  const res = await fetch("/bench", { method: "DELETE", headers: adminHeaders() });
  $("bench-status").textContent = res.ok ? "cancelled" : (await res.json()).error.message;
});
// The playground: the same prompt streamed through both models at once, each pane with its live rate.
async function streamSide(side, plan, prompt, maxTokens) {
  const headers = { "content-type": "application/json" };
  if ($("play-key").value) headers.authorization = "Bearer " + $("play-key").value;
  const body = { prompt, max_tokens: maxTokens, temperature: 0, stream: true, stream_options: { include_usage: true }, plan };
  const res = await fetch("/v1/completions", { method: "POST", headers, body: JSON.stringify(body) });
  if (!res.ok) throw new Error((await res.json()).error.message);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "", text = "", first = 0, pieces = 0, tokens = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += value;
    let at;
    while ((at = buffered.indexOf("\\n\\n")) >= 0) {
      const data = buffered.slice(0, at).replace(/^data: /, "");
      buffered = buffered.slice(at + 2);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      $("play-" + side + "-plan").textContent = chunk.plan;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const c = chunk.choices[0];
      if (!c || !c.text) continue;
      if (!first) first = performance.now();
      pieces++;
      text += c.text;
      $("play-" + side + "-text").textContent = text;
      const s = (performance.now() - first) / 1000;
      if (s > 0) $("play-" + side + "-speed").textContent = (pieces / s).toFixed(1) + " tokens/s so far";
    }
  }
  // The rate after the first token, over the tokens the server counted.
  const s = (performance.now() - first) / 1000;
  const n = Math.max(tokens, pieces);
  $("play-" + side + "-speed").textContent = n + " tokens, " + (s > 0 ? ((n - 1) / s).toFixed(1) : "-") + " tokens/s";
  return text;
}
$("play-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("play-status").textContent = "running";
  $("play-diff").textContent = "";
  for (const side of ["active", "unfused"]) $("play-" + side + "-text").textContent = "";
  try {
    const prompt = $("play-prompt").value;
    const tokens = Number($("play-tokens").value);
    const [fused, unfused] = await Promise.all([
      streamSide("active", "active", prompt, tokens),
      streamSide("unfused", "unfused", prompt, tokens),
    ]);
    let same = 0;
    while (same < Math.min(fused.length, unfused.length) && fused[same] === unfused[same]) same++;
    $("play-diff").textContent = fused === unfused
      ? "the two texts are the same"
      : "the texts agree for their first " + same + " characters";
    $("play-status").textContent = "done";
  } catch (err) { $("play-status").textContent = String(err.message || err); }
});
if (${JSON.stringify(analysis.running)}) poll();
if (${JSON.stringify(bench.running)}) pollBench();
</script>
</body></html>`;
}

export function dashboardHandler(services: Services) {
  return (c: Context) => c.html(page(services));
}
