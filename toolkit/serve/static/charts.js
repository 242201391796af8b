// Line charts drawn as SVG by hand: two small charts need no charting library (and the page loads nothing else).
import { fmt } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One or more series [{name, points: [[x, y]...]}] as lines on shared axes, in an <svg viewBox="0 0 640 260">.
export function lineChart(svg, series, xLabel) {
  svg.replaceChildren();
  const all = series.flatMap((s) => s.points);
  svg.dataset.points = String(series.length ? series[0].points.length : 0);
  if (all.length === 0) {
    svg.append(svgEl("text", { x: 320, y: 130, "text-anchor": "middle", class: "axis" }, "no data in metrics.jsonl"));
    return;
  }
  const [W, H, L, R, T, B] = [640, 260, 64, 16, 12, 36];
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - 1, y1 + 1];
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(
    svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis-line" }),
    svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis-line" }),
  );
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(svgEl("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "axis" }, fmt(y, 3)));
  }
  for (const x of [x0, Math.round((x0 + x1) / 2), x1]) {
    svg.append(svgEl("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "axis" }, fmt(x, 0)));
  }
  svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, xLabel));
  series.forEach((s, i) => {
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join("");
    const path = svgEl("path", { d, class: `series series-${i}` });
    path.append(svgEl("title", {}, s.name));
    svg.append(path);
    svg.append(svgEl("text", { x: W - R, y: T + 12 + 14 * i, "text-anchor": "end", class: `legend series-${i}` }, s.name));
  });
}
