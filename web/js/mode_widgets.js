// A node's mode shows only the widgets it reads: an input declared with "dynamic_dit_shown_when" ({widget: [values]},
// shown while every named widget has one of its values) or "dynamic_dit_hidden_when" (hidden while any named widget
// has one of its values) is hidden, not removed, so every widget keeps its place in a saved workflow and its value in
// a queued prompt, on every ComfyUI version the pack supports (integration/node_schema.py declares them).
//
// This file is served at /extensions/<pack folder>/js/mode_widgets.js, so the frontend's modules are three levels up.
import { app } from "../../../scripts/app.js";

const SHOWN = "dynamic_dit_shown_when";
const HIDDEN = "dynamic_dit_hidden_when";

function rulesOf(nodeData) {
  const rules = {};
  for (const section of ["required", "optional"]) {
    for (const [name, spec] of Object.entries(nodeData?.input?.[section] ?? {})) {
      const options = Array.isArray(spec) ? spec[1] ?? {} : {};
      if (options[SHOWN] || options[HIDDEN]) rules[name] = { shown: options[SHOWN] ?? {}, hidden: options[HIDDEN] ?? {} };
    }
  }
  return rules;
}

function isRead(node, rule) {
  const value = (name) => node.widgets?.find((widget) => widget.name === name)?.value;
  const shown = Object.entries(rule.shown).every(([name, values]) => values.includes(value(name)));
  const hidden = Object.entries(rule.hidden).some(([name, values]) => values.includes(value(name)));
  return shown && !hidden;
}

const OWN_SIZE = Symbol("dynamic_dit.own_computeSize");

function setHidden(widget, hide) {
  widget.hidden = hide; // not drawn, not clickable
  // and no room: frontends before 1.37 lay out hidden widgets too (a widget's height is computeSize()[1] + 4)
  if (hide) {
    if (!(OWN_SIZE in widget)) widget[OWN_SIZE] = Object.prototype.hasOwnProperty.call(widget, "computeSize") ? widget.computeSize : undefined;
    widget.computeSize = () => [0, -4];
  } else if (OWN_SIZE in widget) {
    if (widget[OWN_SIZE] === undefined) delete widget.computeSize;
    else widget.computeSize = widget[OWN_SIZE];
    delete widget[OWN_SIZE];
  }
}

export function showModeWidgets(node, rules) {
  let changed = false;
  for (const widget of node.widgets ?? []) {
    const rule = rules[widget.name];
    if (!rule) continue;
    const hide = !isRead(node, rule);
    if (Boolean(widget.hidden) !== hide) {
      setHidden(widget, hide);
      changed = true;
    }
  }
  if (changed) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    node.setDirtyCanvas?.(true, true);
  }
}

app.registerExtension({
  name: "dynamic_dit.mode_widgets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const rules = rulesOf(nodeData);
    if (!Object.keys(rules).length) return;
    const controllers = new Set(Object.values(rules).flatMap((rule) => [...Object.keys(rule.shown), ...Object.keys(rule.hidden)]));
    nodeType.prototype.dynamicDitModeRules = rules;

    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = created?.apply(this, arguments);
      const node = this;
      for (const widget of node.widgets ?? []) {
        if (!controllers.has(widget.name)) continue;
        const callback = widget.callback;
        widget.callback = function () {
          const returned = callback?.apply(this, arguments);
          showModeWidgets(node, rules);
          return returned;
        };
      }
      showModeWidgets(node, rules);
      return result;
    };

    const configure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = configure?.apply(this, arguments);
      showModeWidgets(this, rules); // a loaded workflow's values decide
      return result;
    };
  },
});
