"""steerable: find directions in a model's activations, steer with them, measure what happens.

Data flows one way: models → capture → directions → steering → generation → evaluate.

    from steerable import from_model, calibrate, add, cap, steer, generate
    handle = from_model(model, tokenizer)
    ds = calibrate(handle, examples)
    with steer(handle, add(ds, 0.8, layers="9-11") + cap(axis, floor="p25")):
        model.generate(...)
"""

from steerable.capture.run import capture_stats
from steerable.directions.artifact import DirectionSet, load_directions, save_directions
from steerable.directions.axis import fit_axis
from steerable.directions.calibrate import calibrate
from steerable.errors import ArtifactError, DataError, ModelMismatchError, PlanError, SteerableError
from steerable.evaluate.monitor import AxisMonitor
from steerable.generation import generate
from steerable.models.batch import PromptBatch
from steerable.models.load import ModelHandle, from_model, load_model
from steerable.recipes.axis import estimate_axis
from steerable.steering.builders import Plan, ablate, add, angular, cap, conditional, rotate, sttp
from steerable.steering.hooks import steer
from steerable.steering.plan import SteeringPlan, build_plan
from steerable.steering.spec import Intervention

__all__ = [
    "ArtifactError",
    "AxisMonitor",
    "DataError",
    "DirectionSet",
    "Intervention",
    "ModelHandle",
    "ModelMismatchError",
    "Plan",
    "PlanError",
    "PromptBatch",
    "SteerableError",
    "SteeringPlan",
    "ablate",
    "add",
    "angular",
    "build_plan",
    "calibrate",
    "cap",
    "capture_stats",
    "conditional",
    "estimate_axis",
    "fit_axis",
    "from_model",
    "generate",
    "load_directions",
    "load_model",
    "rotate",
    "save_directions",
    "steer",
    "sttp",
]
