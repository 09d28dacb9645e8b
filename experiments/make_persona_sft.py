"""Write steerable/data/sets/persona_sft.jsonl, the rows of the built-in `persona-sft` / `persona-sft-assistant` sets.

Each row is a neutral role-data question (no system prompt) and an answer the model gave to it: in character
("role": with a role-data persona's system prompt set) or as its default Assistant ("assistant": no system prompt).
Train rows reuse the answers of a `steerable axis` run (training personas × training questions, 4 per persona;
every training question as the Assistant); test rows are generated here the same way (greedy, 48 new tokens) for
test personas × test questions (2 per persona, rotating, so every test question is answered once in character)
and every test question as the Assistant. Answers are cut at their last sentence end (a 48-token answer usually
stops mid-sentence; the SFT loss also trains the end-of-turn token).

  python experiments/make_persona_sft.py --model smollm2-135m --responses runs/h16/smollm2-135m-axis.responses.jsonl
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import re

from steerable.data import roles
from steerable.data.sft import PERSONA_SFT_FILE
from steerable.directions.axis import role_rows
from steerable.fsutil import write_text_atomic
from steerable.models.load import load_model
from steerable.recipes.axis import answer, read_responses

_END = re.compile(r"[.!?…][\"')\]]*(?=\s|$)")


def trim(text: str) -> str:
    """The text up to its last sentence end (the whole text when it has none in its second half)."""
    text = text.strip()
    ends = [m.end() for m in _END.finditer(text)]
    return text[:ends[-1]] if ends and ends[-1] >= len(text) // 2 else text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--responses", required=True, help="a `steerable axis` run's .responses.jsonl (the train rows)")
    ap.add_argument("--out", default=str(PERSONA_SFT_FILE))
    args = ap.parse_args()
    handle = load_model(args.model)
    train = read_responses(args.responses)
    test = answer(handle, role_rows(roles.personas("test"), roles.questions("test"), 2), max_new_tokens=48)
    out = []
    for split, rows in (("train", train), ("test", test)):
        for r in rows:
            text = trim(r.response)
            if text:
                out.append({"kind": r.kind, "persona": r.persona, "question_id": r.question_id, "prompt": r.question,
                            "response": text, "split": split, "model": args.model})
    write_text_atomic(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    print(f"wrote {len(out)} rows to {args.out}")


if __name__ == "__main__":
    main()
