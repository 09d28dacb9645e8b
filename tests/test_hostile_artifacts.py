"""Hostile direction files and GGUF control vectors (issue 13): every input ends in a valid result or an
ArtifactError (ModelMismatchError for another model's file) naming the file; nothing else escapes, nothing
hangs, nothing is half-written."""

from __future__ import annotations

import json
import math
import os
import stat
import threading
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from steerable.cli.main import main
from steerable.directions.artifact import FORMAT, DirectionSet, load_directions, save_directions
from steerable.directions.gguf_cv import export_control_vector, import_control_vector
from steerable.directions.summary import inspect_table, printable, safe_json
from steerable.errors import ArtifactError, ModelMismatchError, SteerableError
from steerable.fsutil import apply_umask, atomic_path

N, D = 3, 8
LAYERS = [1, 2, 3]


def small_set(name: str = "tiny-llama") -> DirectionSet:
    """A valid set with every optional tensor, as calibrate writes it (no model needed)."""
    g = torch.Generator().manual_seed(0)
    pct = torch.sort(torch.randn(N, 2, 101, generator=g), dim=-1).values
    cast = torch.sort(torch.randn(N, 2, 2, 101, generator=g), dim=-1).values
    return DirectionSet(
        layers=list(LAYERS), directions=torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1),
        raw_norms=torch.ones(N), scales=torch.ones(N), bias=torch.zeros(N), mean_pos=torch.randn(N, D, generator=g),
        mean_neg=torch.randn(N, D, generator=g), percentiles=pct, auroc=torch.full((N,), 0.75),
        cohens_d=torch.ones(N), mean_unit_pos=torch.randn(N, D, generator=g) / 10,
        mean_unit_neg=torch.randn(N, D, generator=g) / 10, cast_percentiles=cast,
        meta={"model": {"name": name, "config_hash": "abc", "hidden_size": D, "n_layers": 4, "family": "llama"},
              "estimator": "mean-diff", "site": "resid_post", "position": "last",
              "counts": {"train_pos": 5, "train_neg": 5, "heldout_pos": 1, "heldout_neg": 1},
              "data": {"n_examples": 12}, "created": "2026-01-01T00:00:00+00:00", "tool": "steerable"},
    )


def base_meta() -> dict[str, Any]:
    return {**small_set().meta, "format": FORMAT, "format_version": 2, "layers": list(LAYERS)}


def write_raw(path: Path, tensors: dict[str, torch.Tensor] | None = None, meta: Any = None,
              raw_meta: str | None = None) -> Path:
    """A safetensors file as an attacker writes it: any tensors, any `steerable` metadata text."""
    tensors = small_set().tensors() if tensors is None else tensors
    text = raw_meta if raw_meta is not None else json.dumps(base_meta() if meta is None else meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"steerable": text})
    return path


def valid_or_artifact_error(fn: Any, *args: Any, **kw: Any) -> DirectionSet | None:
    """Call fn: a valid DirectionSet (which inspect can show) or an ArtifactError — nothing else."""
    try:
        ds = fn(*args, **kw)
    except ArtifactError:
        return None
    assert isinstance(ds, DirectionSet)
    ds.validate()
    assert all(t.dtype == torch.float32 for t in ds.tensors().values())
    inspect_table(ds)
    safe_json(ds.meta)
    return ds


# -- metadata of the wrong type ---------------------------------------------------------------------------

def _with(**changes: Any) -> dict[str, Any]:
    meta = base_meta()
    for key, value in changes.items():
        target, *rest = key.split("__")
        if rest:
            meta[target] = {**meta[target], rest[0]: value}
        else:
            meta[key] = value
    return meta


