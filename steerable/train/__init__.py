"""Fine-tuning with training-time steering (methods.md §6; docs/training.md): LoRA via peft, the auxiliary,
regularisation and contrastive terms read through hooks, preventative steering and CAFT as plans under
`steer()`. An apply stage, like generation: it imports models, capture, directions and steering only."""

from steerable.train.adapter import load_adapter
from steerable.train.config import METHODS, TrainConfig
from steerable.train.loop import TrainResult, train

__all__ = ["METHODS", "TrainConfig", "TrainResult", "load_adapter", "train"]
