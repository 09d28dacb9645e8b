"""What a training run is told: the method (methods.md §6), its direction and weights, and the LoRA settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerable.directions.artifact import DirectionSet
from steerable.errors import SteerableError

# method -> the loss terms it adds (losses.TERMS); preventative and caft add none: they steer the forward pass
METHOD_TERMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "aux": ("aux",),
    "actreg": ("actreg",),
    "contrastive": ("contrastive",),
    "combined": ("aux", "actreg"),
    "preventative": (),
    "caft": (),
}
METHODS = tuple(METHOD_TERMS)
STEERED = ("preventative", "caft")  # the methods that run the training forward passes under a plan
# CAFT's ablation: "zero" projects the direction out (h − (h·â)â, methods.md §5), as the CAFT paper does; "mean"
# sets h·â to the base model's Assistant-class mean instead (mean ablation, ours), so the layers after it see
# the projection the unsteered model gives them at inference and not a value they never meet outside training
CAFT_ABLATIONS = ("zero", "mean")

# a run's identity (TrainConfig.identity plus what the loop adds) -> the `steerable train` flag that sets it, for
# the message refusing a resume under other settings
RESUME_FLAGS = {"method": "--method", "vector": "--vector", "layers": "--layers", "lam": "--lambda",
                "lam_reg": "--lambda-reg", "strength": "--strength", "steps": "--steps", "lr": "--lr",
                "batch_size": "--batch-size", "max_length": "--max-length", "lora_r": "--lora-r",
                "lora_alpha": "--lora-alpha", "seed": "--seed", "gradient_checkpointing": "--gradient-checkpointing",
                "caft_ablation": "--caft-ablation", "data": "--data", "model": "--model"}


@dataclass(frozen=True)
class TrainConfig:
    """One run. `lam` weighs every term; `lam_reg` (default `lam`) the regularisation term of `combined`.
    `strength` is preventative steering's α along the file's direction (its positive class: the trait for a
    trait vector, the Assistant for an axis). `caft_ablation` is CAFT's ablation (CAFT_ABLATIONS). `layers`
    defaults to the axis's cap layers, else the file's best held-out-AUROC layer."""

    method: str = "none"
    vector: str | Path | DirectionSet | None = None
    layers: str | None = None
    lam: float = 0.1
    lam_reg: float | None = None
    strength: float = 1.0
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 256
    lora_r: int = 8
    lora_alpha: int | None = None  # default 2·r
    lora_dropout: float = 0.0
    seed: int = 0
    gradient_checkpointing: bool = False
    caft_ablation: str = "zero"

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (JSON values). The vector and layers
        are the loop's to add (a file's hash, the resolved layer list), as are the data and the model."""
        # caft_ablation only where it is not the default, so a checkpoint written before it existed still resumes
        extra = {"caft_ablation": self.caft_ablation} if self.caft_ablation != "zero" else {}
        return {**extra, "method": self.method, "lam": self.lam, "lam_reg": self.lam_reg, "strength": self.strength,
                "steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "max_length": self.max_length,
                "lora_r": self.lora_r, "lora_alpha": self.lora_alpha or 2 * self.lora_r,
                "lora_dropout": self.lora_dropout, "seed": self.seed,
                "gradient_checkpointing": self.gradient_checkpointing}

    @property
    def terms(self) -> tuple[str, ...]:
        return METHOD_TERMS[self.method]

    def weight(self, term: str) -> float:
        if term == "actreg" and self.method == "combined" and self.lam_reg is not None:
            return self.lam_reg
        return self.lam

    def check(self) -> None:
        if self.method not in METHOD_TERMS:
            raise SteerableError(f"unknown training method {self.method!r}: use {', '.join(METHODS)}")
        if self.caft_ablation not in CAFT_ABLATIONS:
            raise SteerableError(f"unknown CAFT ablation {self.caft_ablation!r}: use {', '.join(CAFT_ABLATIONS)}")
        if self.caft_ablation != "zero" and self.method != "caft":
            raise SteerableError(f"caft_ablation {self.caft_ablation!r} is CAFT's setting; method {self.method!r} "
                                 "ablates nothing (use --method caft)")
        if self.method != "none" and self.vector is None:
            raise SteerableError(f"method {self.method!r} needs a direction file (--vector FILE.safetensors)")
        for name, value, lo in (("steps", self.steps, 1), ("batch_size", self.batch_size, 1),
                                ("max_length", self.max_length, 2), ("lora_r", self.lora_r, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise SteerableError(f"{name} must be a whole number ≥ {lo}, got {value!r}")
        for name, x in (("lambda", self.lam), ("lambda_reg", self.lam_reg), ("strength", self.strength),
                        ("lr", self.lr), ("lora_alpha", self.lora_alpha), ("lora_dropout", self.lora_dropout)):
            if x is not None and not (isinstance(x, int | float) and math.isfinite(x)):
                raise SteerableError(f"{name} must be a finite number, got {x!r}")
        if self.lam < 0 or (self.lam_reg is not None and self.lam_reg < 0):
            raise SteerableError("lambda must be ≥ 0 (a negative weight would reward the penalised movement)")
        if self.lr <= 0:
            raise SteerableError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise SteerableError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


__all__ = ["CAFT_ABLATIONS", "METHODS", "METHOD_TERMS", "RESUME_FLAGS", "STEERED", "TrainConfig"]
