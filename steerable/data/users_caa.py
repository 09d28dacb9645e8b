"""`users-caa`: synthetic per-user preference pairs over the bundled CAA behaviour sets (docs/users_caa.md).

SYNTHETIC. No person made these choices: each user's ideal point θ_u over BEHAVIOURS is drawn from a
documented mixture (a majority profile, three minority profiles, and "contrarian" users opposite to the
majority on three axes), and every pair is labelled by a Bradley–Terry draw from that ideal point.

Response feature model (methods.md §7's ideal-point BT in behaviour space): on an item of behaviour k the
answer the CAA set marks as matching sits at φ = +e_k and the other answer at φ = −e_k, so
    P_u(matching ≻ other) = σ(‖φ(b) − θ_u‖² − ‖φ(a) − θ_u‖²) = σ(4·θ_uk).
With |θ_uk| around 0.3–0.7 a user picks the answer its ideal point favours 77–94 % of the time.

Every draw is a seeded hash of names (the user, the behaviour, the item's text), never a global RNG, so
the rows are the same on every machine and every run. Items: a fixed pool per behaviour drawn from the
CAA set's own train split (train pairs) and test split (test pairs), so no item a basis is built from
appears in a test pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from statistics import NormalDist

from steerable.data.loaders import Pair, _split_caa, split_of
from steerable.data.preferences import BEHAVIOURS, PreferenceRow
from steerable.data.sources import data_file
from steerable.errors import DataError

SEED = "steerable-users-caa-v1"
N_USERS = 200
TRAIN_PAIRS = (3, 5, 10, 20, 30)  # user i has TRAIN_PAIRS[i % 5] training pairs ...
TEST_PAIRS = (2, 2, 4, 6, 10)  # ... and TEST_PAIRS[i % 5] held-out pairs: 5, 7, 14, 26 or 40 pairs in all
POOL_TRAIN = 60  # CAA train-split items per behaviour that train pairs are drawn from
POOL_TEST = 30  # CAA test-split items per behaviour that test pairs are drawn from
LABEL_SCALE = 4.0  # P(matching ≻ other) = σ(LABEL_SCALE · θ_k): features at ±e_k
INDIVIDUAL_SD = 0.2  # each user's deviation from its profile, per axis
N_FLIPPED = 3  # axes on which a contrarian user takes the opposite of the majority

_B = {b: i for i, b in enumerate(BEHAVIOURS)}


def _profile(**over: float) -> tuple[float, ...]:
    """The majority profile with some axes replaced (keyword = behaviour name with "_" for "-")."""
    keys = [b.replace("-", "_") for b in BEHAVIOURS]
    assert set(over) <= set(keys), set(over) - set(keys)
    return tuple(over.get(k, _MAJORITY[i]) for i, k in enumerate(keys))


# The majority: a careful assistant (no flattery, accepts oversight and shutdown, patient, declines
# personal/unsafe asks, no invented facts, no collusion with other AIs). Order as BEHAVIOURS.
_MAJORITY = (-0.4, 0.3, 0.4, -0.3, 0.5, -0.7, -0.6)
# name -> (mixture weight, profile mean); "contrarian" users start from the majority and flip N_FLIPPED axes.
PROFILES: dict[str, tuple[float, tuple[float, ...]]] = {
    "majority": (0.55, _MAJORITY),
    "agreeable": (0.12, _profile(sycophancy=0.6, refusal=-0.3)),  # likes being agreed with, dislikes refusals
    "autonomy": (0.12, _profile(survival_instinct=-0.5, corrigible_neutral_HHH=-0.5,
                                coordinate_other_ais=0.3)),  # wants an AI with a will of its own
    "impatient": (0.11, _profile(myopic_reward=0.6, refusal=-0.5, hallucination=-0.2)),  # now, and no refusals
    "contrarian": (0.10, _MAJORITY),
}


def _unit(*parts: str) -> float:
    """A uniform number in (0, 1) from a seeded hash of `parts`: the same on every platform and run."""
    digest = hashlib.sha256("\x1f".join((SEED, *parts)).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + 0.5) / 2.0 ** 64


def _normal(*parts: str) -> float:
    return NormalDist().inv_cdf(_unit(*parts))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def label_probability(theta_k: float) -> float:
    """P(the matching answer is chosen) for a user with coordinate θ_k on the item's behaviour."""
    return _sigmoid(LABEL_SCALE * theta_k)


def user_names() -> list[str]:
    return [f"u{i:03d}" for i in range(N_USERS)]


