"""The per-step events a live view gets inside a server: a running summary, the baseline to compare with."""
import sys
import types

import pytest

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.devtools.demo import run_node
from comfyui_dynamic_dit.integration.patching import install_executor, plan_of
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import node_outputs


@pytest.fixture
def events(monkeypatch):
    sent = []

    class FakePromptServer:
        client_id = "browser-1"

        def send_sync(self, event, data, sid=None):
            sent.append(data)

    fake_server = types.ModuleType("server")
    fake_server.PromptServer = type("PromptServer", (), {"instance": FakePromptServer()})
    monkeypatch.setitem(sys.modules, "server", fake_server)
    return sent


def test_summary_updates_while_sampling(flux_model, conds, events):
    model = install_executor(flux_model)
    tiny_flux.sample(model, *conds, steps=3, seed=2)
    summaries = [e["summary"] for e in events]
    assert [" - step 0/3," in summaries[0], " - step 1/3," in summaries[1], " - step 2/3," in summaries[2]] == [True] * 3
    assert " - 3 steps," in summaries[3] and events[3]["done"]
    assert all(e["full_compute"] for e in events) and {e["run_id"] for e in events} == {plan_of(model).telemetry.latest().run_id}


def test_done_event_compares_with_the_latest_full_compute_run_of_the_shape(flux_model, other_flux_model, conds, events):
    baseline = node_outputs(NODE_CLASS_MAPPINGS["DynamicTelemetry"], flux_model)[0]
    tiny_flux.sample(baseline, *conds, steps=3, seed=2)
    other = install_executor(other_flux_model)  # a full-compute run of another model: never the baseline
    tiny_flux.sample(other, *tiny_flux.conditioning(tiny_flux.TinyFlux(hidden_size=192, num_heads=3)), steps=3, seed=2)
    dynamic = run_node(NODE_CLASS_MAPPINGS["DynamicTokenRouter"], model=flux_model)
    events.clear()
    tiny_flux.sample(dynamic, *conds, steps=3, seed=2)
    done = events[-1]
    assert done["done"] and not done["full_compute"]
    assert done["baseline"]["run_id"] == plan_of(baseline).telemetry.latest().run_id
    assert "no full-compute run" not in done["summary"] and "s full compute)" in done["summary"]
    assert len(events[1]["baseline"]["steps"]) == 3  # the baseline's bars are there from the first event on
