"""The steering-direction artifact: safetensors tensors + JSON metadata, checked against a model.

One file holds one direction set: a unit direction per calibrated layer, with everything needed to
scale, threshold and audit it. Never pickled; written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steerable.capture.positions import POSITIONS
from steerable.capture.sites import SITES
from steerable.errors import ArtifactError, ModelMismatchError, PlanError, SteerableError
from steerable.fsutil import atomic_path, check_regular

FORMAT = "steerable.directions"
MAX_LAYER = (1 << 20) - 1  # no model has more decoder blocks; larger "layer" numbers in a file are refused
FORMAT_VERSION = 2  # 2 added the optional tensors; version 1 files still load (they are None)
# Tensor name -> (shape given n layers and d) used to validate files we did not write.
_TENSORS = {
    "directions": lambda n, d: (n, d),
    "raw_norms": lambda n, _d: (n,),
    "scales": lambda n, _d: (n,),
    "bias": lambda n, _d: (n,),
    "mean_pos": lambda n, d: (n, d),
    "mean_neg": lambda n, d: (n, d),
    "percentiles": lambda n, _d: (n, 2, 101),
    "auroc": lambda n, _d: (n,),
    "cohens_d": lambda n, _d: (n,),
}
# Optional tensors (None when absent): older files and imported control vectors lack them.
_OPTIONAL = {
    "mean_unit_pos": lambda n, d: (n, d),
    "mean_unit_neg": lambda n, d: (n, d),
    "cast_percentiles": lambda n, _d: (n, 2, 2, 101),
    "projection_percentiles": lambda n, _d: (n, 2, 2, 101),
}


@dataclass
class DirectionSet:
    """Per-layer unit directions and their calibration statistics.

    Row i of every tensor belongs to model layer `layers[i]` (0-based decoder block, at `site`).
    `scales[i]` = (μ_P − μ_N)·v̂: adding strength α·scales[i]·v̂ moves the negative mean α of the way
    onto the positive mean along v̂. `percentiles[i, c]` are the 0..100th percentiles of the
    projections h·v̂ of class c (0 = positive, 1 = negative).

    Optional (None when the file predates them):
    `mean_unit_pos/neg[i]` = mean of h/‖h‖ over that class's training samples, so Selective Steering's
    μ_c = mean((h/‖h‖)·b1) = mean_unit_c·b1 for any b1.
    `cast_percentiles[i, f, c]` = 0..100th percentiles of the CAST score cast_score(h, v̂) for fold f
    (0 = train, 1 = held-out) and class c; NaN where a fold had no samples of that class.
    `projection_percentiles[i, f, c]` = the same for the signed projection h·v̂ (a condition's "projection" score).
    """

    layers: list[int]
    directions: torch.Tensor
    raw_norms: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor
    mean_pos: torch.Tensor
    mean_neg: torch.Tensor
    percentiles: torch.Tensor
    auroc: torch.Tensor
    cohens_d: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    mean_unit_pos: torch.Tensor | None = None
    mean_unit_neg: torch.Tensor | None = None
    cast_percentiles: torch.Tensor | None = None
    projection_percentiles: torch.Tensor | None = None
    path: str | None = field(default=None, compare=False)  # the file it was loaded from or last saved to

    @property
    def label(self) -> str:
        """How plans and reports name this set: its file path, or a fingerprint of an in-memory set."""
        if self.path is not None:
            return self.path
        digest = hashlib.sha256(self.directions.detach().float().cpu().numpy().tobytes()).hexdigest()[:10]
        return f"<in-memory DirectionSet {digest}>"

    @contextlib.contextmanager
    def steer(self, handle: Any, method: str = "add", **keys: Any) -> Iterator[Any]:
        """`with ds.steer(handle, method="add", strength=0.8, layers="9-11"):` — steer with this set in
        memory (no file needed); keys are the method's plan keys (docs/plans.md). Yields the Session."""
        # a thin convenience: the steering stage does the work (tests/test_imports.py lists this exception)
        from steerable.steering.hooks import steer

        with steer(handle, {"vector": self, "method": method, **keys}) as session:
            yield session

    @staticmethod
    def combine(weighted: Sequence[tuple[DirectionSet, float]], *, name: str = "combined") -> DirectionSet:
        """The linear combination Σ w_i·(μP_i − μN_i) per layer shared by every set, as an add-only set.

        Only the raw vectors survive a linear combination: the result keeps them (`scales` = the combined
        vector's norm, so `add` with α = 1 adds it exactly) and drops every statistic of the classes —
        percentiles, AUROC, Cohen's d, the probe bias, CAST percentiles and mean unit activations become
        NaN / absent, so percentile caps and "auto" conditions refuse it with a clear error.
        """
        if not weighted:
            raise ArtifactError("combine needs at least one (DirectionSet, weight)")
        d = weighted[0][0].hidden_size
        if any(ds.hidden_size != d for ds, _ in weighted):
            raise ArtifactError("combine: the direction sets have different hidden sizes")
        layers = sorted(set.intersection(*(set(ds.layers) for ds, _ in weighted)))
        if not layers:
            raise ArtifactError("combine: the direction sets share no calibrated layer")
        raw = torch.stack([sum((float(w) * (ds.mean_pos[ds.row(x)] - ds.mean_neg[ds.row(x)]).double()
                                for ds, w in weighted), torch.zeros(d, dtype=torch.float64)) for x in layers])
        norms = raw.norm(dim=1)
        if bool((norms == 0).any()) or not bool(torch.isfinite(norms).all()):
            raise ArtifactError("combine: the weighted sum is zero or not finite at some layer")
        n = len(layers)
        nan = torch.full((n,), math.nan)
        meta = {k: v for k, v in weighted[0][0].meta.items() if k in ("model", "site", "position")}
        meta.update(estimator="combination", combined=[{"vector": ds.label, "weight": float(w)} for ds, w in weighted],
                    dropped=["percentiles", "auroc", "cohens_d", "bias", "cast_percentiles", "projection_percentiles",
                             "mean_unit_pos",
                             "mean_unit_neg"], name=name)
        return DirectionSet(
            layers=layers, directions=(raw / norms[:, None]).float(), raw_norms=norms.float(), scales=norms.float(),
            bias=nan, mean_pos=raw.float(), mean_neg=torch.zeros(n, d), percentiles=torch.full((n, 2, 101), math.nan),
            auroc=nan.clone(), cohens_d=nan.clone(), meta=meta)

    @property
    def hidden_size(self) -> int:
        return int(self.directions.shape[1])

    def row(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise PlanError(
                f"layer {layer} is not in this direction set (calibrated layers: {layer_ranges(self.layers)})"
            ) from None

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[self.row(layer)]

    def percentile(self, layer: int, cls: str, q: float) -> float:
        """The q-th percentile (0–100) of class `cls`'s ("pos" or "neg") calibration projections h·v̂ at a
        calibrated layer, linear between the stored integer percentiles. NaN for imported control vectors."""
        row = self.percentiles[self.row(layer), 0 if cls == "pos" else 1]
        lo = min(math.floor(q), 99)
        frac = q - lo
        return float(row[lo] * (1 - frac) + row[lo + 1] * frac)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a file holds: every required one, and the optional ones that are present."""
        names = [*_TENSORS, *(k for k in _OPTIONAL if getattr(self, k) is not None)]
        return {k: getattr(self, k).detach().float().clone().contiguous() for k in names}

    def validate(self) -> None:
        """Raise ArtifactError naming what is wrong: the layer list, a tensor's dtype, shape or values, or a
        metadata field of the wrong type (the checks every loaded file passes before anything reads it)."""
        layers = self.layers
        if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
            raise ArtifactError(f"layers must be a list of integers, got {_show(layers)}")
        if not layers:
            raise ArtifactError("the direction set has no layer")
        n = len(layers)
        if len(set(layers)) != n or any(not 0 <= layer <= MAX_LAYER for layer in layers):
            raise ArtifactError(f"bad layer list {_show(layers)} (layers must be distinct, in 0..{MAX_LAYER})")
        for name in (*_TENSORS, *_OPTIONAL):
            t = getattr(self, name)
            if t is None and name in _OPTIONAL:
                continue
            if not isinstance(t, torch.Tensor):
                raise ArtifactError(f"tensor {name!r} is missing or not a tensor ({type(t).__name__})")
            if not t.is_floating_point():
                raise ArtifactError(f"tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                    "direction files hold floating-point tensors")
        if self.directions.dim() != 2 or self.directions.shape[1] == 0:
            raise ArtifactError(f"tensor 'directions' has shape {tuple(self.directions.shape)}, expected "
                                f"({n}, d) with d ≥ 1")
        d = self.directions.shape[1]
        for name, shape in {**_TENSORS, **_OPTIONAL}.items():
            t = getattr(self, name)
            if t is None and name in _OPTIONAL:
                continue
            if tuple(t.shape) != shape(n, d):
                raise ArtifactError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape(n, d)}")
        if (self.mean_unit_pos is None) != (self.mean_unit_neg is None):
            raise ArtifactError("mean_unit_pos and mean_unit_neg must be present together")
        for name in ("directions", "raw_norms", "scales", "mean_pos", "mean_neg", "mean_unit_pos", "mean_unit_neg"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"tensor {name!r} contains NaN or Inf")
        norms = self.directions.double().norm(dim=1)
        if not bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)):
            raise ArtifactError("directions are not unit vectors")
        check_meta(self.meta, layers)

    def check_model(self, handle: Any) -> None:
        """Fail, naming the mismatch, if this set was not calibrated on a model like `handle`."""
        m = self.meta.get("model", {})
        if self.hidden_size != handle.hidden_size:
            raise ModelMismatchError(
                f"hidden size mismatch: direction set has d={self.hidden_size}, model {handle.name} has "
                f"d={handle.hidden_size}"
            )
        if m.get("n_layers") is not None and m["n_layers"] != handle.n_layers:
            raise ModelMismatchError(
                f"layer count mismatch: direction set is for {m['n_layers']} layers, model {handle.name} has "
                f"{handle.n_layers}"
            )
        if max(self.layers) >= handle.n_layers:
            raise ModelMismatchError(f"layer {max(self.layers)} out of range for model with {handle.n_layers} layers")
        if m.get("config_hash") and m["config_hash"] != handle.config_hash:
            raise ModelMismatchError(
                f"model mismatch: direction set was calibrated on {m.get('name')!r} (config hash "
                f"{m['config_hash']}), this model {handle.name!r} has config hash {handle.config_hash}"
            )


def layer_ranges(layers: list[int]) -> str:
    """Compact layer list for messages: [0, 1, 2, 5] → "0-2,5"."""
    if not layers:
        return "none"
    out, start, prev = [], layers[0], layers[0]
    for x in [*layers[1:], None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ",".join(out)


# -- metadata schema -------------------------------------------------------------------------------------
# Every metadata field some code reads, with the type it must have when present. A record (a dict here) is a
# JSON object whose listed keys follow their specs; other keys are kept unchecked (nothing reads them).

_INT64 = 2**63 - 1
_MAX_DEPTH = 64  # metadata nesting deeper than this is refused (nothing steerable writes is deeper than 4)


class _Spec(NamedTuple):
    ok: Callable[[Any], bool]
    what: str


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(lo: int, hi: int = _INT64) -> _Spec:
    return _Spec(lambda x: _is_int(x) and lo <= x <= hi, f"an integer in {lo}..{hi}")


def _optional(spec: _Spec) -> _Spec:
    return _Spec(lambda x: x is None or spec.ok(x), f"{spec.what} or null")


def _choice(options: Sequence[str]) -> _Spec:
    return _Spec(lambda x: isinstance(x, str) and x in options, "one of " + ", ".join(options))


def _list_of(spec: _Spec) -> _Spec:
    return _Spec(lambda x: isinstance(x, list) and all(spec.ok(v) for v in x), f"a list of {spec.what}")


def _object_of(spec: _Spec) -> _Spec:
    return _Spec(lambda x: isinstance(x, dict) and all(spec.ok(v) for v in x.values()),
                 f"an object of {spec.what}")


_STR = _Spec(lambda x: isinstance(x, str), "a string")
_NUMBER = _Spec(lambda x: isinstance(x, int | float) and not isinstance(x, bool), "a number")
_OBJECT = _Spec(lambda x: isinstance(x, dict), "an object")
_COMBINED = _Spec(lambda x: isinstance(x, dict) and isinstance(x.get("vector"), str) and _NUMBER.ok(x.get("weight")),
                  'an object {"vector": string, "weight": number}')

_FINITE = _Spec(lambda x: _NUMBER.ok(x) and math.isfinite(x), "a finite number")
_CONDITION_SCORES = ("cast", "projection")  # cast_calibration.SCORES (which imports this module)
# multi_source.py's leave-one-source-out choice; steering/cast.py reads these four keys
_CONDITION = _Spec(lambda x: isinstance(x, dict) and _is_int(x.get("layer")) and x["layer"] >= 0
                   and _FINITE.ok(x.get("threshold")) and x.get("compare") in (">", "<")
                   and x.get("score") in _CONDITION_SCORES,
                   'an object with "layer" (a calibrated layer), "threshold" (a finite number), "compare" (">" or '
                   '"<") and "score" (' + " or ".join(_CONDITION_SCORES) + ")")

META_SCHEMA: dict[str, Any] = {
    "format": _Spec(lambda x: x == FORMAT, repr(FORMAT)),
    "format_version": _int(1, FORMAT_VERSION),
    "model": {"name": _optional(_STR), "config_hash": _optional(_STR), "family": _optional(_STR),
              "hidden_size": _optional(_int(1)), "n_layers": _optional(_int(1))},
    "site": _choice(SITES),
    "position": _choice(POSITIONS),
    "estimator": _STR, "name": _STR, "source": _STR, "layer_convention": _STR, "created": _STR, "tool": _STR,
    "counts": _object_of(_int(0)),
    "axis": {"monitor_layer": _int(0, MAX_LAYER), "cap_layers": _STR, "estimator": _STR, "recipe": _STR},
    "skipped_layers": _object_of(_STR),
    "combined": _list_of(_COMBINED),
    "dropped": _list_of(_STR),
    "data": _OBJECT,
    "condition": _CONDITION,
}


def _show(x: Any, limit: int = 60) -> str:
    """A short repr of a file's value for messages (repr escapes control characters)."""
    text = repr(x) if not isinstance(x, list | dict) or _depth(x) <= 4 else f"<{type(x).__name__} nested deeply>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _depth(x: Any) -> int:
    """Nesting depth of a JSON value, without recursion (stops counting past _MAX_DEPTH)."""
    deepest, todo = 0, [(x, 0)]
    while todo:
        v, level = todo.pop()
        if isinstance(v, dict | list):
            level += 1
            deepest = max(deepest, level)
            if level <= _MAX_DEPTH:
                todo.extend((c, level) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _check_against(value: Any, spec: dict[str, Any] | _Spec, where: str) -> None:
    if isinstance(spec, _Spec):
        if not spec.ok(value):
            raise ArtifactError(f"metadata {where!r} must be {spec.what}, got {_show(value)}")
        return
    if not isinstance(value, dict):
        raise ArtifactError(f"metadata {where or 'root'!r} must be an object, got {_show(value)}")
    for key, sub in spec.items():
        if key in value:
            _check_against(value[key], sub, f"{where}.{key}" if where else key)


def check_meta(meta: Any, layers: Sequence[int]) -> None:
    """Raise ArtifactError unless `meta` follows META_SCHEMA (and the axis's monitor layer is calibrated)."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"metadata must be a JSON object, got {type(meta).__name__}")
    if _depth(meta) > _MAX_DEPTH:
        raise ArtifactError(f"metadata is nested more than {_MAX_DEPTH} levels deep")
    if not all(isinstance(k, str) for k in meta):
        raise ArtifactError("metadata keys must be strings")
    _check_against(meta, META_SCHEMA, "")
    for where, layer in (("axis.monitor_layer", meta.get("axis", {}).get("monitor_layer")),
                         ("condition.layer", meta.get("condition", {}).get("layer"))):
        if layer is not None and layer not in layers:
            raise ArtifactError(f"metadata {where!r} {layer} is not a calibrated layer ({layer_ranges(list(layers))})")


# -- files ----------------------------------------------------------------------------------------------


def save_directions(ds: DirectionSet, path: str | Path) -> Path:
    """Validate `ds` and write it atomically (mode 0666 less the umask, like every other output)."""
    ds.validate()
    meta = {**ds.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layers": list(ds.layers)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(ds.tensors(), str(tmp), metadata={"steerable": json.dumps(meta, allow_nan=True)})
    ds.path = str(path)
    return path


def _parse_meta(path: Path, raw: str) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: metadata is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ArtifactError(f"{path}: metadata is nested too deeply") from None
    except ValueError as e:  # e.g. an integer beyond Python's digit limit
        raise ArtifactError(f"{path}: metadata cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: unknown format {_show(meta.get('format'))}")
    version = meta.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        if _is_int(version) and version > FORMAT_VERSION:
            raise ArtifactError(f"{path}: format version {version} is newer than this steerable ({FORMAT_VERSION})")
        raise ArtifactError(f"{path}: format_version must be an integer in 1..{FORMAT_VERSION}, got {_show(version)}")
    return meta


def _read_tensors(path: Path) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The `steerable` metadata string and the tensors this format names, each as float32. Other tensors are
    never read; a tensor of a non-floating dtype is refused before it is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            raw_meta = header.get("steerable")
            if raw_meta is None:
                return None, {}
            tensors = {}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                if name not in _TENSORS and name not in _OPTIONAL:
                    continue
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise ArtifactError(f"{path}: tensor {name!r} has dtype {dtype}; direction files hold "
                                        f"floating-point tensors ({', '.join(_FLOAT_DTYPES)})")
                stored = f.get_tensor(name)
                tensors[name] = stored.to(torch.float32)
                if name == "directions" and stored.dtype.itemsize < 4:
                    tensors[name] = _renormalised(tensors[name], torch.finfo(stored.dtype).eps)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, RuntimeError, OverflowError) as e:
        if isinstance(e, SteerableError):
            raise
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    return raw_meta, tensors


def _renormalised(directions: torch.Tensor, eps: float) -> torch.Tensor:
    """Unit directions stored in a half (or narrower) float type are unit only to that type's precision: they
    are made unit again in float32 when they are within a few of its rounding steps of it (else left as they
    are, for validate to refuse)."""
    if directions.dim() != 2 or not bool(torch.isfinite(directions).all()):
        return directions
    norms = directions.double().norm(dim=1, keepdim=True)
    if not bool(((norms - 1).abs() <= max(1e-3, 4 * eps)).all()):
        return directions
    return (directions.double() / norms).float()


# safetensors dtype names of the floating types torch reads (converted once to float32 on load)
_FLOAT_DTYPES = tuple(k for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
                      if k[:2] != "F8" or hasattr(torch, "float8_e4m3fn"))


def load_directions(path: str | Path, model: Any | None = None) -> DirectionSet:
    """Load and validate an artifact; with `model` (a ModelHandle) also check it fits that model.

    Every failure is an ArtifactError naming the file (ModelMismatchError for another model's file); a FIFO
    or device is refused without being opened; float16/bfloat16/float64 tensors become float32 (directions
    stored in half precision are made unit again in float32).
    """
    path = check_regular(path, "direction file")
    raw_meta, tensors = _read_tensors(path)
    if raw_meta is None:
        raise ArtifactError(f"{path}: no steerable metadata (not a steerable direction file)")
    meta = _parse_meta(path, raw_meta)
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing}")
    layers = meta.pop("layers", None)
    if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
        raise ArtifactError(f"{path}: metadata has no valid layer list (got {_show(layers)})")
    present = [k for k in (*_TENSORS, *_OPTIONAL) if k in tensors]
    ds = DirectionSet(layers=layers, meta=meta, path=str(path), **{k: tensors[k] for k in present})
    try:
        ds.validate()
    except SteerableError as e:
        raise ArtifactError(f"{path}: {e}") from None
    if model is not None:
        try:
            ds.check_model(model)
        except ModelMismatchError as e:
            raise ModelMismatchError(f"{path}: {e}") from None
    return ds
