"""The Assistant Axis on the real bundled model: estimated from training personas and questions, it separates
held-out personas' replies from the default Assistant's, and a floor cap makes persona replies more
Assistant-like *as text*: the unsteered model, re-reading what the capped model wrote, places it higher on
the axis than the uncapped persona replies."""

from __future__ import annotations

import pytest
import torch

from steerable.data import roles
from steerable.directions.artifact import layer_ranges, save_directions
from steerable.directions.axis import capture_axis_data, default_cap_layers, fit_axis, role_rows
from steerable.directions.quality import auroc
from steerable.evaluate.drift import text_projections
from steerable.evaluate.monitor import AxisMonitor
from steerable.generation import generate
from steerable.models.load import load_model
from steerable.recipes.axis import answer

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


def _generate(handle, prompts, layer, axis_ds, plan=None):
    """Replies and their projection at `layer` read while generating (under `plan`)."""
    mon = AxisMonitor(axis_ds.direction(layer), layer)
    replies = generate(handle, prompts, plan, max_new_tokens=TOKENS, monitor=mon)
    return replies, torch.tensor([mon.projection(i) for i in range(len(prompts))])


def _text(handle, axis_ds, layer, prompts, replies):
    """The replies re-read by the unsteered model (empty replies, which have no response-mean, dropped)."""
    values = text_projections(handle, axis_ds, layer, prompts, replies)
    return torch.tensor([v for v in values if v is not None], dtype=torch.float64)


def test_axis_separates_held_out_personas_and_capping_makes_their_text_assistant_like(smol, axis):
    ds, path = axis
    layer = ds.meta["axis"]["monitor_layer"]
    personas = roles.personas("test")
    questions = [q.question for q in roles.questions("test")[: len(personas)]]
    as_persona = [[{"role": "system", "content": p.system}, {"role": "user", "content": q}]
                  for p, q in zip(personas, questions, strict=True)]
    _, default = _generate(smol, questions, layer, ds)
    persona_replies, persona = _generate(smol, as_persona, layer, ds)
    # held-out personas and questions: the Assistant's own replies project higher
    assert float(default.mean()) > float(persona.mean())
    assert auroc(default, persona) >= 0.75

    cap_layers = default_cap_layers(smol.n_layers)
    cap = {"vector": path, "method": "cap", "cap_floor": "p25", "layers": layer_ranges(cap_layers)}
    capped_replies, _ = _generate(smol, as_persona, layer, ds, cap)
    assert capped_replies != persona_replies  # the cap changed what was written
    # Not the projection while generating: a floor on layers feeding the monitored one raises it by
    # construction. The unsteered model re-reads both sets of replies in the same persona context, so only
    # the words differ: the capped model's text must read as more Assistant-like.
    uncapped_text = _text(smol, ds, layer, as_persona, persona_replies)
    capped_text = _text(smol, ds, layer, as_persona, capped_replies)
    assert len(uncapped_text) >= len(personas) - 2
    assert len(capped_text) >= len(personas) - 2
    assert float(capped_text.mean()) > float(uncapped_text.mean())
