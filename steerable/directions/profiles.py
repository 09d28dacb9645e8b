"""The profile library: per-user steering weights over one shared basis, in one safetensors file.

A library holds, for L layers (0-based decoder blocks at one site), a basis of K orthonormal directions per
layer and, per user, a K-vector of weights per layer (methods.md §7). A user's steering vector at a layer is
composed on demand, v = Σ_k w_k b̂_k, so nothing per user is ever a resident d-vector. Tensors
(U users, d = hidden size):

- `population` [L, d]: mean(chosen) − mean(rejected) activations over every pair (raw, not unit);
- `basis` [L, K, d]: orthonormal rows per layer;
- `phi_mean` [L, K]: the mean feature φ̄ = Bᵀh of the responses in the data;
- `theta_pop` [L, K]: the population ideal point (the prior mean of every user's);
- `theta` [U, L, K]: per-user MAP ideal points; `dislike` [U, L, K]: the dislike-weighted weights.

`theta` and `dislike` are read a user's row at a time through safetensors' `safe_open` (memory-mapped), so a
100 000-user library loads in well under a second and costs its basis, its metadata and an index of names.
The JSON metadata (the safetensors `__metadata__` entry "steerable", as direction files) records the model,
site, position, layers, K and how it was chosen, the prior τ and how it was chosen, the data's provenance,
the users (row order) and each user's training pair count. Never pickled; written atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steerable.capture.positions import POSITIONS
from steerable.capture.sites import SITES
from steerable.directions.artifact import MAX_LAYER, DirectionSet, layer_ranges
from steerable.errors import ArtifactError, ModelMismatchError, SteerableError
from steerable.fsutil import atomic_path, check_regular

FORMAT = "steerable.profiles"
FORMAT_VERSION = 1
COMPOSITIONS = ("personalised", "population", "dislike_weighted")
_SHARED = ("population", "basis", "phi_mean", "theta_pop")  # read whole at load (small: L·K·d floats)
_PER_USER = ("theta", "dislike")  # read one row at a time
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ORTHONORMAL_ATOL = 1e-3


def _shapes(n_layers: int, k: int, d: int, n_users: int) -> dict[str, tuple[int, ...]]:
    return {"population": (n_layers, d), "basis": (n_layers, k, d), "phi_mean": (n_layers, k),
            "theta_pop": (n_layers, k), "theta": (n_users, n_layers, k), "dislike": (n_users, n_layers, k)}


def check_composition(composition: str) -> str:
    if composition not in COMPOSITIONS:
        raise SteerableError(f"unknown composition {composition!r}: use one of {', '.join(COMPOSITIONS)}")
    return composition


class ProfileLibrary:
    """Per-user ideal points and dislike weights over a shared per-layer basis (module docstring).

    Built in memory by `recipes.users_fit` (all tensors given) or read from a file by `load_profiles` (the
    per-user tensors stay in the file and are read one row per request). Row i of `theta`/`dislike` belongs to
    `users[i]`; row j of every per-layer tensor to model layer `layers[j]`.
    """

    def __init__(self, *, layers: Sequence[int], population: torch.Tensor, basis: torch.Tensor,
                 phi_mean: torch.Tensor, theta_pop: torch.Tensor, users: Sequence[str],
                 pair_counts: Sequence[int], meta: dict[str, Any], theta: torch.Tensor | None = None,
                 dislike: torch.Tensor | None = None, seen: Sequence[bool | None] | None = None,
                 path: str | None = None, _reader: Any = None) -> None:
        self.layers = [int(x) for x in layers]
        self.population = population.float()
        self.basis = basis.float()
        self.phi_mean = phi_mean.float()
        self.theta_pop = theta_pop.float()
        self._users = tuple(users)
        self._index = {u: i for i, u in enumerate(self._users)}
        self._counts = [int(c) for c in pair_counts]
        self._seen = None if seen is None else list(seen)
        self._theta = None if theta is None else theta.float()
        self._dislike = None if dislike is None else dislike.float()
        self._reader = _reader  # safe_open handle of a loaded file (per-user rows read on demand)
        self._lock = threading.Lock()
        self.meta = meta
        self.path = path
        self._validate()

    # -- what it holds ---------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.basis.shape[2])

    @property
    def site(self) -> str:
        return str(self.meta.get("site", "resid_post"))

    @property
    def position(self) -> str:
        return str(self.meta.get("position", "response-mean"))

    @property
    def features(self) -> str:
        """How φ was measured: "prompt-centred" (from the mean of the prompt's responses) or "raw" (φ = Bᵀh;
        libraries written before the choice existed)."""
        return str(self.meta.get("features", "raw"))

    @property
    def users(self) -> Sequence[str]:
        return self._users

    @property
    def label(self) -> str:
        return self.path if self.path is not None else "<in-memory ProfileLibrary>"

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and user in self._index

    def __len__(self) -> int:
        return len(self._users)

    def pair_count(self, user: str) -> int:
        """Training pairs the user's ideal point was fitted on (0 for a user the library lacks)."""
        i = self._index.get(user)
        return 0 if i is None else self._counts[i]

    def seen(self, user: str) -> bool | None:
        """The source's user split (True: seen, False: held-out user), None when unknown."""
        i = self._index.get(user)
        return None if i is None or self._seen is None else self._seen[i]

    # -- per-user rows ---------------------------------------------------------------------------------

    def _row(self, name: str, i: int) -> torch.Tensor:
        held = self._theta if name == "theta" else self._dislike
        if held is not None:
            row = held[i]
        else:
            with self._lock:
                row = self._reader.get_slice(name)[i : i + 1][0].float()
            if not bool(torch.isfinite(row).all()):
                raise ArtifactError(f"{self.label}: tensor {name!r} row {i} (user {self._users[i]!r}) "
                                    "contains NaN or Inf")
        return row

    def theta(self, user: str | None) -> tuple[torch.Tensor, bool]:
        """[L, K] the user's ideal point, or the population's (True) for a user the library lacks."""
        i = None if user is None else self._index.get(user)
        if i is None:
            return self.theta_pop.clone(), True
        return self._row("theta", i).clone(), False

    def weights(self, user: str | None, composition: str = "personalised") -> tuple[torch.Tensor | None, bool]:
        """[L, K] basis weights of `user`'s composed vector: θ_u − φ̄ ("personalised") or the dislike weights
        ("dislike_weighted"); None for "population" and for a user the library lacks (True: fallback), whose
        vector is `population`."""
        check_composition(composition)
        i = None if user is None else self._index.get(user)
        if composition == "population" or i is None:
            return None, i is None
        if composition == "personalised":
            return self._row("theta", i) - self.phi_mean, False
        return self._row("dislike", i).clone(), False

    def compose(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k b̂_k per layer: weights [..., L, K] → vectors [..., L, d]."""
        return torch.einsum("...lk,lkd->...ld", weights.float(), self.basis)

    def vectors(self, user: str | None, composition: str = "personalised") -> tuple[torch.Tensor, bool]:
        """[L, d] steering vectors for `user` (v = Σ_k w_k b̂_k per layer; "population" gives `population`).
        A user not in the library (or None) gets the population vector; the bool is True on that fallback."""
        w, fallback = self.weights(user, composition)
        return (self.population.clone() if w is None else self.compose(w)), fallback

    def direction_set(self, user: str | None, composition: str = "personalised") -> tuple[DirectionSet, bool]:
        """`vectors` as an in-memory DirectionSet (directions = v/‖v‖, scales = ‖v‖, mean_pos = v, mean_neg = 0,
        the class statistics NaN), so `add` at strength α adds exactly α·v at each layer; and the fallback flag.
        A zero vector at a layer keeps a unit placeholder direction with scale 0 (adds nothing)."""
        v, fallback = self.vectors(user, composition)
        v = v.double()
        norms = v.norm(dim=1)
        zero = norms == 0
        unit = torch.where(zero[:, None], self.basis[:, 0].double(), v / norms.clamp_min(1e-300)[:, None])
        n, d = v.shape
        nan = torch.full((n,), math.nan)
        used = "population" if fallback else composition
        meta = {"model": dict(self.meta.get("model", {})), "site": self.site, "position": self.position,
                "estimator": "profile", "name": f"{user if not fallback else 'population'} ({used})",
                "source": self.label,
                "profile": {"library": self.label, "user": user, "composition": composition, "fallback": fallback}}
        ds = DirectionSet(layers=list(self.layers), directions=unit.float(), raw_norms=norms.float(),
                          scales=norms.float(), bias=nan, mean_pos=v.float(), mean_neg=torch.zeros(n, d),
                          percentiles=torch.full((n, 2, 101), math.nan), auroc=nan.clone(), cohens_d=nan.clone(),
                          meta=meta)
        return ds, fallback

    # -- checks ----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        where = self.label
        layers = self.layers
        if not layers or len(set(layers)) != len(layers) or any(not 0 <= x <= MAX_LAYER for x in layers):
            raise ArtifactError(f"{where}: bad layer list {layers[:8]} (distinct layers in 0..{MAX_LAYER} needed)")
        if self.basis.dim() != 3 or self.basis.shape[1] == 0 or self.basis.shape[2] == 0:
            raise ArtifactError(f"{where}: tensor 'basis' has shape {tuple(self.basis.shape)}, expected "
                                f"({len(layers)}, K, d) with K, d ≥ 1")
        n_users = len(self._users)
        shapes = _shapes(len(layers), self.k, self.hidden_size, n_users)
        for name in _SHARED:
            t = getattr(self, name)
            if tuple(t.shape) != shapes[name]:
                raise ArtifactError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {shapes[name]}")
            if not bool(torch.isfinite(t).all()):
                raise ArtifactError(f"{where}: tensor {name!r} contains NaN or Inf")
        for name in _PER_USER:
            held = getattr(self, f"_{name}")
            shape = tuple(held.shape) if held is not None else (
                tuple(self._reader.get_slice(name).get_shape()) if self._reader is not None else None)
            if shape != shapes[name]:
                raise ArtifactError(f"{where}: tensor {name!r} has shape {shape}, expected {shapes[name]}")
            if held is not None and not bool(torch.isfinite(held).all()):
                raise ArtifactError(f"{where}: tensor {name!r} contains NaN or Inf")
        gram = torch.einsum("lkd,ljd->lkj", self.basis.double(), self.basis.double())
        if not bool(torch.allclose(gram, torch.eye(self.k, dtype=torch.float64).expand_as(gram),
                                   atol=_ORTHONORMAL_ATOL)):
            raise ArtifactError(f"{where}: the basis rows are not orthonormal at every layer")
        if len(self._index) != n_users or not all(isinstance(u, str) for u in self._users):
            raise ArtifactError(f"{where}: users must be distinct strings")
        if len(self._counts) != n_users or any(c < 0 for c in self._counts):
            raise ArtifactError(f"{where}: need one non-negative pair count per user ({len(self._counts)} for "
                                f"{n_users} users)")
        if self._seen is not None and (len(self._seen) != n_users
                                       or any(s is not None and not isinstance(s, bool) for s in self._seen)):
            raise ArtifactError(f"{where}: 'seen' must be one true/false/null per user")
        site, position = self.meta.get("site"), self.meta.get("position")
        if site is not None and site not in SITES:
            raise ArtifactError(f"{where}: metadata 'site' must be one of {', '.join(SITES)}, got {site!r}")
        if position is not None and position not in POSITIONS:
            raise ArtifactError(f"{where}: metadata 'position' must be one of {', '.join(POSITIONS)}, "
                                f"got {position!r}")
        if not isinstance(self.meta.get("model", {}), dict):
            raise ArtifactError(f"{where}: metadata 'model' must be an object")

    def check_model(self, handle: Any) -> None:
        """Fail, naming the mismatch, if this library was not fitted on a model like `handle`."""
        m = self.meta.get("model", {})
        if self.hidden_size != handle.hidden_size:
            raise ModelMismatchError(f"hidden size mismatch: profile library has d={self.hidden_size}, model "
                                     f"{handle.name} has d={handle.hidden_size}")
        if m.get("n_layers") is not None and m["n_layers"] != handle.n_layers:
            raise ModelMismatchError(f"layer count mismatch: profile library is for {m['n_layers']} layers, model "
                                     f"{handle.name} has {handle.n_layers}")
        if max(self.layers) >= handle.n_layers:
            raise ModelMismatchError(f"layer {max(self.layers)} of the profile library is out of range for model "
                                     f"{handle.name} with {handle.n_layers} layers")
        if m.get("config_hash") and m["config_hash"] != handle.config_hash:
            raise ModelMismatchError(f"model mismatch: profile library was fitted on {m.get('name')!r} (config hash "
                                     f"{m['config_hash']}), this model {handle.name!r} has config hash "
                                     f"{handle.config_hash}")

    # -- files -----------------------------------------------------------------------------------------

    def _all_rows(self, name: str) -> torch.Tensor:
        held = self._theta if name == "theta" else self._dislike
        if held is not None:
            return held
        with self._lock:
            return self._reader.get_tensor(name).float()

    def save(self, path: str | Path) -> Path:
        """Write the library atomically (one safetensors file, metadata in its header)."""
        path = Path(path)
        tensors = {name: getattr(self, name).float().contiguous() for name in _SHARED}
        tensors.update({name: self._all_rows(name).float().contiguous() for name in _PER_USER})
        meta = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "layers": self.layers,
                "k": self.k, "users": list(self._users), "pair_counts": self._counts}
        if self._seen is not None:
            meta["seen"] = self._seen
        meta.setdefault("created", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        meta.setdefault("tool", "steerable")
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"steerable": json.dumps(meta, ensure_ascii=False)})
        self.path = str(path)
        return path

    def __reduce__(self) -> tuple[Any, ...]:
        # a loaded library pickles as its file (Ray actors reopen it); an in-memory one is refused
        if self._reader is None or self.path is None:
            raise TypeError("an in-memory ProfileLibrary cannot be pickled; save it and pass the path")
        return (load_profiles, (self.path,))

    def summary(self) -> dict[str, Any]:
        """What `steerable users show` prints: sizes, the model, the basis and prior choices, pair counts."""
        counts = self._counts
        return {"path": self.path, "users": len(self._users), "k": self.k, "layers": layer_ranges(self.layers),
                "site": self.site, "position": self.position, "features": self.features,
                "model": self.meta.get("model", {}),
                "basis": self.meta.get("basis", {}), "prior": self.meta.get("prior", {}),
                "data": self.meta.get("data", {}),
                "pairs": {"total": sum(counts), "min": min(counts, default=0), "max": max(counts, default=0),
                          "users_without_pairs": sum(1 for c in counts if c == 0)}}


def save_profiles(library: ProfileLibrary, path: str | Path) -> Path:
    return library.save(path)


def _list(meta: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = meta.pop(key, None)
    if not isinstance(value, list):
        raise ArtifactError(f"{path}: metadata {key!r} must be a list")
    return value


def load_profiles(path: str | Path, model: Any | None = None) -> ProfileLibrary:
    """Open a profile library lazily (the per-user rows stay in the file); with `model` also check it fits.

    Every failure is an ArtifactError naming the file (ModelMismatchError for another model's library)."""
    path = check_regular(path, "profile library")
    try:
        reader = safe_open(str(path), framework="pt")
        raw = (reader.metadata() or {}).get("steerable")
        names = set(reader.keys())
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({e})") from None
    if raw is None:
        raise ArtifactError(f"{path}: no steerable metadata (not a steerable profile library)")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError, ValueError) as e:
        raise ArtifactError(f"{path}: metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        shown = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"{path}: not a profile library (format {shown!r}; a direction file is read with "
                            "load_directions)")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version must be an integer in 1..{FORMAT_VERSION}, got {version!r}")
    missing = [n for n in (*_SHARED, *_PER_USER) if n not in names]
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing}")
    for name in (*_SHARED, *_PER_USER):
        dtype = reader.get_slice(name).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {dtype}; profile libraries hold floating-point "
                                "tensors")
    layers = _list(meta, "layers", path)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ArtifactError(f"{path}: metadata 'layers' must be a list of integers")
    users = _list(meta, "users", path)
    counts = _list(meta, "pair_counts", path)
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ArtifactError(f"{path}: metadata 'pair_counts' must be integers")
    seen = meta.pop("seen", None)
    if seen is not None and not isinstance(seen, list):
        raise ArtifactError(f"{path}: metadata 'seen' must be a list")
    meta.pop("k", None)
    shared = {name: reader.get_tensor(name).float() for name in _SHARED}
    try:
        lib = ProfileLibrary(layers=layers, users=users, pair_counts=counts, seen=seen, meta=meta, path=str(path),
                             _reader=reader, **shared)
    except ArtifactError:
        raise
    except (SteerableError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: {e}") from None
    if model is not None:
        try:
            lib.check_model(model)
        except ModelMismatchError as e:
            raise ModelMismatchError(f"{path}: {e}") from None
    return lib