BAD_META = {
    "steerable-is-a-list": [1, 2, 3],
    "format_version-string": _with(format_version="3"),
    "format_version-negative": _with(format_version=-1),
    "format_version-float": _with(format_version=1.5),
    "format_version-bool": _with(format_version=True),
    "format_version-newer": _with(format_version=3),
    "format_version-missing": {k: v for k, v in base_meta().items() if k != "format_version"},
    "model-string": _with(model="tiny-llama"),
    "model-n_layers-string": _with(model__n_layers="30"),
    "model-hidden_size-float": _with(model__hidden_size=8.0),
    "model-name-number": _with(model__name=7),
    "layers-bools": _with(layers=[True, 2, 3]),
    "layers-negative": _with(layers=[-1, 2, 3]),
    "layers-string": _with(layers="1-3"),
    "layers-huge": _with(layers=[1, 2, 10**30]),
    "site-unknown": _with(site="resid_mid"),
    "position-number": _with(position=3),
    "estimator-list": _with(estimator=["mean-diff"]),
    "counts-strings": _with(counts={"heldout_pos": "1", "heldout_neg": 1}),
    "counts-list": _with(counts=[1, 1]),
    "counts-huge": _with(counts={"heldout_pos": 10**400, "heldout_neg": 1}),
    "axis-string": _with(axis="layer 2"),
    "axis-monitor-string": _with(axis={"monitor_layer": "2"}),
    "axis-monitor-uncalibrated": _with(axis={"monitor_layer": 0}),
    "data-string": _with(data="advbench"),
    "condition-missing-threshold": _with(condition={"layer": 2, "score": "cast", "compare": ">"}),
    "condition-layer-uncalibrated": _with(condition={"layer": 0, "score": "cast", "compare": ">", "threshold": 0.1}),
    "condition-compare": _with(condition={"layer": 2, "score": "cast", "compare": ">=", "threshold": 0.1}),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_metadata_of_the_wrong_type_is_an_artifact_error(case, tmp_path):
    path = write_raw(tmp_path / "bad.safetensors", meta=BAD_META[case])
    with pytest.raises(ArtifactError, match=str(path).replace("\\", "\\\\")):
        load_directions(path)


def test_deeply_nested_metadata_is_an_artifact_error(tmp_path):
    deep = '{"format": "steerable.directions", "format_version": 2, "layers": [1, 2, 3], "data": ' \
           + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ArtifactError, match="nested"):
        load_directions(write_raw(tmp_path / "deep.safetensors", raw_meta=deep))
    moderately = _with(data={"x": json.loads("[" * 200 + "]" * 200)})  # parses, but deeper than any real file
    with pytest.raises(ArtifactError, match="nested more than"):
        load_directions(write_raw(tmp_path / "deep2.safetensors", meta=moderately))


def test_metadata_that_is_not_json_text(tmp_path):
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_directions(write_raw(tmp_path / "a.safetensors", raw_meta="{nope"))
    with pytest.raises(ArtifactError, match="cannot be read"):  # an int beyond Python's digit limit
        load_directions(write_raw(tmp_path / "b.safetensors", raw_meta='{"x": ' + "9" * 5000 + "}"))


def test_in_memory_sets_with_bad_metadata_are_not_saved(tmp_path):
    ds = small_set()
    ds.meta["site"] = "nowhere"
    with pytest.raises(ArtifactError, match="'site' must be one of"):
        save_directions(ds, tmp_path / "v.safetensors")
    assert not list(tmp_path.iterdir())


# -- tensors: dtype, shape, no layer ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.uint8])
def test_non_floating_tensors_are_refused(dtype, tmp_path):
    tensors = small_set().tensors()
    tensors["directions"] = tensors["directions"].to(dtype)
    with pytest.raises(ArtifactError, match="'directions' has dtype"):
        load_directions(write_raw(tmp_path / "int.safetensors", tensors))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_floating_dtype_loads_as_float32(dtype, tmp_path):
    tensors = {k: v.to(dtype) for k, v in small_set().tensors().items()}
    back = load_directions(write_raw(tmp_path / "f.safetensors", tensors))
    for name, t in back.tensors().items():
        assert getattr(back, name).dtype == torch.float32, name
        want = tensors[name].float()
        if name == "directions":  # half precision: made unit again in float32
            want = torch.nn.functional.normalize(want.double(), dim=1).float()
        torch.testing.assert_close(t, want, rtol=0, atol=1e-7 if name == "directions" else 0, equal_nan=True)


def test_wrong_shapes_are_refused(tmp_path):
    tensors = small_set().tensors()
    tensors["mean_neg"] = tensors["mean_neg"][:, :4]
    with pytest.raises(ArtifactError, match="'mean_neg' has shape"):
        load_directions(write_raw(tmp_path / "s.safetensors", tensors))
    tensors = small_set().tensors()
    tensors["directions"] = torch.ones(())  # a scalar: no hidden size at all
    with pytest.raises(ArtifactError, match="'directions' has shape"):
        load_directions(write_raw(tmp_path / "s0.safetensors", tensors))