def is_seen(index: int) -> bool:
    """Users u(5g)..u(5g+4) form group g; every fifth group (g % 5 == 4) is unseen: 40 of 200 users, 8 at
    each pair count (user i's count is set by i % 5, so each group holds one user of every count)."""
    return (index // 5) % 5 != 4


@dataclass(frozen=True)
class SyntheticUser:
    name: str
    profile: str
    theta: tuple[float, ...]  # over BEHAVIOURS
    seen: bool
    n_train: int
    n_test: int


def _draw_user(index: int) -> SyntheticUser:
    name = f"u{index:03d}"
    u, acc, profile = _unit(name, "profile"), 0.0, "majority"
    for p, (w, _) in PROFILES.items():
        acc += w
        if u < acc:
            profile = p
            break
    mean = list(PROFILES[profile][1])
    if profile == "contrarian":
        flipped = sorted(BEHAVIOURS, key=lambda b: _unit(name, "flip", b))[:N_FLIPPED]
        for b in flipped:
            mean[_B[b]] = -mean[_B[b]]
    theta = tuple(round(m + INDIVIDUAL_SD * _normal(name, "theta", b), 6) for m, b in zip(mean, BEHAVIOURS,
                                                                                           strict=True))
    return SyntheticUser(name, profile, theta, is_seen(index), TRAIN_PAIRS[index % len(TRAIN_PAIRS)],
                         TEST_PAIRS[index % len(TEST_PAIRS)])


def synthetic_users() -> list[SyntheticUser]:
    return [_draw_user(i) for i in range(N_USERS)]


def true_ideal_points() -> dict[str, list[float]]:
    """user -> the ideal point the labels were drawn from, over BEHAVIOURS."""
    return {u.name: list(u.theta) for u in synthetic_users()}


def user_profiles() -> dict[str, str]:
    """user -> the mixture component its ideal point was drawn from."""
    return {u.name: u.profile for u in synthetic_users()}


_OPTION = r"\(\s*{}\s*\)\s*(.*?)(?=\n\s*\(\s*[A-Za-z]\s*\)|\Z)"


def spelled_out(prompt: str, letter: str) -> str:
    """A CAA answer letter with its option's text ("(B)" → "(B) I'd be willing to change them."), read from the
    prompt's choices; the bare letter if the prompt does not spell that option out.

    Why: a bare letter's activation says little about what was chosen (on smollm2-135m, a held-out item's
    matching-minus-other letter activation points along its behaviour's mean direction about half the time),
    while the spelled-out answer carries its content (0.67–1.0 of held-out items, by behaviour); and a person's
    preference pair compares two responses, not two letters."""
    m = re.fullmatch(r"\(\s*([A-Za-z])\s*\)", letter.strip())
    if m is None:
        return letter
    choices = prompt.split("Choices:")[-1]
    option = re.search(_OPTION.format(re.escape(m.group(1))), choices, re.S)
    text = option.group(1).strip() if option else ""
    return f"{letter.strip()} {text}" if text else letter


def item_pools() -> dict[str, dict[str, list[Pair]]]:
    """behaviour -> {"train": items, "test": items}: POOL_TRAIN / POOL_TEST CAA items (distinct prompts)
    from the set's fixed train / test split (data/loaders.py split_of), in a seeded hash order."""
    pools: dict[str, dict[str, list[Pair]]] = {}
    for b in BEHAVIOURS:
        raw = json.loads(data_file(f"caa-{b}").read_text(encoding="utf-8"))
        # hash the raw texts first, so only the few items that fill the pools are split into prompt/answers
        ranked = sorted(raw, key=lambda r: hashlib.sha256(f"{SEED}:pool:{r['positive']}".encode()).digest())
        want = {"train": POOL_TRAIN, "test": POOL_TEST}
        out: dict[str, list[Pair]] = {"train": [], "test": []}
        prompts: set[str] = set()
        for r in ranked:
            p = _split_caa(r["positive"], r["negative"])
            s = split_of(p.prompt)  # the split load_pairs("caa-…") gives this item
            if p.prompt in prompts or len(out[s]) >= want[s]:
                continue
            prompts.add(p.prompt)
            out[s].append(Pair(p.prompt, spelled_out(p.prompt, p.positive), spelled_out(p.prompt, p.negative)))
            if all(len(out[k]) >= want[k] for k in want):
                break
        if any(len(out[k]) < want[k] for k in want):
            raise DataError(f"caa-{b}: too few items for users-caa's pools ({len(out['train'])} train, "
                            f"{len(out['test'])} test)")
        pools[b] = out
    return pools


def _user_rows(user: SyntheticUser, pools: dict[str, dict[str, list[Pair]]]) -> list[PreferenceRow]:
    rows: list[PreferenceRow] = []
    for split, n in (("train", user.n_train), ("test", user.n_test)):
        # behaviours in a per-user order, cycled, so a user's pairs spread evenly over the axes
        order = sorted(BEHAVIOURS, key=lambda b: _unit(user.name, split, "order", b))
        counts = {b: 0 for b in BEHAVIOURS}
        ranked: dict[str, list[Pair]] = {}
        for j in range(n):
            b = order[j % len(order)]
            if b not in ranked:  # this user's own order over the pool: items never repeat within a user
                ranked[b] = sorted(pools[b][split], key=lambda p: _unit(user.name, split, "item", b, p.prompt))
            item = ranked[b][counts[b]]
            counts[b] += 1
            p_match = label_probability(user.theta[_B[b]])
            matching_wins = _unit(user.name, split, "label", b, item.prompt) < p_match
            chosen, rejected = (item.positive, item.negative) if matching_wins else (item.negative, item.positive)
            rows.append(PreferenceRow(user.name, item.prompt, chosen, rejected, category=b, split=split,
                                      seen=user.seen, answer_token=True))
    return rows


def users_caa(split: str = "all") -> list[PreferenceRow]:
    """Every synthetic user's pairs (users in order, each user's train pairs then test pairs); `split`
    "train" / "test" keeps that split's pairs of every user, seen and unseen."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} in users-caa: use train, test or all")
    pools = item_pools()
    rows = [r for u in synthetic_users() for r in _user_rows(u, pools)]
    return rows if split == "all" else [r for r in rows if r.split == split]


__all__ = [
    "BEHAVIOURS", "LABEL_SCALE", "N_USERS", "PROFILES", "SyntheticUser", "item_pools", "label_probability",
    "synthetic_users", "true_ideal_points", "user_names", "user_profiles", "users_caa",
]
