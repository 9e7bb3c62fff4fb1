// Shows the summary line of "Dynamic Speed Report" on the node itself after it runs.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "dynamic_dit.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "DynamicSpeedReport") return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "summary");
      if (!widget) {
        widget = this.addWidget("text", "summary", "", () => {}, { serialize: false });
      }
      widget.value = text;
      this.setDirtyCanvas(true, true);
    };
  },
});
