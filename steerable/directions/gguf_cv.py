"""llama.cpp control vectors (GGUF): export a direction set for deployment there, and import one.

llama.cpp's format is add-only: tensors `direction.N` (float32 [d]) are *added* to the output of
decoder block N (0-based; N ≥ 1 — llama.cpp never steers block 0), scaled by `--control-vector-scaled`.
So `direction.N` corresponds to our site resid_post at layer N.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from steerable.directions.artifact import DirectionSet
from steerable.errors import ArtifactError, SteerableError
from steerable.fsutil import atomic_path

_ARCH_HINT = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def export_control_vector(
    ds: DirectionSet, path: str | Path, *, strength: float = 1.0, layers: Sequence[int] | None = None
) -> Path:
    """Write `strength · scale_ℓ · v̂_ℓ` per layer (the `add` intervention) as a llama.cpp control vector."""
    import gguf

    if ds.meta.get("site", "resid_post") != "resid_post":
        raise SteerableError(f"llama.cpp adds control vectors at resid_post; this set is at {ds.meta.get('site')}")
    chosen = list(ds.layers if layers is None else layers)
    if 0 in chosen:
        if layers is not None:
            raise SteerableError("llama.cpp cannot steer layer 0 (its control vectors start at block 1)")
        chosen.remove(0)
    if not chosen:
        raise SteerableError("no exportable layers (llama.cpp control vectors cover blocks ≥ 1)")
    model = ds.meta.get("model", {})
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", _ARCH_HINT.get(model.get("family", ""), model.get("family", "")))
        writer.add_uint32("controlvector.layer_count", len(chosen))
        for layer in chosen:
            r = ds.row(layer)
            vec = (strength * ds.scales[r] * ds.directions[r]).float().numpy().astype(np.float32)
            writer.add_tensor(f"direction.{layer}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def import_control_vector(path: str | Path, *, model_meta: dict | None = None) -> DirectionSet:
    """Read a llama.cpp control vector as a direction set (unit directions; `scales` = vector norms)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable GGUF file ({e})") from e
    rows: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if m is None:
            continue
        vec = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
        if not bool(torch.isfinite(vec).all()):
            raise ArtifactError(f"{path}: tensor {t.name} contains NaN or Inf")
        rows[int(m.group(1))] = vec
    if not rows:
        raise ArtifactError(f"{path}: no direction.N tensors (not a llama.cpp control vector)")
    layers = sorted(rows)
    vecs = torch.stack([rows[x] for x in layers])
    norms = vecs.norm(dim=1)
    keep = norms > 0
    layers = [x for x, k in zip(layers, keep.tolist(), strict=True) if k]
    vecs, norms = vecs[keep], norms[keep]
    n, d = vecs.shape
    nan = torch.full((n,), float("nan"))
    return DirectionSet(
        layers=layers, directions=vecs / norms[:, None], raw_norms=norms, scales=norms.clone(), bias=nan,
        mean_pos=vecs.clone(), mean_neg=torch.zeros(n, d), percentiles=torch.full((n, 2, 101), float("nan")),
        auroc=nan.clone(), cohens_d=nan.clone(),
        meta={"estimator": "llama.cpp-control-vector", "site": "resid_post", "source": str(path),
              "model": model_meta or {"hidden_size": d}},
    )
