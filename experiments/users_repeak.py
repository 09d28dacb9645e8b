"""Re-derive a users eval report's sweep peaks / bimodality from its stored points with the current rule
(preference_eval.peaks) and rewrite its files (report.json, index.html, PNGs):

    python experiments/users_repeak.py DIR
"""

import json
import sys

from steerable.evaluate.preference_eval import peaks
from steerable.recipes.users_eval_report import write_report


def main(out: str) -> None:
    with open(f"{out}/report.json", encoding="utf-8") as f:
        report = json.load(f)
    for s in (report.get("sweep") or {}).values():
        pts = s["points"]
        s.update(peaks([p["strength"] for p in pts], [p["value"] for p in pts], s["noise"]))
    write_report(out, report)
    print({c: (s["peaks"], s["bimodal"]) for c, s in (report.get("sweep") or {}).items()})


if __name__ == "__main__":
    main(sys.argv[1])
