"""Every steering method, registered by its plan name: one spec dataclass per method, next to its maths.

`METHODS` maps the plan's `"method"` to the class the validator builds; `conditional` (CAST) wraps
another plan instead of steering, and its keys live with the condition (steering/cast.py).
"""

from __future__ import annotations

from steerable.steering.methods.ablate import Ablate
from steerable.steering.methods.add import Add
from steerable.steering.methods.cap import Cap
from steerable.steering.methods.plane import Angular, AngularAdaptive, PlaneMethod, Rotate
from steerable.steering.methods.projection import StMP, StTP
from steerable.steering.spec import Intervention, Params

METHODS: dict[str, type[Intervention]] = {
    cls.method: cls for cls in (Add, Ablate, Cap, Rotate, Angular, AngularAdaptive, StTP, StMP)
}
#: methods that rotate in a (b1, b2) plane: they take an angle and default to the global direction
PLANE_METHODS: tuple[str, ...] = tuple(name for name, cls in METHODS.items() if issubclass(cls, PlaneMethod))
#: every value the plan key "method" accepts (conditional wraps another plan)
METHOD_NAMES: tuple[str, ...] = (*METHODS, "conditional")

__all__ = ["METHODS", "METHOD_NAMES", "PLANE_METHODS", "Ablate", "Add", "Angular", "AngularAdaptive", "Cap",
           "Intervention", "Params", "Rotate", "StMP", "StTP"]
