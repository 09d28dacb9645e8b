"""Hook cost per decode step of one checkout against another, measured in separate processes.

    git worktree add /tmp/old_wt <commit>
    for r in 1 2; do for t in /tmp/old_wt .; do python bench/hooks_ab.py $t VECTOR; done; done

Each run prints {"method@batch": µs per decode step} for 8 methods × 2 batch sizes, measured by
bench/overhead.py's `hook_cost_us` of that checkout (the steering hooks called as a forward pass calls them,
1 000 calls × 5, median). Alternate the checkouts so that drift in the machine's speed falls on both.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch

root = os.path.abspath(sys.argv[1])
sys.path.insert(0, root)
sys.path.insert(0, os.path.join(root, "bench"))

import overhead as ov  # noqa: E402  (the checkout's own bench/overhead.py)
import torch  # noqa: E402

from steerable.models.load import load_model  # noqa: E402

torch.set_num_threads(2)
handle = load_model("smollm2-135m")
plans = ov.plans(sys.argv[2], "9-15")
out = {f"{m}@{b}": ov.hook_cost_us(handle, plans[m], batch=b, reps=1000)
       for m in ("add", "ablate", "cap", "rotate", "angular", "sttp", "stmp", "conditional") for b in (1, 16)}
print(json.dumps({"checkout": root, "us_per_step": out}))
