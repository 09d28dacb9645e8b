"""The Assistant Axis on the real bundled model: estimated from training personas and questions, it separates
held-out personas' replies from the default Assistant's, and a floor cap lifts persona replies along it."""

from __future__ import annotations

import pytest
import torch

from steerable.data import roles
from steerable.directions.artifact import layer_ranges, save_directions
from steerable.directions.axis import answer, capture_axis_data, default_cap_layers, fit_axis, role_rows
from steerable.directions.quality import auroc
from steerable.evaluate.monitor import AxisMonitor
from steerable.generation import generate
from steerable.models.load import load_model

pytestmark = pytest.mark.integration
TOKENS = 24


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def axis(smol, tmp_path_factory):
    rows = answer(smol, role_rows(roles.personas("train")[:12], roles.questions("train")[:16], 2),
                  max_new_tokens=TOKENS, progress=False)
    ds = fit_axis(smol, capture_axis_data(smol, rows, progress=False))
    return ds, str(save_directions(ds, tmp_path_factory.mktemp("axis") / "axis.safetensors"))


def _projections(handle, prompts, layer, axis_ds, plan=None):
    mon = AxisMonitor(axis_ds.direction(layer), layer)
    generate(handle, prompts, plan, max_new_tokens=TOKENS, monitor=mon)
    return torch.tensor([mon.projection(i) for i in range(len(prompts))])


def test_axis_separates_held_out_personas_and_capping_lifts_them(smol, axis):
    ds, path = axis
    layer = ds.meta["axis"]["monitor_layer"]
    questions = [q.question for q in roles.questions("test")[:8]]
    personas = roles.personas("test")[:8]
    as_persona = [[{"role": "system", "content": p.system}, {"role": "user", "content": q}]
                  for p, q in zip(personas, questions, strict=True)]
    default = _projections(smol, questions, layer, ds)
    persona = _projections(smol, as_persona, layer, ds)
    # held-out personas and questions: the Assistant's own replies project higher
    assert float(default.mean()) > float(persona.mean())
    assert auroc(default, persona) >= 0.75
    cap = {"vector": path, "method": "cap", "cap_floor": "p25", "layers": layer_ranges(default_cap_layers(30))}
    capped = _projections(smol, as_persona, layer, ds, cap)
    assert float(capped.mean()) > float(persona.mean())
