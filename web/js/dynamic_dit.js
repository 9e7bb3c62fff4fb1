// Dynamic DiT in the ComfyUI frontend: the "Dynamic Speed Report" node shows the summary line and a
// per-step chart, live while a Dynamic DiT model samples ("dynamic_dit.progress" events) and final
// after the report runs. The chart is the one core/chart.py draws as an image: model ms per
// step next to the full-compute baseline, the one-off setup (e.g. width calibration) apart from the
// steps, and the FLOPs of every step as a share of the full model's.
//
// A run in progress shows on the reports wired to the sampling node (the event names it); each report's own
// numbers replace it when that report runs. Zoomed out, a report shows its headline numbers in a larger font.
//
// This file is served at /extensions/<pack folder>/js/dynamic_dit.js, so the frontend's modules
// are three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const REPORT = "DynamicSpeedReport";
const SAVED = "dynamic_dit_last_report"; // node property: the final report, kept with the workflow
const MIN_WIDTH = 460;
const CHART_HEIGHT = 230;
const COLORS = {
  background: "#181a1f",
  grid: "#3a3e46",
  axis: "#787e88",
  text: "#e1e4e8",
  muted: "#a0a6b0",
  run: "#56b6ff",
  baseline: "#80848c",
  flops: "#ffaa3c",
  setup: "#c778dd",
};

// Round axis ticks from 0 to at least `peak` (steps of 1, 2 or 5 times a power of ten).
function niceTicks(peak, count = 4) {
  if (!(peak > 0) || !isFinite(peak)) return [0, 1];
  const raw = peak / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let i = 0; i <= Math.ceil(peak / step - 1e-9); i++) ticks.push(i * step);
  return ticks;
}

function formatMs(value) {
  return value >= 10 || value === 0 ? value.toFixed(0) : value.toFixed(1);
}

function status(data) {
  if (!data) return "Waiting for a run: the chart fills in while the model samples.";
  const steps = data.steps?.length ?? 0;
  const what = data.full_compute ? "full-compute baseline" : "dynamic run";
  if (!steps && !data.done) return `${what}: sampling ${data.total_steps} steps, the first one is running.`;
  const where = data.done ? "done" : `step ${steps}/${data.total_steps}`;
  return `${what}, ${where}: ${data.summary || ""}`;
}

