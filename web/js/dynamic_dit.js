// Dynamic DiT in the ComfyUI frontend:
// - "Dynamic Speed Report" shows its summary line on the node after it runs;
// - while a Dynamic DiT model samples, every report node draws a live per-step chart
//   (model ms per step as bars, FLOPs vs full as a line) from the "dynamic_dit.progress" events.
//
// This file is served at /extensions/<pack folder>/js/dynamic_dit.js, so the frontend's modules
// are three levels up.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const REPORT = "DynamicSpeedReport";
const CHART_HEIGHT = 120;

function summaryWidget(node) {
  let widget = node.widgets?.find((w) => w.name === "summary");
  if (!widget) {
    widget = node.addWidget("text", "summary", "", () => {}, { serialize: false });
  }
  return widget;
}

function drawProgress(canvas, progress) {
  const ctx = canvas.getContext("2d");
  const width = canvas.width;
  const height = canvas.height;
  ctx.fillStyle = "#181a1f";
  ctx.fillRect(0, 0, width, height);
  const steps = progress?.steps || [];
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#e1e4e8";
  const done = progress?.done ? "done" : `step ${steps.length}/${progress?.total_steps ?? "?"}`;
  const flops = progress ? `x${progress.flops_reduction.toFixed(2)} fewer FLOPs` : "waiting for a run";
  const seconds = progress ? `${progress.model_seconds.toFixed(2)} s model` : "";
  ctx.fillText(`${done} · ${flops} · ${seconds}`, 6, 13);
  if (!steps.length) return;
  const top = 20;
  const bottom = height - 4;
  const slot = (width - 8) / Math.max(steps.length, progress.total_steps || 1);
  const peak = Math.max(...steps.map((s) => s.ms), 1e-6);
  ctx.fillStyle = "#56b6ff";
  steps.forEach((s, i) => {
    const h = ((bottom - top) * s.ms) / peak;
    ctx.fillRect(4 + i * slot + slot * 0.15, bottom - h, slot * 0.7, h);
  });
  ctx.strokeStyle = "#ffaa3c";
  ctx.lineWidth = 2;
  ctx.beginPath();
  steps.forEach((s, i) => {
    const x = 4 + i * slot + slot * 0.5;
    const y = bottom - (bottom - top) * Math.min(s.flops_ratio, 1);
    if (i === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

app.registerExtension({
  name: "dynamic_dit.report",
  async setup() {
    api.addEventListener("dynamic_dit.progress", (event) => {
      for (const node of app.graph?._nodes || []) {
        if (node.type !== REPORT || !node.dynamicDitCanvas) continue;
        node.dynamicDitProgress = event.detail;
        drawProgress(node.dynamicDitCanvas, event.detail);
        if (event.detail.done && event.detail.summary) summaryWidget(node).value = event.detail.summary;
        node.setDirtyCanvas(true, true);
      }
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== REPORT) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      if (typeof this.addDOMWidget !== "function") return;
      const canvas = document.createElement("canvas");
      canvas.width = 400;
      canvas.height = CHART_HEIGHT;
      canvas.style.width = "100%";
      this.dynamicDitCanvas = canvas;
      this.addDOMWidget("live", "canvas", canvas, { serialize: false, getMinHeight: () => CHART_HEIGHT });
      drawProgress(canvas, null);
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      summaryWidget(this).value = (message?.text || []).join("\n");
      this.setDirtyCanvas(true, true);
    };
  },
});
