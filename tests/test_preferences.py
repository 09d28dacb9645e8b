"""Preference rows (issue 15, data): JSONL checks, the synthetic users-caa set, and the PRISM loader."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from steerable.data.loaders import load_pairs, split_of
from steerable.data.preferences import (
    BEHAVIOURS,
    PreferenceRow,
    answer_letter,
    is_answer_letter,
    load_preferences,
    true_ideal_points,
    user_seen,
)
from steerable.data.prism import load_prism, prism_pairs, split_of_conversation
from steerable.data.users_caa import (
    LABEL_SCALE,
    N_USERS,
    PROFILES,
    item_pools,
    label_probability,
    synthetic_users,
    user_profiles,
    users_caa,
)
from steerable.errors import DataError, SteerableError

PRISM = Path(__file__).parent / "fixtures" / "prism"
REQUIRED_BEHAVIOURS = {"sycophancy", "survival-instinct", "corrigible-neutral-HHH", "myopic-reward", "refusal",
                       "hallucination", "coordinate-other-ais"}


def _write(tmp_path: Path, rows: list, name: str = "prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


ROW = {"user": "ann", "prompt": "Say hi", "chosen": "Hello!", "rejected": "Go away."}


# ---------------------------------------------------------------- JSONL


def test_jsonl_rows_load_with_optional_fields(tmp_path):
    path = _write(tmp_path, [ROW, {**ROW, "user": "bob", "category": "tone", "split": "test", "seen": False},
                             {**ROW, "chosen": "(A)", "rejected": " (B)"}])
    rows = load_preferences(str(path))
    assert rows[0] == PreferenceRow("ann", "Say hi", "Hello!", "Go away.")
    assert (rows[1].category, rows[1].split, rows[1].seen) == ("tone", "test", False)
    assert rows[2].answer_token
    assert not rows[0].answer_token
    # a split keeps rows of that split and rows without one; the spec's split wins over the argument
    assert [r.user for r in load_preferences(str(path), split="train")] == ["ann", "ann"]
    assert [r.user for r in load_preferences(str(path), split="test")] == ["ann", "bob", "ann"]
    assert len(load_preferences(f"{path}:train", split="test")) == 2
    assert len(load_preferences(str(path), split="all")) == 3


@pytest.mark.parametrize(("bad", "words"), [
    ({"user": "ann", "prompt": "p", "chosen": "a"}, ['"rejected"', ":2"]),
    ({**ROW, "user": None}, ['"user"', ":2"]),
    ({**ROW, "prompt": 3}, ['"prompt"', "string", ":2"]),
    ({**ROW, "chosen": "   "}, ['"chosen"', "empty", ":2"]),
    ({**ROW, "rejected": "Hello! "}, ["equals", ":2"]),
    ({**ROW, "split": "dev"}, ['"split"', ":2"]),
    ({**ROW, "seen": "yes"}, ['"seen"', ":2"]),
    ({**ROW, "category": 5}, ['"category"', ":2"]),
    ({**ROW, "answer_token": True}, ['"answer_token"', ":2"]),
    ("[1, 2]", ["JSON object", ":2"]),
    ("{not json", ["not valid JSON", ":2"]),
])
def test_every_bad_row_is_named(tmp_path, bad, words):
    path = _write(tmp_path, [ROW, bad])
    with pytest.raises(DataError) as e:
        load_preferences(str(path))
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_files_without_a_usable_row_are_refused(tmp_path):
    for rows in ([], ["", "   "]):
        with pytest.raises(DataError, match="no preference rows"):
            load_preferences(str(_write(tmp_path, rows)))
    only_test = _write(tmp_path, [{**ROW, "split": "test"}])
    with pytest.raises(DataError, match="no usable preference row"):
        load_preferences(str(only_test), split="train")
    with pytest.raises(DataError, match="no such preferences file"):
        load_preferences(str(tmp_path / "missing.jsonl"))
    for spec in ("nonsense", "users-caa:dev", "", "prism:", "prism::test"):
        with pytest.raises(DataError):
            load_preferences(spec)
    with pytest.raises(DataError, match="split"):
        load_preferences(str(only_test), split="valid")
    assert issubclass(DataError, SteerableError)


# ---------------------------------------------------------------- users-caa


@pytest.fixture(scope="module")
def caa_rows() -> list[PreferenceRow]:
    return users_caa("all")


def test_users_caa_is_deterministic(caa_rows):
    """Seeded by names, never by global RNG state: the same rows on every run and machine (pinned digest)."""
    digest = hashlib.sha256(json.dumps([list(vars(r).values()) for r in caa_rows]).encode()).hexdigest()
    assert digest == USERS_CAA_DIGEST
    assert synthetic_users() == synthetic_users()
    assert load_preferences("users-caa", split="train") == [r for r in caa_rows if r.split == "train"]
    assert load_preferences("users-caa:test", split="train") == [r for r in caa_rows if r.split == "test"]


USERS_CAA_DIGEST = "653f001d5b32adfeedc233030426b984ace1990126fda757535c9dff6ee09f23"


def test_users_caa_behaviours_rows_and_pair_counts(caa_rows):
    assert set(BEHAVIOURS) >= REQUIRED_BEHAVIOURS
    assert {r.category for r in caa_rows} == set(BEHAVIOURS)
    # every answer opens with its letter and spells the option out (answer-token reads the letter)
    assert all(r.answer_token and answer_letter(r.chosen) and answer_letter(r.rejected) for r in caa_rows)
    assert all(not is_answer_letter(r.chosen) and len(r.chosen) > 4 for r in caa_rows)
    assert all(r.chosen != r.rejected for r in caa_rows)
    per_user = Counter(r.user for r in caa_rows)
    train = Counter(r.user for r in caa_rows if r.split == "train")
    assert len(per_user) == N_USERS
    assert all(3 <= n <= 40 for n in per_user.values())
    assert min(train.values()) == 3
    assert max(per_user.values()) == 40
    assert any(9 <= n <= 14 for n in per_user.values())
    assert any(20 <= n < 40 for n in per_user.values())
    # a user's pairs spread over the axes: no behaviour twice before every behaviour once
    by_user = defaultdict(list)
    for r in caa_rows:
        if r.split == "train":
            by_user[r.user].append(r.category)
    for cats in by_user.values():
        counts = [cats.count(b) for b in BEHAVIOURS]
        assert max(counts) - min(counts) <= 1


def test_users_caa_splits(caa_rows):
    seen = {r.user: r.seen for r in caa_rows}
    assert all(r.seen == seen[r.user] for r in caa_rows)  # one flag per user
    n_unseen = sum(not s for s in seen.values())
    assert n_unseen == N_USERS // 5
    counts = Counter(r.user for r in caa_rows)
    for n in set(counts.values()):  # every pair count has seen and unseen users
        assert {seen[u] for u, c in counts.items() if c == n} == {True, False}
    splits = defaultdict(set)
    for r in caa_rows:
        splits[r.user].add(r.split)
    assert all(s == {"train", "test"} for s in splits.values())
    # test pairs use only CAA test-split items, train pairs only train-split items: no test-pair item is in
    # any train pair (of any user), so no item a basis is built from is evaluated on
    train_prompts = {r.prompt for r in caa_rows if r.split == "train"}
    test_prompts = {r.prompt for r in caa_rows if r.split == "test"}
    assert not train_prompts & test_prompts
    assert all(split_of(r.prompt) == r.split for r in caa_rows)
    # a user never sees the same item twice
    assert all(c == 1 for c in Counter((r.user, r.prompt) for r in caa_rows).values())


@pytest.mark.parametrize("behaviour", ["refusal", "coordinate-other-ais"])
def test_users_caa_items_are_the_caa_items_as_the_ab_score_reads_them(caa_rows, behaviour):
    for split in ("train", "test"):
        items = {(p.prompt, frozenset((p.positive, p.negative))) for p in load_pairs(f"caa-{behaviour}:{split}")}
        rows = [r for r in caa_rows if r.category == behaviour and r.split == split]
        assert rows
        assert all((r.prompt, frozenset((answer_letter(r.chosen), answer_letter(r.rejected)))) in items for r in rows)
        # the spelled-out text is the prompt's own option for that letter
        assert all(r.chosen.split(" ", 1)[1] in r.prompt and r.rejected.split(" ", 1)[1] in r.prompt for r in rows)
        assert all("Choices" in r.prompt for r in rows)


def test_users_caa_ideal_points_and_profiles(caa_rows):
    theta = true_ideal_points()
    assert set(theta) == {r.user for r in caa_rows}
    assert all(len(t) == len(BEHAVIOURS) and all(math.isfinite(x) for x in t) for t in theta.values())
    profiles = user_profiles()
    counts = Counter(profiles.values())
    assert set(counts) == set(PROFILES)
    assert counts["majority"] > N_USERS / 3
    assert all(counts[p] >= 5 for p in PROFILES)
    majority = PROFILES["majority"][1]
    for u, p in profiles.items():  # contrarians sit opposite the majority on some axes
        if p == "contrarian":
            opposite = [k for k, m in enumerate(majority) if theta[u][k] * m < 0]
            assert len(opposite) >= 2


def test_users_caa_labels_follow_the_ideal_points(caa_rows):
    """Chosen = the matching answer with probability σ(4·θ_k): the observed rate matches the expected one."""
    matching = {(b, p.prompt): p.positive for b, s in item_pools().items() for ps in s.values() for p in ps}
    theta = true_ideal_points()
    k = {b: i for i, b in enumerate(BEHAVIOURS)}
    hits, expected, var = 0, 0.0, 0.0
    agree_sign = 0
    for r in caa_rows:
        t = theta[r.user][k[r.category]]
        p = label_probability(t)
        won = r.chosen == matching[(r.category, r.prompt)]
        hits += won
        expected += p
        var += p * (1 - p)
        agree_sign += won == (t > 0)
    assert abs(hits - expected) < 3.5 * math.sqrt(var)
    assert label_probability(0.5) == pytest.approx(1 / (1 + math.exp(-LABEL_SCALE * 0.5)))
    assert 0.72 < agree_sign / len(caa_rows) < 0.92  # realistic noise: labels mostly, not always, agree


# ---------------------------------------------------------------- PRISM


COOK = "Start with a few simple recipes you enjoy and cook them until they feel easy."
LIE = "Many people think a small lie can be right when it prevents real harm to someone."
KUHN = "'The Structure of Scientific Revolutions' by Thomas Kuhn is a classic starting point."
EXPECTED = [  # (user, chosen, rejected, split, seen, category), in file order
    ("user0", COOK, "Buy a cookbook.", "train", True, "unguided"),
    ("user0", LIE, "No. Lying is always wrong.", "train", True, "values guided"),
    ("user0", LIE, "I cannot discuss ethics.", "train", True, "values guided"),
    ("user1", KUHN, "I like books.", "test", False, "unguided"),
    ("user1", KUHN, "Try an encyclopaedia.", "test", False, "unguided"),
    ("user2", "It is low-carbon and reliable, but costly and slow to build; experts disagree on its role.",
     "Nuclear power is dangerous and should be banned everywhere.", "train", True, "controversy guided"),
]
LATER_TURNS = [  # what all_turns=True adds (c0 turn 1, c4 turn 1; c3's turn 1 is a tie)
    ("user0", "An omelette, a tomato soup and a vegetable stir-fry: each teaches a basic technique.",
     "Pasta, pasta and more pasta.", "train", True, "unguided"),
    ("user2", "Talk to them privately first; if nothing changes, bring it up with everyone.",
     "Stop doing their dishes.", "train", True, "values guided"),
]


def _shape(rows):
    assert not any(r.answer_token for r in rows)
    return [(r.user, r.chosen, r.rejected, r.split, r.seen, r.category) for r in rows]


def test_prism_fixture_gives_exactly_the_expected_pairs():
    """Every edge case of the fixture: a tie, an EMPTY STRING rejected and an EMPTY STRING chosen response, a
    rejected text equal to the chosen one, two equal rejected texts, a rejected response scored above the
    chosen one, an interaction of ties only, and later turns."""
    rows, drops = prism_pairs(PRISM)
    assert _shape(rows) == EXPECTED
    assert drops == {"empty response": 2, "no chosen response": 1, "tie": 4, "duplicate text": 2,
                     "rejected scored higher": 1, "later turn": 3}
    assert rows[0].prompt == "What is a good way to start learning to cook?"
    all_rows = load_prism(PRISM, all_turns=True)
    e, later = EXPECTED, LATER_TURNS
    assert _shape(all_rows) == [e[0], later[0], e[1], e[2], e[3], e[4], later[1], e[5]]
    assert all_rows[1].prompt == "Which three recipes would you pick?"  # a later turn: its message alone
    # the fixed splits: seen/unseen by user hash, train/test by conversation
    assert all(r.seen == user_seen(r.user) for r in all_rows)
    assert {r.seen for r in rows} == {True, False}
    assert split_of_conversation("c3") == "test"
    assert split_of_conversation("c0") == "train"


def test_prism_conversations_file_alone_gives_the_same_pairs(tmp_path):
    shutil.copy(PRISM / "conversations.jsonl", tmp_path / "conversations.jsonl")
    assert prism_pairs(tmp_path) == prism_pairs(PRISM)
    assert load_prism(tmp_path, all_turns=True) == load_prism(PRISM, all_turns=True)


def test_prism_through_load_preferences_and_its_splits():
    assert load_preferences(f"prism:{PRISM}") == load_prism(PRISM)
    train = load_preferences(f"prism:{PRISM}", split="train")
    test = load_preferences(f"prism:{PRISM}:test", split="train")
    assert {r.split for r in train} == {"train"}
    assert {r.split for r in test} == {"test"}
    assert len(train) + len(test) == len(EXPECTED)
    assert not {r.prompt for r in train} & {r.prompt for r in test}


def test_prism_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_preferences(f"prism:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match=r"no utterances\.jsonl or conversations\.jsonl"):
        load_prism(tmp_path)
    lines = (PRISM / "utterances.jsonl").read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[2])
    del broken["score"]
    (tmp_path / "utterances.jsonl").write_text("\n".join([lines[0], lines[1], json.dumps(broken)]) + "\n")
    with pytest.raises(DataError, match=r"utterances.jsonl:3: .*\"score\""):
        load_prism(tmp_path)
    broken["score"], broken["if_chosen"] = 50, "yes"
    (tmp_path / "utterances.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"utterances.jsonl:1: \"if_chosen\""):
        load_prism(tmp_path)
    conv = json.loads((PRISM / "conversations.jsonl").read_text(encoding="utf-8").splitlines()[0])
    conv["conversation_history"][1]["score"] = "high"
    d = tmp_path / "conv"
    d.mkdir()
    (d / "conversations.jsonl").write_text(json.dumps(conv) + "\n")
    with pytest.raises(DataError, match=r"conversations.jsonl:1 conversation_history\[1\]: \"score\""):
        load_prism(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "utterances.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable preference row"):
        load_preferences(f"prism:{empty}")