// Draw `data` (RunRecord.progress) on a canvas sized to its box on screen (sharp at any zoom).
function drawChart(canvas, data) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(canvas.clientWidth, 100);
  const height = Math.max(canvas.clientHeight, 80);
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "middle";
  const steps = data?.steps || [];
  const baseSteps = data?.baseline?.steps || [];
  const setup = data?.setup || [];
  if (!steps.length) {
    ctx.fillStyle = COLORS.muted;
    ctx.fillText(data ? "no step finished yet" : "no run yet", 8, 14);
    return;
  }

  // Legend row.
  // a full-compute run draws its bars in the baseline's grey: its legend says so in the same colour
  const legend = [data.full_compute ? [COLORS.baseline, "full compute (this run)"] : [COLORS.run, "this run"]];
  if (data.baseline) legend.push([COLORS.baseline, "full compute"]);
  if (setup.length) legend.push([COLORS.setup, "one-off setup"]);
  legend.push([COLORS.flops, "FLOPs vs full"]);
  let x = 40;
  for (const [color, name] of legend) {
    ctx.fillStyle = color;
    ctx.fillRect(x, 5, 9, 9);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(name, x + 12, 10);
    x += 22 + ctx.measureText(name).width;
  }

  const left = 40;
  const right = width - 8;
  const timeTop = 34;
  const flopsBottom = height - 16;
  const split = timeTop + (flopsBottom - timeTop) * 0.62;
  const timeBottom = split - 4;
  const flopsTop = split + 14;
  const columns = setup.length + Math.max(steps.length, baseSteps.length, data.total_steps || 0);
  const gap = setup.length ? 0.6 : 0;
  const slot = (right - left) / (columns + gap);
  const columnX = (i) => left + (i + (i >= setup.length ? gap : 0)) * slot;

  function axes(top, bottom, ticks, peak, format, label) {
    ctx.fillStyle = COLORS.muted;
    ctx.textAlign = "left";
    ctx.fillText(label, left + 2, top - 7);
    for (const value of ticks) {
      const y = Math.round(bottom - ((bottom - top) * value) / peak) + 0.5;
      ctx.strokeStyle = value ? COLORS.grid : COLORS.axis;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(right, y);
      ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText(format(value), left - 4, y);
    }
    ctx.textAlign = "left";
  }

  // Time panel: grouped bars per step (baseline grey, this run blue); setup apart, clipped with its value.
  const peakMs = Math.max(...steps.map((s) => s.ms), ...baseSteps.map((s) => s.ms), 1e-3) * 1.05;
  const ticks = niceTicks(peakMs, 3);
  const peak = ticks[ticks.length - 1];
  axes(timeTop, timeBottom, ticks, peak, formatMs, "model ms per step");
  function bar(x0, w, value, color) {
    const h = ((timeBottom - timeTop) * Math.min(value, peak)) / peak;
    ctx.fillStyle = color;
    ctx.fillRect(x0, timeBottom - h, Math.max(w - 1, 1), h);
    if (value > peak) {
      ctx.fillStyle = COLORS.text;
      ctx.fillText(`${formatMs(value)} ms`, x0, timeTop + 6);
    }
  }
  setup.forEach((work, i) => bar(columnX(i) + slot * 0.15, slot * 0.7, work.seconds * 1e3, COLORS.setup));
  const perColumn = data.baseline ? 2 : 1;
  for (let i = 0; i < columns - setup.length; i++) {
    let x0 = columnX(setup.length + i) + slot * 0.12;
    const each = (slot * 0.76) / perColumn;
    if (data.baseline) {
      if (i < baseSteps.length) bar(x0, each, baseSteps[i].ms, COLORS.baseline);
      x0 += each;
    }
    if (i < steps.length) bar(x0, each, steps[i].ms, data.full_compute ? COLORS.baseline : COLORS.run);
  }

  // FLOPs panel: share of the full model per step (100% = full compute).
  axes(flopsTop, flopsBottom, [0, 1], 1, (v) => `${Math.round(v * 100)}%`, "FLOPs vs full model");
  ctx.fillStyle = COLORS.flops;
  steps.forEach((s, i) => {
    const h = (flopsBottom - flopsTop) * Math.min(s.flops_ratio, 1);
    ctx.fillRect(columnX(setup.length + i) + slot * 0.2, flopsBottom - h, Math.max(slot * 0.6 - 1, 1), h);
  });
  ctx.fillStyle = COLORS.muted;
  ctx.textAlign = "center";
  const every = Math.max(1, Math.ceil((columns - setup.length) / 12));
  for (let i = 0; i < columns - setup.length; i += every) ctx.fillText(String(i), columnX(setup.length + i) + slot / 2, height - 7);
  if (setup.length) {
    ctx.fillStyle = COLORS.setup;
    ctx.fillText("setup", columnX(0) + slot / 2, height - 7);
  }
  ctx.textAlign = "left";
}

// Below this canvas zoom the summary's 11 px text is under 9 px on screen: the node shows its headline instead,
// the numbers an artist reads at a glance, in a font that keeps 12 px on screen (up to 24 px in the node).
const LOW_ZOOM = 0.8;
const HEADLINE = [/full-compute baseline|^full compute/, /step \d+\/\d+/, /x\d+\.\d\d (?:fewer|more) FLOPs/,
  /x\d+\.\d\d (?:faster|slower)/, /\d+\.\d dB PSNR/];

function headline(text) {
  const found = HEADLINE.map((pattern) => text.match(pattern)?.[0]).filter(Boolean);
  return found.length ? found.join(" · ") : text;
}

