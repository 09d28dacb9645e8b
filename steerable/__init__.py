"""steerable: find directions in a model's activations, steer with them, measure what happens.

Data flows one way: models → capture → directions → steering → generation → evaluate.
"""

from steerable.capture.run import capture_stats
from steerable.directions.artifact import DirectionSet, load_directions, save_directions
from steerable.directions.axis import fit_axis
from steerable.directions.calibrate import calibrate
from steerable.evaluate.monitor import AxisMonitor
from steerable.generation import generate
from steerable.models.load import ModelHandle, load_model
from steerable.steering.hooks import steer
from steerable.steering.plan import Intervention, SteeringPlan, build_plan

__all__ = [
    "AxisMonitor",
    "DirectionSet",
    "Intervention",
    "ModelHandle",
    "SteeringPlan",
    "build_plan",
    "calibrate",
    "capture_stats",
    "fit_axis",
    "generate",
    "load_directions",
    "load_model",
    "save_directions",
    "steer",
]
