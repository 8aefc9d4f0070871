import type { BenchReport } from "../bench/run.ts";
import { escapeXml } from "../markup.ts";

const esc = escapeXml;

/** Sequential vs fused ms per token count, as grouped bars (kernels when measured, else onnxruntime). */
export function benchChartSvg(r: BenchReport): string {
  const source = r.ffn_kernels ? "WGSL kernels" : `onnxruntime-web (${r.ffn_onnx.device})`;
  const cases = r.ffn_kernels?.cases ?? r.ffn_onnx.cases;
  const max = Math.max(...cases.flatMap((c) => [c.sequential_ms, c.fused_ms]));
  const w = Math.max(460, 120 + cases.length * 110);
  const h = 260;
  const scale = (v: number) => (v / max) * 170;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="sans-serif" font-size="11" role="img" aria-label="benchmark chart">`,
    `<text x="10" y="16" font-size="13">FFN run, sequential vs fused (${esc(source)}, ms per run)</text>`,
    `<rect x="10" y="26" width="10" height="10" fill="#8899aa"/><text x="24" y="35">sequential</text>`,
    `<rect x="100" y="26" width="10" height="10" fill="#d0553a"/><text x="114" y="35">fused</text>`,
  ];
  cases.forEach((c, i) => {
    const x = 40 + i * 110;
    const base = 225;
    parts.push(
      `<rect x="${x}" y="${base - scale(c.sequential_ms)}" width="36" height="${
        scale(c.sequential_ms)
      }" fill="#8899aa"><title>${c.sequential_ms.toFixed(3)} ms</title></rect>`,
      `<rect x="${x + 40}" y="${base - scale(c.fused_ms)}" width="36" height="${
        scale(c.fused_ms)
      }" fill="#d0553a"><title>${c.fused_ms.toFixed(3)} ms</title></rect>`,
      `<text x="${x}" y="${base + 14}">T=${c.tokens}: ${c.speedup.toFixed(2)}x</text>`,
    );
  });
  parts.push("</svg>");
  return parts.join("\n");
}

/** A bar colour per plan: unfused grey, fused plans in turn. */
const PLAN_COLOURS = ["#8899aa", "#3a7bd0", "#2a9d6a", "#c98a1b", "#8a4fc9", "#c94f7c"];

/**
 * Decode tokens/s per plan, grouped by batch size (the paper's cost axis, from `batch`), or per plan
 * at batch 1 when the report decoded single streams only. Null when it decoded nothing.
 */
export function decodeChartSvg(r: BenchReport): string | null {
  const rows = r.batched?.filter((c) => !c.constrained).map((c) => ({
    group: `batch ${c.batch}`,
    plan: c.plan,
    tps: c.tokens_per_second,
    speedup: c.speedup,
  })) ?? r.decode.filter((c) => c.device === r.decode[0]?.device).map((c) => ({
    group: "batch 1",
    plan: c.plan,
    tps: c.tokens_per_second,
    speedup: c.tokens_per_second.median / r.decode[0].tokens_per_second.median,
  }));
  if (!rows.length) return null;
  const groups = [...new Set(rows.map((x) => x.group))];
  const plans = [...new Set(rows.map((x) => x.plan))];
  const max = Math.max(...rows.map((x) => x.tps.max));
  const bar = 30;
  const groupWidth = plans.length * (bar + 4) + 40;
  const w = Math.max(460, 60 + groups.length * groupWidth);
  const h = 290;
  const base = 240;
  const scale = (v: number) => (v / max) * 180;
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="sans-serif" font-size="11" role="img" aria-label="decode chart">`,
    `<text x="10" y="16" font-size="13">Decode tokens/s per plan (median; the whisker spans min-max)</text>`,
    ...plans.map((p, i) =>
      `<rect x="${10 + i * 150}" y="26" width="10" height="10" fill="${
        PLAN_COLOURS[i % PLAN_COLOURS.length]
      }"/><text x="${24 + i * 150}" y="35">${esc(p)}</text>`
    ),
  ];
  groups.forEach((g, gi) => {
    const x0 = 40 + gi * groupWidth;
    parts.push(`<text x="${x0}" y="${base + 16}">${esc(g)}</text>`);
    plans.forEach((p, pi) => {
      const row = rows.find((x) => x.group === g && x.plan === p);
      if (!row) return;
      const x = x0 + pi * (bar + 4);
      const top = base - scale(row.tps.median);
      parts.push(
        `<rect class="decode" data-plan="${esc(p)}" data-group="${
          esc(g)
        }" x="${x}" y="${top}" width="${bar}" height="${scale(row.tps.median)}" fill="${
          PLAN_COLOURS[pi % PLAN_COLOURS.length]
        }"><title>${esc(p)}, ${esc(g)}: ${row.tps.median.toFixed(1)} tokens/s [${row.tps.min.toFixed(1)}-${
          row.tps.max.toFixed(1)
        }], ${row.speedup.toFixed(2)}x</title></rect>`,
        `<line x1="${x + bar / 2}" x2="${x + bar / 2}" y1="${base - scale(row.tps.max)}" y2="${
          base - scale(row.tps.min)
        }" stroke="#333"/>`,
      );
    });
  });
  parts.push("</svg>");
  return parts.join("\n");
}
