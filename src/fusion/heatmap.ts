import { escapeXml as esc } from "../markup.ts";
import type { DependencyAnalysis } from "./analyze.ts";

/** White (independent) to dark red (dependent), on a square-root scale so small values stay visible. */
function color(v: number, max: number): string {
  const x = max > 0 ? Math.sqrt(Math.min(v / max, 1)) : 0;
  const r = Math.round(255 - 90 * x);
  const g = Math.round(255 - 235 * x);
  const b = Math.round(255 - 225 * x);
  return `rgb(${r},${g},${b})`;
}

/** The dependency matrix as a self-contained SVG heatmap (row i: block removed; column j: affected block). */
export function heatmapSvg(a: DependencyAnalysis, title: string): string {
  const n = a.blocks.length;
  const cell = 26;
  const left = 90;
  const top = 90;
  const max = Math.max(...a.matrix.flat());
  const parts: string[] = [];
  const w = left + n * cell + 20;
  const h = top + n * cell + 70;
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-family="monospace" font-size="10">`,
  );
  parts.push(`<rect width="${w}" height="${h}" fill="white"/>`);
  parts.push(`<text x="${left}" y="16" font-size="13">${esc(title)}</text>`);
  parts.push(
    `<text x="${left}" y="32">M[i][j]: cosine distance of block j's contribution without block i (max ${
      max.toFixed(3)
    })</text>`,
  );
  a.blocks.forEach((b, i) => {
    const y = top + i * cell;
    parts.push(`<text x="${left - 4}" y="${y + cell * 0.65}" text-anchor="end">${esc(b.label)}</text>`);
    const x = left + i * cell + cell * 0.65;
    parts.push(`<text transform="translate(${x},${top - 4}) rotate(-60)">${esc(b.label)}</text>`);
    a.matrix[i].forEach((v, j) => {
      const fill = j > i ? color(v, max) : "#eeeeee";
      parts.push(
        `<rect x="${left + j * cell}" y="${y}" width="${cell - 1}" height="${
          cell - 1
        }" fill="${fill}"><title>${esc(a.blocks[i].label)} -> ${esc(a.blocks[j].label)}: ${
          v.toFixed(4)
        }</title></rect>`,
      );
    });
  });
  parts.push(
    `<text x="${left}" y="${
      top + n * cell + 20
    }">rows: block removed (i); columns: block affected (j); ${a.tokens} calibration tokens</text>`,
  );
  // Colour scale: the gradient follows color() (square root), labelled in the matrix's own units.
  const ly = top + n * cell + 30;
  const stops = Array.from({ length: 11 }, (_, k) => {
    const v = (k / 10) ** 2 * max;
    return `<stop offset="${Math.sqrt(v / (max || 1)) * 100}%" stop-color="${color(v, max)}"/>`;
  });
  parts.push(
    `<defs><linearGradient id="heat-scale">${stops.join("")}</linearGradient></defs>`,
    `<g class="legend"><rect x="${left}" y="${ly}" width="200" height="10" fill="url(#heat-scale)" stroke="#999"/>`,
    ...[0, 0.25, 0.5, 1].map((q) =>
      `<text x="${left + Math.sqrt(q) * 200}" y="${ly + 22}" text-anchor="middle">${
        (q * max).toFixed(2)
      }</text>`
    ),
    `<text x="${left + 210}" y="${ly + 9}">M[i][j] (square-root scale)</text></g>`,
  );
  parts.push("</svg>");
  return parts.join("\n");
}
