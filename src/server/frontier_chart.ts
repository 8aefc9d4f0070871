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
export function frontierChartSvg(f: FrontierResult, activeId: string | null): string {
  const maxSteps = Math.max(1, ...f.plans.map((p) => p.steps));
  const plotW = WIDTH - LEFT - 30;
  // One column per budget; plans of one budget spread across the middle of their column so that
  // points of equal steps stay apart and clickable.
  const col = plotW / (maxSteps + 1);
  const x = (steps: number) => LEFT + col * (steps + 0.5);
  const spread = new Map<string, number>();
  for (let s = 1; s <= maxSteps; s++) {
    const same = f.plans.filter((p) => p.steps === s);
    const gap = Math.min(6, (col * 0.7) / Math.max(1, same.length));
    same.forEach((p, i) => spread.set(p.id, (i - (same.length - 1) / 2) * gap));
  }
  const px = (p: { steps: number; id?: string }) => x(p.steps) + (spread.get(p.id ?? "") ?? 0);
  const unfusedPoint = { steps: 0, ppl: f.unfused.ppl, kl: 0 };
  const panels = [
    { key: "ppl" as const, label: "held-out perplexity", top: 40 },
    { key: "kl" as const, label: "KL to unfused", top: 40 + PANEL_H + 40 },
  ];
  const h = panels[1].top + PANEL_H + 50;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${h}" font-family="sans-serif" font-size="11" role="img" aria-label="frontier chart">`,
    `<rect width="${WIDTH}" height="${h}" fill="white"/>`,
    `<text x="${LEFT}" y="16" font-size="13">Speed/quality frontier: ${f.plans.length} plans measured on ${f.held_out_tokens} held-out tokens</text>`,
    `<text x="${LEFT}" y="31" fill="#777">click a point to apply its plan; line: best plan per budget; ring: active plan</text>`,
  ];
  for (const panel of panels) {
    // The scale follows the frontier: plans far worse than every budget's best would squash it, so
    // they sit on the top edge as hollow points (their title still has the numbers).
    const lo = Math.min(unfusedPoint[panel.key], ...f.plans.map((p) => p[panel.key]));
    const frontierTop = Math.max(unfusedPoint[panel.key], ...f.frontier.map((p) => p[panel.key]));
    const hi = Math.min(
      Math.max(...f.plans.map((p) => p[panel.key]), frontierTop),
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
    for (let s = 0; s <= maxSteps; s++) {
      parts.push(`<text x="${x(s)}" y="${bottom + 14}" text-anchor="middle">${s}</text>`);
    }
    const line = [unfusedPoint, ...f.frontier].map((p) => `${px(p)},${y(p[panel.key])}`).join(" ");
    parts.push(`<polyline points="${line}" fill="none" stroke="#d0553a" stroke-width="1.5"/>`);
    parts.push(
      `<circle cx="${x(0)}" cy="${
        y(unfusedPoint[panel.key])
      }" r="5" fill="#2a7" class="plan" data-id="unfused" data-plan="${
        esc(JSON.stringify({ version: 1, ffn_groups: [] }))
      }"><title>unfused: ppl ${f.unfused.ppl.toFixed(3)}, loss ${f.unfused.loss.toFixed(4)}</title></circle>`,
    );
    // The best of each budget drawn last, on top, so that they stay clickable.
    const best = new Set(f.frontier.map((p) => p.id));
    for (const p of f.plans) {
      if (!best.has(p.id)) parts.push(point(p, px(p), y(p[panel.key]), false, offScale(p[panel.key])));
    }
    for (const p of f.frontier) parts.push(point(p, px(p), y(p[panel.key]), true, offScale(p[panel.key])));
    const active = activeId === "unfused" ? unfusedPoint : f.plans.find((p) => p.id === activeId);
    if (active) {
      parts.push(
        `<circle cx="${px(active)}" cy="${
          y(active[panel.key])
        }" r="9" fill="none" stroke="#222" stroke-width="2" class="active-mark"/>`,
      );
    }
  }
  parts.push(
    `<text x="${LEFT + plotW / 2}" y="${h - 12}" text-anchor="middle">sequential steps removed</text>`,
    "</svg>",
  );
  return parts.join("\n");
}

function point(p: FrontierPoint, cx: number, cy: number, best: boolean, offScale: boolean): string {
  const info = `${p.id}: ${p.steps} steps, ppl ${p.ppl.toFixed(3)}, loss ${p.loss.toFixed(4)}, KL ${
    p.kl.toFixed(4)
  }, top-1 ${p.top1_agreement.toFixed(3)}`;
  const color = best ? "#d0553a" : "#8899aa";
  const fill = offScale ? `fill="white" stroke="${color}"` : `fill="${color}"`;
  return `<circle cx="${cx}" cy="${cy}" r="${best ? 5 : 3.5}" ${fill} ` +
    `fill-opacity="0.85" class="plan" data-id="${esc(p.id)}" data-plan="${esc(JSON.stringify(p.plan))}" ` +
    `style="cursor:pointer"><title>${esc(info)}</title></circle>`;
}
