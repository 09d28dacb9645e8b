"""Which of pyrit 1.1.0's local seed datasets the harmful prompt sets read (data/pyrit_sets.py), with their
sha256. Plain data, so the file registry (data/sources.py) can list them without importing the loaders."""

from __future__ import annotations

_LOCAL = "pyrit/datasets/seed_datasets/local/"

# member stem (under _LOCAL, without .prompt) -> sha256
_STEMS = {
    "airt/airt_imminent_crisis": "34cb127d75c8cc4ca33edbe1f825c09b72f21957a44de758e508504288044a8b",
    "airt/fairness": "5083b837a22f54f0b40cf2a8773ae5f5a04c750662cd4de2382e3938243b9534",
    "airt/harassment": "bcc66d9a05f46f0c9a94347cd66a7d1f6586559dcb3c183c36d2b055a7dac02b",
    "airt/harms": "00e797c99f2a409d8c4b91fd0a21ac46a61a2553f6eb88c8b0a50208208c545b",
    "airt/hate": "8cba08b77b83579dfe39b34a3b89cd0c2d20ff091ffc9f04f0739678a752698c",
    "airt/illegal": "0e149e56354cc3b459a377fa714c7f1df6a938198e560818e579895edb9c4526",
    "airt/leakage": "9f9483be8c5de3f939d7e63080d60ca1926db8edf3be7fb3c624f0b3a34e4207",
    "airt/malware": "074a128ce56cd34d44ffa281a94a4ea73a79f5cbd43f044b5185dbed069fd960",
    "airt/misinformation": "35ba01a8870bcaaeda213d390c661e1f6541e8c267d7ef0e5df8f92d0a366dd8",
    "airt/scams": "d251e2f63e0ed92769459280835bae7dbc7b7851626ea9f3800c703a15fb6b66",
    "airt/sexual": "6ed23191e6e8b4c710aa2fb49e3cc49b2bd1a218a1ae499b4fb90e1ee32772ac",
    "airt/violence": "032cdd0be469beb0e2ecfb5b37f7411addcc47c36efcfcbd6864ae768c7746d1",
    "garak/doctor": "2ba2a5ff881c578147e6a9b21171f0d2e6ace4f7fb07d24ee318475073b7bf33",
    "garak/system_prompt_extraction": "2c7ff6342c6c1b91a2aed114c4491b065248019223087de35708cf5adc5f3019",
    "0din/chemical_compiler_debug": "b3c2707f15ffd3ca003a77d97c0d3251dbeca2cdfd2f822ef3c511333d3af69a",
    "0din/correction": "8204cbe7a0aedec537b5d1d2347434232246a10220022ba80c697c8ee9d5c5b8",
    "0din/hex_recipe_book": "be6303b8998fa195d0d61b548c31ed5a187189d45e5baa26786dfb3ed95bbb38",
    "0din/incremental_table_completion": "574d528033eb5a569eeda6096a5ea57b6620e3cfd91594017bed3cc110aa305d",
    "0din/placeholder_injection": "d873efd039ed0bfb979d441b4be55693afc6eb348730bd4d3d4172b034c39dc8",
    "0din/technical_field_guide": "0780951336c3e218fd9d2a42935944c415b33219e0c5eddf27f3cadc1d6e05f9",
    "psfuzz_steal_system": "8a06dfb8e8c85a5bfed29ff549f6279ea91d73130c1b9296254ce6b62a0c3758",
}


def _name(stem: str) -> str:
    """`airt/hate` -> `pyrit-airt-hate`."""
    return "pyrit-" + stem.replace("airt/airt_", "airt/").replace("/", "-").replace("_", "-")


# data-file name -> (wheel member, sha256)
PYRIT_SEED_FILES: dict[str, tuple[str, str]] = {_name(s): (f"{_LOCAL}{s}.prompt", sha) for s, sha in _STEMS.items()}