// Summary or headline for the canvas's zoom; cheap enough to run on every draw of the node.
function fitZoom(node) {
  const view = node.dynamicDit;
  const scale = app.canvas?.ds?.scale ?? 1;
  if (!view || view.scale === scale) return;
  view.scale = scale;
  const low = scale < LOW_ZOOM;
  view.summary.style.display = low ? "none" : "";
  view.headline.style.display = low ? "" : "none";
  view.headline.style.fontSize = `${Math.min(24, 12 / scale).toFixed(1)}px`;
}

function show(node, data, summary) {
  const view = node.dynamicDit;
  if (!view) return;
  view.data = data;
  view.summary.textContent = summary ?? status(data);
  view.headline.textContent = headline(view.summary.textContent);
  view.scale = null;
  fitZoom(node);
  drawChart(view.canvas, data);
  node.setDirtyCanvas?.(true, true);
}

function createView(node) {
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;box-sizing:border-box;";
  const summary = document.createElement("div");
  summary.className = "dynamic-dit-summary";
  summary.style.cssText =
    "font:11px/1.35 sans-serif;color:#e1e4e8;white-space:normal;overflow-wrap:anywhere;overflow-y:auto;max-height:90px;flex:none;";
  const head = document.createElement("div");
  head.className = "dynamic-dit-headline";
  head.style.cssText = "font-weight:600;line-height:1.25;color:#e1e4e8;overflow:hidden;max-height:90px;flex:none;display:none;";
  const canvas = document.createElement("canvas");
  canvas.className = "dynamic-dit-chart";
  canvas.style.cssText = `width:100%;flex:1 1 auto;min-height:${CHART_HEIGHT - 70}px;border-radius:4px;`;
  root.append(head, summary, canvas);
  node.dynamicDit = { root, summary, headline: head, canvas, data: null, scale: null };
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => drawChart(canvas, node.dynamicDit.data)).observe(canvas);
  }
  node.addDOMWidget("dynamic_dit_report", "dynamic_dit_report", root, {
    serialize: false,
    getMinHeight: () => CHART_HEIGHT,
  });
  show(node, null);
}

// The node a report input is wired to (null when unconnected). LiteGraph keeps links in a Map or a plain object.
function sourceOf(node, inputName) {
  const id = node.inputs?.find((input) => input.name === inputName)?.link;
  const links = app.graph?.links;
  const link = id == null ? null : links instanceof Map ? links.get(id) : links?.[id];
  return link ? String(link.origin_id) : null;
}

// The reports a run sampled by node `sampler` belongs on: those whose latent or baseline_latent comes from it.
// When none is wired to it (a subgraph, a reroute, an unknown sampler id), every report shows it, as one report would.
function reportsOf(sampler) {
  const reports = (app.graph?._nodes || []).filter((node) => node.type === REPORT);
  if (sampler == null) return reports;
  const wired = reports.filter((node) => ["latent", "baseline_latent"].some((name) => sourceOf(node, name) === String(sampler)));
  return wired.length ? wired : reports;
}

app.registerExtension({
  name: "dynamic_dit.report",
  async setup() {
    api.addEventListener("dynamic_dit.progress", (event) => {
      for (const node of reportsOf(event.detail?.node)) show(node, event.detail);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== REPORT) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (typeof this.addDOMWidget === "function") {
        createView(this);
        this.setSize?.([Math.max(this.size[0], MIN_WIDTH), Math.max(this.size[1], this.computeSize?.()[1] ?? 0)]);
      }
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      // The report's final numbers, with the baseline connected to it. Kept in the node's properties,
      // so they stay when the workflow is saved, reloaded or its tab reopened.
      const final = message?.dynamic_dit_chart?.[0];
      if (!final) return;
      const summary = `done: ${(message?.text || []).join("\n")}`;
      this.properties = this.properties || {};
      this.properties[SAVED] = { data: final, summary };
      show(this, final, summary);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function () {
      fitZoom(this);
      return onDrawForeground?.apply(this, arguments);
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const saved = this.properties?.[SAVED];
      if (saved?.data) show(this, saved.data, saved.summary);
      return result;
    };
  },
});
