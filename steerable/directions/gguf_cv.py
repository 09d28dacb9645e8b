"""llama.cpp control vectors (GGUF): export a direction set for deployment there, and import one.

llama.cpp's format is add-only: tensors `direction.N` (float32 [d]) are *added* to the output of
decoder block N (0-based; N ≥ 1 — llama.cpp never steers block 0), scaled by `--control-vector-scaled`.
So `direction.N` corresponds to our site resid_post at layer N.

Import reads the file with its own bounded GGUF parser (not gguf's GGUFReader, which loops without end on
an array whose length runs past the end of the file): every count and size is checked against the file's
length before it is used, only `direction.N` tensors' data is read, and any defect is an ArtifactError.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from steerable.directions.artifact import MAX_LAYER, DirectionSet
from steerable.errors import ArtifactError, ModelMismatchError, SteerableError
from steerable.fsutil import atomic_path, open_regular

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
    vectors = {layer: (strength * ds.scales[ds.row(layer)].double() * ds.directions[ds.row(layer)].double())
               .float().numpy().astype(np.float32) for layer in chosen}
    for layer, vec in vectors.items():
        if not np.isfinite(vec).all():
            raise SteerableError(f"strength {strength} × scale at layer {layer} is not a finite float32 vector")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", _ARCH_HINT.get(model.get("family", ""), model.get("family", "")))
        writer.add_uint32("controlvector.layer_count", len(chosen))
        for layer, vec in vectors.items():
            writer.add_tensor(f"direction.{layer}", vec)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


# -- a bounded GGUF reader (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) ------------------------

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_STRING, _ARRAY = 8, 9
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type → bytes
_MAX_ARRAY_NESTING = 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME = 1 << 16
# tensor types read exactly: ggml type id → (name, bytes per element)
_FLOAT_TYPES = {0: ("F32", 4), 1: ("F16", 2), 30: ("BF16", 2)}
_CANONICAL = re.compile(r"direction\.(0|[1-9][0-9]*)", re.ASCII)


class _Defect(Exception):
    """A structural defect of the file; import_control_vector turns it into an ArtifactError."""


class _Refused(Exception):
    """A well-formed tensor this importer does not take; import_control_vector turns it into an ArtifactError."""


class _Cursor:
    """Reads a GGUF file front to back, refusing any read past its end."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size, self.pos, self.order = f, size, 0, "<"

    def left(self) -> int:
        return self.size - self.pos

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left():
            raise _Defect(f"truncated: {what} at byte {self.pos} needs {n} bytes, {self.left()} left")
        data = self.f.read(n)
        if len(data) != n:
            raise _Defect(f"truncated: {what} at byte {self.pos} is cut short")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise _Defect(f"truncated: {what} at byte {self.pos} needs {n} bytes, {self.left()} left")
        self.pos += n
        self.f.seek(self.pos)

    def u32(self, what: str) -> int:
        return int(struct.unpack(self.order + "I", self.read(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack(self.order + "Q", self.read(8, what))[0])

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"{what} length")
        if limit is not None and n > limit:
            raise _Defect(f"{what} is {n} bytes long (at most {limit})")
        return self.read(n, what)

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_SIZE:
            self.skip(_SCALAR_SIZE[vtype], what)
        elif vtype == _STRING:
            self.skip(self.u64(f"{what} length"), what)
        elif vtype == _ARRAY:
            if depth >= _MAX_ARRAY_NESTING:
                raise _Defect(f"{what}: arrays nested more than {_MAX_ARRAY_NESTING} deep")
            itype, count = self.u32(f"{what} item type"), self.u64(f"{what} length")
            if itype in _SCALAR_SIZE:
                self.skip(count * _SCALAR_SIZE[itype], what)  # bounds-checked in one step, whatever the count
                return
            if itype not in (_STRING, _ARRAY):
                raise _Defect(f"{what}: unknown array item type {itype}")
            if count > self.left() // (8 if itype == _STRING else 12):  # each item needs at least that
                raise _Defect(f"truncated: {what} claims {count} items, more than the file holds")
            for _ in range(count):
                self.skip_value(itype, what, depth + 1)
        else:
            raise _Defect(f"{what}: unknown value type {vtype}")


def _type_name(ggml_type: int) -> str:
    import gguf

    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def _read_gguf_directions(f: BinaryIO, size: int) -> dict[int, torch.Tensor]:
    """Layer → float32 vector for every `direction.N` tensor; other tensors are skipped unread."""
    c = _Cursor(f, size)
    if c.read(4, "magic") != _MAGIC:
        raise _Defect("bad magic: not a GGUF file")
    raw = c.read(4, "version")
    version = struct.unpack("<I", raw)[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine
        c.order, version = ">", struct.unpack(">I", raw)[0]
    if version not in _VERSIONS:
        raise _Defect(f"GGUF version {version} (this reader takes {', '.join(map(str, _VERSIONS))})")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    if n_kv > c.left() // 12 or n_tensors > c.left() // 24:  # a key-value pair ≥ 12 bytes, a tensor info ≥ 24
        raise _Defect(f"truncated: {n_kv} metadata entries and {n_tensors} tensors cannot fit in {size} bytes")
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"metadata key {i}", _MAX_NAME)
        vtype = c.u32(f"metadata {key!r} type")
        if key == b"general.alignment":
            if vtype != 4:
                raise _Defect("general.alignment is not a uint32")
            alignment = c.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Defect(f"general.alignment {alignment} is not a power of two")
        else:
            c.skip_value(vtype, f"metadata {key!r}")
    infos: list[tuple[str, list[int], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        raw_name = c.string(f"tensor {i} name", _MAX_NAME)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise _Defect(f"tensor {i} name {raw_name!r} is not UTF-8") from None
        if name in seen:
            raise _Defect(f"two tensors are named {name!r}")
        seen.add(name)
        n_dims = c.u32(f"tensor {name!r} dimension count")
        if n_dims > _MAX_DIMS:
            raise _Defect(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [c.u64(f"tensor {name!r} shape") for _ in range(n_dims)]
        ggml_type, offset = c.u32(f"tensor {name!r} type"), c.u64(f"tensor {name!r} offset")
        infos.append((name, dims, ggml_type, offset))
    data_start = -(-c.pos // alignment) * alignment
    rows: dict[int, torch.Tensor] = {}
    for name, dims, ggml_type, offset in infos:
        if not name.startswith("direction."):
            continue
        m = _CANONICAL.fullmatch(name)
        if m is None:
            raise _Refused(f"tensor {name!r} is not named direction.N (N a layer number in decimal, without "
                                "leading zeros)")
        if int(m.group(1)) > MAX_LAYER:
            raise _Refused(f"tensor {name!r}: layer {m.group(1)} is beyond any model (at most {MAX_LAYER})")
        if len(dims) != 1:
            raise _Refused(f"tensor {name!r} has shape {list(reversed(dims))}; a control vector's tensors "
                                "are 1-D")
        if dims[0] == 0:
            raise _Refused(f"tensor {name!r} is empty")
        if ggml_type not in _FLOAT_TYPES:
            raise _Refused(f"tensor {name!r} has type {_type_name(ggml_type)}; control vectors are read only "
                                f"from {', '.join(t for t, _ in _FLOAT_TYPES.values())} tensors")
        kind, width = _FLOAT_TYPES[ggml_type]
        start, nbytes = data_start + offset, dims[0] * width
        if start + nbytes > size:
            raise _Defect(f"truncated: tensor {name!r} data (bytes {start}..{start + nbytes}) runs past the end "
                          f"({size} bytes)")
        c.pos = start
        f.seek(start)
        buf = c.read(nbytes, f"tensor {name!r} data")
        if kind == "F32":
            vec = np.frombuffer(buf, dtype=np.dtype(c.order + "f4")).astype(np.float32)
        elif kind == "F16":
            vec = np.frombuffer(buf, dtype=np.dtype(c.order + "f2")).astype(np.float32)
        else:  # bfloat16 is the top half of a float32: exact
            bits = np.frombuffer(buf, dtype=np.dtype(c.order + "u2")).astype(np.uint32) << 16
            vec = bits.view(np.float32)
        rows[int(m.group(1))] = torch.from_numpy(vec.copy())
    return rows


def import_control_vector(path: str | Path, *, model_meta: dict[str, Any] | None = None) -> DirectionSet:
    """Read a llama.cpp control vector as a direction set (unit directions; `scales` = vector norms).

    Only 1-D F32/F16/BF16 tensors named `direction.N` (canonical decimal N) are taken, converted exactly to
    float32; every one must have the same length. With `model_meta` (name, hidden_size, n_layers, …) the
    vectors must have the model's hidden size and N must be one of its layers (ModelMismatchError).
    Everything else wrong with the file is an ArtifactError naming it; a FIFO or device is never read.
    """
    path = Path(path)
    try:
        with open_regular(path, "GGUF file") as f:
            rows = _read_gguf_directions(f, os.fstat(f.fileno()).st_size)
    except _Defect as e:
        raise ArtifactError(f"{path}: not a readable GGUF file ({e})") from None
    except _Refused as e:
        raise ArtifactError(f"{path}: {e}") from None
    except OSError as e:
        raise ArtifactError(f"{path}: not a readable GGUF file ({e})") from None
    if not rows:
        raise ArtifactError(f"{path}: no direction.N tensors (not a llama.cpp control vector)")
    lengths = {layer: int(v.shape[0]) for layer, v in rows.items()}
    if len(set(lengths.values())) > 1:
        (a, da), (b, db) = sorted({d: (x, d) for x, d in lengths.items()}.values())[:2]
        raise ArtifactError(f"{path}: the control vector's tensors differ in length (direction.{a} has {da} values, "
                            f"direction.{b} has {db})")
    for layer, vec in rows.items():
        if not bool(torch.isfinite(vec).all()):
            raise ArtifactError(f"{path}: tensor direction.{layer} contains NaN or Inf")
    d = next(iter(lengths.values()))
    if model_meta is not None:
        _check_fits(path, model_meta, d, sorted(rows))
    layers = sorted(rows)
    vecs = torch.stack([rows[x] for x in layers])
    norms = vecs.double().norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ArtifactError(f"{path}: a direction.N tensor's norm overflows float64")
    keep = norms > 0
    if not bool(keep.any()):
        raise ArtifactError(f"{path}: every direction.N tensor is zero (nothing to steer with)")
    layers = [x for x, k in zip(layers, keep.tolist(), strict=True) if k]
    vecs, norms = vecs[keep], norms[keep]
    n = len(layers)
    nan = torch.full((n,), float("nan"))
    ds = DirectionSet(
        layers=layers, directions=(vecs.double() / norms[:, None]).float(), raw_norms=norms.float(),
        scales=norms.float(), bias=nan, mean_pos=vecs.clone(), mean_neg=torch.zeros(n, d),
        percentiles=torch.full((n, 2, 101), float("nan")), auroc=nan.clone(), cohens_d=nan.clone(),
        meta={"estimator": "llama.cpp-control-vector", "site": "resid_post", "source": str(path),
              "model": model_meta or {"hidden_size": d}},
    )
    try:
        ds.validate()
    except SteerableError as e:
        raise ArtifactError(f"{path}: {e}") from None
    return ds


def _check_fits(path: Path, model_meta: dict[str, Any], d: int, layers: list[int]) -> None:
    name = model_meta.get("name", "the model")
    hidden, n_layers = model_meta.get("hidden_size"), model_meta.get("n_layers")
    if isinstance(hidden, int) and d != hidden:
        raise ModelMismatchError(f"{path}: hidden size mismatch: the control vector has d={d}, model {name} has "
                                 f"d={hidden}")
    if isinstance(n_layers, int) and layers[-1] >= n_layers:
        raise ModelMismatchError(f"{path}: layer {layers[-1]} (direction.{layers[-1]}) is out of range for model "
                                 f"{name} with {n_layers} layers (0-{n_layers - 1})")
