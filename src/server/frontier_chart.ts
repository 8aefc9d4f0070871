import type { FrontierPoint, FrontierResult } from "../fusion/frontier.ts";
import { escapeXml as esc } from "../markup.ts";

const PANEL_H = 170;
const LEFT = 70;
const WIDTH = 760;

/** Round numbers for an axis from lo to hi, about five of them. */
function ticks(lo: number, hi: number): number[] {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / 5;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

/**
 * Every plan an analysis measured, as two panels over the sequential steps each removes: held-out
 * perplexity above, KL to the unfused model below. The best plan of each budget is joined by a line;
 * the active plan is ringed. Each point carries its plan (data-plan) so the page can apply it, and a
 * title with its numbers for a hover.
 */
export function frontierChartSvg(
  f: FrontierResult,
  activeId: string | null,
  /** Measured decode speed-up per plan id: when any plan has one, it is the x axis. */
  speedups: Map<string, number> = new Map(),
): string {
  const plotW = WIDTH - LEFT - 30;
  const measured = f.plans.some((p) => speedups.has(p.id));
  const axis = measured ? speedupAxis(speedups, plotW) : stepsAxis(f, plotW);
  const px = (p: { steps: number; id: string }) => axis.x(p);
  const unfusedPoint = { steps: 0, id: "unfused", ppl: f.unfused.ppl, kl: 0 };
  // With a speed-up axis only measured plans have a place; the rest wait for a benchmark.
  const plans = f.plans.filter((p) => px(p) !== null);
  const frontier = f.frontier.filter((p) => px(p) !== null).sort((a, b) => px(a)! - px(b)!);
  const panels = [
    { key: "ppl" as const, label: "held-out perplexity", top: 40 },
    { key: "kl" as const, label: "KL to unfused", top: 40 + PANEL_H + 40 },
  ];
  const h = panels[1].top + PANEL_H + 50;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${h}" font-family="sans-serif" font-size="11" role="img" aria-label="frontier chart">`,
    `<rect width="${WIDTH}" height="${h}" fill="white"/>`,
    `<text x="${LEFT}" y="16" font-size="13">Speed/quality frontier: ${f.plans.length} plans measured on ${f.held_out_tokens} held-out tokens</text>`,
    `<text x="${LEFT}" y="31" fill="#777">click a point to apply its plan; line: best plan per budget; ring: active plan${
      measured ? `; ${f.plans.length - plans.length} plans without a decode measurement not shown` : ""
    }</text>`,
  ];
  for (const panel of panels) {
    // The scale follows the frontier: plans far worse than every budget's best would squash it, so
    // they sit on the top edge as hollow points (their title still has the numbers).
    const lo = Math.min(unfusedPoint[panel.key], ...plans.map((p) => p[panel.key]));
    const frontierTop = Math.max(unfusedPoint[panel.key], ...frontier.map((p) => p[panel.key]));
    const hi = Math.min(
      Math.max(...plans.map((p) => p[panel.key]), frontierTop),
      frontierTop + Math.max(2 * (frontierTop - lo), 0.1 * Math.abs(frontierTop)),
    );
    const pad = (hi - lo || 1) * 0.08;
    const [y0, y1] = [lo - pad, hi + pad];
    const y = (v: number) => panel.top + PANEL_H - ((Math.min(v, y1) - y0) / (y1 - y0)) * PANEL_H;
    const offScale = (v: number) => v > y1;
    const bottom = panel.top + PANEL_H;
    parts.push(
      `<rect x="${LEFT}" y="${panel.top}" width="${plotW}" height="${PANEL_H}" fill="none" stroke="#bbb"/>`,
      `<text transform="translate(16,${
        panel.top + PANEL_H / 2
      }) rotate(-90)" text-anchor="middle">${panel.label}</text>`,
    );
    for (const t of ticks(y0, y1)) {
      parts.push(
        `<line x1="${LEFT}" x2="${LEFT + plotW}" y1="${y(t)}" y2="${y(t)}" stroke="#eee"/>`,
        `<text x="${LEFT - 4}" y="${y(t) + 4}" text-anchor="end">${t}</text>`,
      );
    }
    for (const t of axis.ticks) {
      parts.push(`<text x="${t.x}" y="${bottom + 14}" text-anchor="middle">${t.label}</text>`);
    }
    const line = [unfusedPoint, ...frontier].map((p) => `${px(p)},${y(p[panel.key])}`).join(" ");
    parts.push(`<polyline points="${line}" fill="none" stroke="#d0553a" stroke-width="1.5"/>`);
    parts.push(
      `<circle cx="${px(unfusedPoint)}" cy="${
        y(unfusedPoint[panel.key])
      }" r="5" fill="#2a7" class="plan" data-id="unfused" data-plan="${
        esc(JSON.stringify({ version: 1, ffn_groups: [] }))
      }"><title>unfused: ppl ${f.unfused.ppl.toFixed(3)}, loss ${f.unfused.loss.toFixed(4)}</title></circle>`,
    );
    // The best of each budget drawn last, on top, so that they stay clickable.
    const best = new Set(frontier.map((p) => p.id));
    const speed = (p: FrontierPoint) => speedups.get(p.id);
    for (const p of plans) {
      if (!best.has(p.id)) {
        parts.push(point(p, px(p)!, y(p[panel.key]), false, offScale(p[panel.key]), speed(p)));
      }
    }
    for (const p of frontier) {
      parts.push(point(p, px(p)!, y(p[panel.key]), true, offScale(p[panel.key]), speed(p)));
    }
    const active = activeId === "unfused" ? unfusedPoint : plans.find((p) => p.id === activeId);
    if (active) {
      parts.push(
        `<circle cx="${px(active)}" cy="${
          y(active[panel.key])
        }" r="9" fill="none" stroke="#222" stroke-width="2" class="active-mark"/>`,
      );
    }
  }
  parts.push(
    `<text x="${LEFT + plotW / 2}" y="${h - 12}" text-anchor="middle">${axis.label}</text>`,
    "</svg>",
  );
  return parts.join("\n");
}

