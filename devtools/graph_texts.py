"""Texts the example workflows' notes share (`example_graphs`, `example_graphs_image`)."""

REPORT_HELP = (
    "**Dynamic Speed Report** draws a bar per sampling step (model ms, the full-compute run in grey next to it, "
    "one-off setup such as the width calibration apart) and the FLOPs of every step, live while sampling; "
    "**Preview as Text** shows its per-step table."
)

SKIP_BASELINE = (
    "The full-compute run doubles the time. To skip it, select the nodes titled *(full compute)* and mute them "
    "(Ctrl+M): the reports still show every step's FLOPs and model time, and compare with the latest full-compute "
    "run of the same size and steps when there is one."
)