def test_a_file_with_no_layer_is_refused(tmp_path):
    tensors = {k: v[:0] for k, v in small_set().tensors().items()}
    path = write_raw(tmp_path / "empty.safetensors", tensors, meta=_with(layers=[]))
    with pytest.raises(ArtifactError, match="no layer"):
        load_directions(path)
    assert main(["inspect", str(path)]) == 2


# -- special files ----------------------------------------------------------------------------------------

def _finishes(fn: Any, *args: Any, **kw: Any) -> BaseException | None:
    """Run fn in a thread: the test fails (instead of hanging) if it blocks; returns what it raised."""
    out: list[BaseException | None] = []

    def target() -> None:
        try:
            fn(*args, **kw)
            out.append(None)
        except BaseException as e:  # handed back to the test
            out.append(e)
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout=10)
    assert out, f"{fn.__name__} blocked on a FIFO"
    return out[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for fn in (load_directions, import_control_vector):
        err = _finishes(fn, fifo)
        assert isinstance(err, ArtifactError)
        assert "not a regular file (a FIFO)" in str(err)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_directions(str(tmp_path / "a\0b"))
    err = _finishes(load_directions, tmp_path)  # a directory is no direction file either
    assert isinstance(err, ArtifactError)
    assert "directory" in str(err)


# -- output modes -----------------------------------------------------------------------------------------

def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        vec = save_directions(small_set(), tmp_path / "v.safetensors")
        cv = export_control_vector(small_set(), tmp_path / "cv.gguf")
        with atomic_path(tmp_path / "plain.txt") as tmp:
            tmp.write_text("x")
        os.umask(0o077)
        private = save_directions(small_set(), tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    for path in (vec, cv, tmp_path / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_apply_umask_fixes_whole_directories(tmp_path):
    import tempfile

    old = os.umask(0o022)
    try:
        tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as bake and the model cache make them
        (tmp / "sub").mkdir(mode=0o700)
        save_file({"a": torch.ones(2)}, str(tmp / "sub" / "model.safetensors"))  # 0600
        apply_umask(tmp)
    finally:
        os.umask(old)
    assert stat.S_IMODE(tmp.stat().st_mode) == stat.S_IMODE((tmp / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp / "sub" / "model.safetensors").stat().st_mode) == 0o644


# -- what inspect prints ----------------------------------------------------------------------------------

def test_inspect_escapes_control_characters(tmp_path, capsys):
    evil = "\x1b[2J\x1b]0;owned\x07tiny\u202eevil\x7f\ud800"
    ds = small_set(name=evil)
    ds.meta["estimator"] = "mean\x1b[31m-diff"
    ds.meta["counts"] = {"x\x1b": 1}
    path = save_directions(ds, tmp_path / "v.safetensors")
    for argv in (["inspect", str(path)], ["inspect", str(path), "--json"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.isascii() or all(c.isprintable() or c == "\n" for c in out)
        for bad in ("\x1b", "\x07", "\u202e", "\x7f", "\ud800"):
            assert bad not in out
    data = json.loads(safe_json(load_directions(path).meta))
    assert data["model"]["name"] == evil  # JSON escapes keep the value for a reader
    assert printable("a\x1bb\u202e") == "a\\x1bb\\u202e"


# -- GGUF import ------------------------------------------------------------------------------------------

def write_gguf(path: Path, tensors: dict[str, np.ndarray], raw: dict[str, gguf.GGMLQuantizationType] | None = None,
               kv: bool = False) -> Path:
    w = gguf.GGUFWriter(str(path), "controlvector")
    if kv:
        w.add_array("test.flags", [True, False, True])
        w.add_array("test.names", ["a", "bc"])
        w.add_uint32("controlvector.layer_count", len(tensors))
    for name, arr in tensors.items():
        qtype = (raw or {}).get(name)
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def vec(d: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


MODEL_META = {"name": "tiny-llama", "config_hash": "abc", "hidden_size": 32, "n_layers": 4, "family": "llama"}


def test_gguf_wrong_hidden_size_or_layer_for_the_model(tmp_path):
    path = write_gguf(tmp_path / "cv.gguf", {"direction.1": vec(288)})
    with pytest.raises(ModelMismatchError, match=r"hidden size mismatch.*d=288"):
        import_control_vector(path, model_meta=MODEL_META)
    path = write_gguf(tmp_path / "cv2.gguf", {"direction.1": vec(), "direction.30": vec(seed=1)})
    with pytest.raises(ModelMismatchError, match="layer 30"):
        import_control_vector(path, model_meta=MODEL_META)
    ok = import_control_vector(write_gguf(tmp_path / "ok.gguf", {"direction.3": vec()}), model_meta=MODEL_META)
    assert ok.layers == [3]


def test_gguf_tensors_must_be_one_dimensional(tmp_path):
    path = write_gguf(tmp_path / "2d.gguf", {"direction.1": np.ones((2, 288), dtype=np.float32)})
    with pytest.raises(ArtifactError, match=r"'direction\.1' has shape \[2, 288\].*1-D"):
        import_control_vector(path)


def test_gguf_quantised_tensors_are_refused(tmp_path):
    path = write_gguf(tmp_path / "q8.gguf", {"direction.1": vec()}, raw={"direction.1": gguf.GGMLQuantizationType.Q8_0})
    with pytest.raises(ArtifactError, match="type Q8_0"):
        import_control_vector(path)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16])
def test_gguf_half_precision_tensors_convert_exactly(qtype, tmp_path):
    v = vec()
    path = write_gguf(tmp_path / "h.gguf", {"direction.2": v}, raw={"direction.2": qtype})
    back = import_control_vector(path)
    want = torch.from_numpy(v).to(torch.float16 if qtype == gguf.GGMLQuantizationType.F16 else torch.bfloat16)
    torch.testing.assert_close(back.mean_pos[0], want.float(), rtol=0, atol=0)


def test_gguf_names_must_be_canonical(tmp_path):
    path = write_gguf(tmp_path / "dup.gguf", {"direction.1": vec(), "direction.01": vec(seed=1)})
    with pytest.raises(ArtifactError, match=r"'direction\.01' is not named direction\.N"):
        import_control_vector(path)
    with pytest.raises(ArtifactError, match="beyond any model"):
        import_control_vector(write_gguf(tmp_path / "big.gguf", {"direction.99999999999999999999": vec()}))
    for name in ("direction.+1", "direction.1.0", "direction.\u0661", "direction."):
        with pytest.raises(ArtifactError, match=r"is not named direction\.N"):
            import_control_vector(write_gguf(tmp_path / "n.gguf", {name: vec()}))


def test_gguf_duplicate_tensor_names(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", {"direction.1": vec(), "direction.2": vec(seed=1)})
    data = path.read_bytes().replace(b"direction.2", b"direction.1")
    (tmp_path / "b.gguf").write_bytes(data)
    with pytest.raises(ArtifactError, match=r"two tensors are named 'direction\.1'"):
        import_control_vector(tmp_path / "b.gguf")


def test_gguf_mixed_dimensions(tmp_path):
    path = write_gguf(tmp_path / "mix.gguf", {"direction.1": vec(32), "direction.2": vec(16, seed=1)})
    with pytest.raises(ArtifactError, match="differ in length"):
        import_control_vector(path)


def test_gguf_truncated_and_flipped_files(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", {"direction.1": vec(), "direction.2": vec(seed=1)}, kv=True).read_bytes()
    for cut in (3, 10, 30, len(good) // 2, len(good) - 1):
        (tmp_path / "t.gguf").write_bytes(good[:cut])
        with pytest.raises(ArtifactError, match="not a readable GGUF file"):
            import_control_vector(tmp_path / "t.gguf")
    # the length of a bool array flipped to 2**40: gguf's own reader loops without end on this file
    i = good.index(b"test.flags") + len(b"test.flags") + 4 + 4
    flipped = bytearray(good)
    flipped[i:i + 8] = (2**40).to_bytes(8, "little")
    (tmp_path / "f.gguf").write_bytes(bytes(flipped))
    err = _finishes(import_control_vector, tmp_path / "f.gguf")
    assert isinstance(err, ArtifactError)
    assert "truncated" in str(err)


def test_gguf_export_refuses_overflowing_vectors(tmp_path):
    with pytest.raises(SteerableError, match="not a finite"):
        export_control_vector(small_set(), tmp_path / "cv.gguf", strength=1e39)
    assert not (tmp_path / "cv.gguf").exists()


def test_gguf_all_zero_vectors(tmp_path):
    path = write_gguf(tmp_path / "z.gguf", {"direction.1": np.zeros(8, dtype=np.float32)})
    with pytest.raises(ArtifactError, match=r"every direction\.N tensor is zero"):
        import_control_vector(path)


def test_imported_vectors_stay_loadable(tmp_path):
    ds = import_control_vector(write_gguf(tmp_path / "cv.gguf", {"direction.1": vec(), "direction.3": vec(seed=1)}))
    back = load_directions(save_directions(ds, tmp_path / "cv.safetensors"))
    assert back.layers == [1, 3]
    assert math.isnan(back.percentile(1, "pos", 50))
    inspect_table(back)


# -- fuzzing ----------------------------------------------------------------------------------------------

_mutations = st.tuples(
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),  # (where, xor)
    st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),  # truncate at
    st.booleans(),  # aim at the header
)


def _mutate(data: bytes, mutation: tuple[list[tuple[float, int]], float | None, bool], head: int) -> bytes:
    flips, cut, in_head = mutation
    out = bytearray(data)
    span = head if in_head else len(out)
    for where, xor in flips:
        out[int(where * span)] ^= xor
    if cut is not None:
        out = out[: int(cut * len(out))]
    return bytes(out)


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_fuzz_artifact_bytes(tmp_path):
    good = save_directions(small_set(), tmp_path / "good.safetensors").read_bytes()
    head = 8 + int.from_bytes(good[:8], "little")
    target = tmp_path / "m.safetensors"

    @_FUZZ
    @given(_mutations)
    def check(mutation: tuple[list[tuple[float, int]], float | None, bool]) -> None:
        target.write_bytes(_mutate(good, mutation, head))
        valid_or_artifact_error(load_directions, target)
    check()


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_KEYS = ["format", "format_version", "layers", "model", "site", "position", "estimator", "counts", "axis", "data",
         "name", "combined", "dropped", "skipped_layers", "model.name", "model.n_layers", "model.hidden_size",
         "model.config_hash", "axis.monitor_layer", "counts.heldout_pos", "condition", "condition.layer",
         "condition.threshold", "condition.score", "other"]


def test_fuzz_artifact_metadata(tmp_path):
    tensors = small_set().tensors()
    target = tmp_path / "m.safetensors"

    @_FUZZ
    @given(st.lists(st.tuples(st.sampled_from(_KEYS), _json), min_size=1, max_size=3))
    def check(changes: list[tuple[str, Any]]) -> None:
        meta = base_meta()
        meta["axis"] = {"monitor_layer": 2, "cap_layers": "2-3"}
        meta["condition"] = {"layer": 2, "score": "cast", "compare": ">", "threshold": 0.1}
        for key, value in changes:
            outer, _, inner = key.partition(".")
            if inner and isinstance(meta.get(outer), dict):
                meta[outer] = {**meta[outer], inner: value}
            else:
                meta[outer] = value
        write_raw(target, tensors, meta)
        valid_or_artifact_error(load_directions, target)
    check()


def test_fuzz_gguf_bytes(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", {"direction.1": vec(), "direction.2": vec(seed=1),
                                              "token_embd.weight": vec(16, seed=2)}, kv=True).read_bytes()
    head = good.index(b"direction.2") + 40  # the header, key-values and tensor infos
    target = tmp_path / "m.gguf"

    @_FUZZ
    @given(_mutations, st.booleans())
    def check(mutation: tuple[list[tuple[float, int]], float | None, bool], with_model: bool) -> None:
        target.write_bytes(_mutate(good, mutation, head))
        err = _finishes(valid_or_artifact_error, import_control_vector, target,
                        **({"model_meta": MODEL_META} if with_model else {}))
        if err is not None:
            raise err
    check()


def test_cli_import_gguf_checks_the_model(model_dir, tmp_path, capsys):
    out = tmp_path / "cv.safetensors"
    wide = write_gguf(tmp_path / "wide.gguf", {"direction.1": vec(288)})
    assert main(["import-gguf", str(wide), "--out", str(out), "--model", model_dir]) == 2
    assert "hidden size mismatch" in capsys.readouterr().err
    deep = write_gguf(tmp_path / "deep.gguf", {"direction.9": vec(32)})
    assert main(["import-gguf", str(deep), "--out", str(out), "--model", model_dir]) == 2
    assert "layer 9" in capsys.readouterr().err
    assert not out.exists()
    good = write_gguf(tmp_path / "good.gguf", {"direction.2": vec(32)})
    assert main(["import-gguf", str(good), "--out", str(out), "--model", model_dir]) == 0
    assert load_directions(out).layers == [2]