interface XAxis {
  /** Null: the plan has no place on this axis (no measured speed-up). */
  x(p: { steps: number; id: string }): number | null;
  ticks: { x: number; label: string }[];
  label: string;
}

/**
 * Sequential steps removed: one column per budget; plans of one budget spread across the middle of
 * their column so that points of equal steps stay apart and clickable.
 */
function stepsAxis(f: FrontierResult, plotW: number): XAxis {
  const maxSteps = Math.max(1, ...f.plans.map((p) => p.steps));
  const col = plotW / (maxSteps + 1);
  const at = (steps: number) => LEFT + col * (steps + 0.5);
  const spread = new Map<string, number>();
  for (let s = 1; s <= maxSteps; s++) {
    const same = f.plans.filter((p) => p.steps === s);
    const gap = Math.min(6, (col * 0.7) / Math.max(1, same.length));
    same.forEach((p, i) => spread.set(p.id, (i - (same.length - 1) / 2) * gap));
  }
  return {
    x: (p) => at(p.steps) + (spread.get(p.id) ?? 0),
    ticks: Array.from({ length: maxSteps + 1 }, (_, s) => ({ x: at(s), label: String(s) })),
    label: "sequential steps removed",
  };
}

/** The decode speed-up over the unfused model that the last benchmark measured (unfused is 1x). */
function speedupAxis(speedups: Map<string, number>, plotW: number): XAxis {
  const values = [1, ...speedups.values()];
  const [lo, hi] = [Math.min(...values), Math.max(...values)];
  const pad = Math.max((hi - lo) * 0.1, 0.02);
  const [x0, x1] = [lo - pad, hi + pad];
  const at = (v: number) => LEFT + ((v - x0) / (x1 - x0)) * plotW;
  return {
    x: (p) => (p.id === "unfused" ? at(1) : speedups.has(p.id) ? at(speedups.get(p.id)!) : null),
    ticks: ticks(x0, x1).map((v) => ({ x: at(v), label: `${v}x` })),
    label: "decode speed-up over unfused, measured by the last benchmark (median tokens/s ratio)",
  };
}

function point(
  p: FrontierPoint,
  cx: number,
  cy: number,
  best: boolean,
  offScale: boolean,
  speedup?: number,
): string {
  const info = `${p.id}: ${p.steps} steps, ppl ${p.ppl.toFixed(3)}, loss ${p.loss.toFixed(4)}, KL ${
    p.kl.toFixed(4)
  }, top-1 ${p.top1_agreement.toFixed(3)}${speedup === undefined ? "" : `, decode ${speedup.toFixed(2)}x`}`;
  const color = best ? "#d0553a" : "#8899aa";
  const fill = offScale ? `fill="white" stroke="${color}"` : `fill="${color}"`;
  return `<circle cx="${cx}" cy="${cy}" r="${best ? 5 : 3.5}" ${fill} ` +
    `fill-opacity="0.85" class="plan" data-id="${esc(p.id)}" data-plan="${esc(JSON.stringify(p.plan))}" ` +
    `style="cursor:pointer"><title>${esc(info)}</title></circle>`;
}
