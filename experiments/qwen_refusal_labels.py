"""Label qwen2.5-0.5b's own behaviour: harmful training prompts it refuses vs benign ones it answers.

A refusal direction should separate what the model refuses from what it answers; advbench-vs-benign
prompts alone mix in "harmfulness" and the benign prompts Qwen-Coder deflects ("As an AI language
model…"). Writes runs/qwen-refused.jsonl and runs/qwen-complied.jsonl (training prompts only), then:

    python experiments/qwen_refusal_labels.py
    steerable calibrate --model qwen2.5-0.5b --positive runs/qwen-refused.jsonl \
        --negative runs/qwen-complied.jsonl --position last --out runs/qwen-refusal-behav.safetensors
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from steerable.data.loaders import load_prompts
from steerable.evaluate.refusal import is_refusal
from steerable.fsutil import write_text_atomic
from steerable.generation import generate
from steerable.models.load import load_model

N = 120  # advbench:train[:120] and benign:train[:120]; refusal_qwen.py selects on advbench:train[120:]

handle = load_model("qwen2.5-0.5b")
harmful, benign = load_prompts("advbench:train")[:N], load_prompts("benign:train")[:N]
out_h = generate(handle, harmful, max_new_tokens=16, batch_size=24, progress=True)
out_b = generate(handle, benign, max_new_tokens=16, batch_size=24, progress=True)
refused = [p for p, o in zip(harmful, out_h, strict=True) if is_refusal(o)]
complied = [p for p, o in zip(benign, out_b, strict=True) if not is_refusal(o)]
os.makedirs("runs", exist_ok=True)
write_text_atomic("runs/qwen-refused.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in refused))
write_text_atomic("runs/qwen-complied.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in complied))
print(f"refused {len(refused)}/{N} harmful, answered {len(complied)}/{N} benign")
