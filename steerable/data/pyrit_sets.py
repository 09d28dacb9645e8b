"""Harmful prompt sets from pyrit 1.1.0's local seed datasets, beyond AdvBench: three more distributions a
condition (CAST) should fire on, so that leave-one-source-out validation sees harm written by other
hands (data/condition_sources.py). Each row keeps its file as "category"; the split is the project's
fixed hash split (loaders.split_of, 30 % test).

- `redteam-harmful`: plain-language harmful objectives — the AI Red Team sets (`airt/`: harassment, harms,
  hate, illegal, malware, misinformation, scams, sexual, violence, imminent crisis, fairness) and the
  objectives of garak's "doctor" probe (bio/nuclear weapons, bombs, drugs).
- `jailbreak-harmful`: 0DIN's disclosed guardrail bypasses (`0din/`): harmful requests hidden in a debug
  task, a document correction, hex, a table to complete, placeholders, a field guide.
- `prompt-extraction`: attempts to extract the system prompt or memorised data — garak's
  `system_prompt_extraction`, the AI Red Team's `leakage` and Prompt Security's `psfuzz_steal_system`.

Left out, because they are not requests a refusal condition should fire on: `airt/fairness_yes_no`
(harmless open questions), `airt/airt_licensed_therapist` (a harmless request; the harm is a reply that
claims a licence), garak's doctor objective for a skin-cancer treatment plan (a medical question like the
edgy-benign ones), and garak's payload lists (shell strings, XSS, slurs, domains, package-hallucination
tasks, benign carrier instructions: fragments, not requests). Of the AI Red Team's multi-turn seeds only
the objective is kept; 0DIN's three-turn hex attack becomes one user message, its turns joined.
"""

from __future__ import annotations

from typing import Any

import yaml

from steerable.data.pyrit_seed_files import PYRIT_SEED_FILES
from steerable.data.sources import data_file
from steerable.errors import DataError

_AIRT = ("imminent-crisis", "fairness", "harassment", "harms", "hate", "illegal", "malware", "misinformation",
         "scams", "sexual", "violence")
SET_FILES: dict[str, tuple[str, ...]] = {
    "redteam-harmful": (*(f"pyrit-airt-{s}" for s in _AIRT), "pyrit-garak-doctor"),
    "jailbreak-harmful": tuple(k for k in PYRIT_SEED_FILES if k.startswith("pyrit-0din-")),
    "prompt-extraction": ("pyrit-garak-system-prompt-extraction", "pyrit-airt-leakage", "pyrit-psfuzz-steal-system"),
}
PYRIT_SETS = tuple(SET_FILES)
_HARMLESS = {"medical_advice"}  # a seed with only these harm categories is not a harmful request


def _file_rows(name: str) -> list[dict[str, Any]]:
    doc = yaml.safe_load(data_file(name).read_text(encoding="utf-8"))
    category = name.removeprefix("pyrit-")
    seeds = doc["seeds"]
    staged = [s for s in seeds if s.get("sequence") is not None]
    if staged and all(s.get("role", "user") == "user" for s in staged) and len(staged) == len(seeds):
        # one multi-turn attack of user turns only: the turns as one message (no assistant replies to keep)
        text = "\n\n".join(s["value"].strip() for s in sorted(staged, key=lambda s: s["sequence"]))
        return [{"prompt": text, "category": category}]
    out = []
    for s in seeds:
        if s.get("sequence") is not None or s.get("role") is not None:
            continue  # a turn of a scripted conversation, not a request on its own
        if set(s.get("harm_categories") or ()) and set(s["harm_categories"]) <= _HARMLESS:
            continue
        out.append({"prompt": s["value"].strip(), "category": category})
    return out


def pyrit_rows(name: str) -> list[dict[str, Any]]:
    """All rows `{"prompt", "category"}` of one set (every split; loaders select one)."""
    if name not in SET_FILES:
        raise DataError(f"unknown pyrit prompt set {name!r}: use one of {', '.join(PYRIT_SETS)}")
    return [r for f in SET_FILES[name] for r in _file_rows(f)]
