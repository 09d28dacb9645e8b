"""Do a model's activations tell users-caa's answers apart? (docs/users_caa.md "Rows", docs/personalisation.md)

For every item of the users-caa pools (7 CAA behaviours, 60 train-split + 30 test-split items each), the
activations (resid_post, the fit's default layers) of the matching and the other answer, read three ways:
the bare letter at response-mean and at answer-token, and the answer spelled out ("(B) I'd be willing…") at
response-mean. Per behaviour and reading:

- `heldout_sign_agreement`: the fraction of test-split items whose matching-minus-other difference has a positive
  dot product with the train-split items' mean difference (0.5 = the reading carries no consistent direction);
- `mean_over_rms`: ‖mean difference‖ / rms ‖difference‖ over the train-split items (how consistent it is);
- `direction_cosines_middle_layer`: the cosines between the behaviours' mean differences at the middle layer.

    nice -n 5 python experiments/users_caa_features.py [--model M] [--cache runs/diag/M.pt]
    → experiments/results/users_caa_features_<model>.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from steerable.capture.positions import select
from steerable.capture.run import StopForward, reading_hooks
from steerable.data.preferences import BEHAVIOURS, answer_letter
from steerable.data.users_caa import item_pools
from steerable.fsutil import write_text_atomic
from steerable.models.batch import position_ids
from steerable.models.load import load_model
from steerable.recipes.users_fit import default_layers

RESULTS = Path(__file__).parent / "results"


@torch.inference_mode()
def capture(handle, texts: list[tuple[str, str]], layers: list[int], batch_size: int = 16):
    """[L, N, d] response-mean and answer-token activations of (prompt, response) texts, one forward each."""
    rm = torch.empty(len(layers), len(texts), handle.hidden_size)
    at = torch.empty_like(rm)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i][0]) + len(texts[i][1]))
    sink: dict[int, torch.Tensor] = {}
    with reading_hooks(handle, layers, "resid_post", sink):
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            pre = [handle.render(texts[i][0]) for i in idx]
            enc = handle.encode([p + texts[i][1] for p, i in zip(pre, idx, strict=True)])
            n_resp = (enc["attention_mask"].sum(1) - handle.encode(pre)["attention_mask"].sum(1)).cpu()
            with contextlib.suppress(StopForward):
                handle.model(**enc, position_ids=position_ids(enc["attention_mask"]), use_cache=False)
            mask = enc["attention_mask"].cpu()
            for j, layer in enumerate(layers):
                h = sink.pop(layer).float().cpu()
                rm[j, idx] = select(h, mask, n_resp, "response-mean")[0]
                at[j, idx] = select(h, mask, n_resp, "answer-token")[0]
    return rm, at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cache", help="a .pt file of the captures (written if absent, read if present)")
    ap.add_argument("--out")
    args = ap.parse_args()
    pools = item_pools()
    items = [(b, s, p) for b in BEHAVIOURS for s in ("train", "test") for p in pools[b][s]]
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        data = torch.load(cache)  # our own file of plain tensors (weights_only load)
    else:
        handle = load_model(args.model)
        layers = default_layers(handle.n_layers)
        letters = [(p.prompt, str(answer_letter(t))) for _, _, p in items for t in (p.positive, p.negative)]
        spelled = [(p.prompt, t) for _, _, p in items for t in (p.positive, p.negative)]
        t0 = time.time()
        rm, at = capture(handle, letters, layers)
        full, _ = capture(handle, spelled, layers)
        data = {"layers": layers, "letter_rm": rm.half(), "letter_at": at.half(), "full_rm": full.half(),
                "capture_s": round(time.time() - t0, 1)}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, cache)
    index = {b: {s: torch.tensor([i for i, (bb, ss, _) in enumerate(items) if bb == b and ss == s])
                 for s in ("train", "test")} for b in BEHAVIOURS}
    out = {"model": args.model, "layers": data["layers"], "readings": {}, "method": __doc__}
    for name, label in (("letter_rm", "letter, response-mean"), ("letter_at", "letter, answer-token"),
                        ("full_rm", "spelled out, response-mean")):
        h = data[name].double()
        diff = h[:, 0::2] - h[:, 1::2]  # matching − other per item [L, items, d]
        per = {}
        means = []
        for b in BEHAVIOURS:
            tr, te = index[b]["train"], index[b]["test"]
            mean = diff[:, tr].mean(1)
            agree = ((diff[:, te] * mean[:, None]).sum(-1) > 0).double().mean()
            rms = diff[:, tr].pow(2).sum(-1).mean(1).sqrt()
            per[b] = {"heldout_sign_agreement": round(float(agree), 3),
                      "mean_over_rms": round(float((mean.norm(dim=-1) / rms).mean()), 3)}
            means.append(mean[len(data["layers"]) // 2])
        m = torch.stack(means)
        m = m / m.norm(dim=-1, keepdim=True)
        out["readings"][label] = {"by_behaviour": per,
                                  "direction_cosines_middle_layer": [[round(float(x), 2) for x in r] for r in m @ m.T]}
        print(label, {b: v["heldout_sign_agreement"] for b, v in per.items()}, flush=True)
    path = args.out or str(RESULTS / f"users_caa_features_{args.model}.json")
    write_text_atomic(path, json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
