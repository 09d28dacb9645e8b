"""llama.cpp control-vector export/import."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from steerable.data.loaders import Example
from steerable.directions.calibrate import calibrate
from steerable.directions.gguf_cv import export_control_vector, import_control_vector
from steerable.errors import ArtifactError, SteerableError

EX = [Example(p, None, i % 2, i // 2) for i, p in enumerate(["a b c", "d e", "f g h i", "j", "k l", "m n o"])]


def test_export_import_round_trip(llama, tmp_path):
    ds = calibrate(llama, EX, progress=False)
    path = export_control_vector(ds, tmp_path / "cv.gguf", strength=0.5)
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    names = sorted(t.name for t in reader.tensors)
    assert names == [f"direction.{i}" for i in (1, 2, 3)]  # llama.cpp never steers block 0
    back = import_control_vector(path)
    assert back.layers == [1, 2, 3]
    for layer in back.layers:
        want = 0.5 * ds.scales[ds.row(layer)] * ds.direction(layer)
        got = back.scales[back.row(layer)] * back.direction(layer)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_export_refuses_layer_zero_and_other_sites(llama, tmp_path):
    ds = calibrate(llama, EX, progress=False)
    with pytest.raises(SteerableError, match="layer 0"):
        export_control_vector(ds, tmp_path / "cv.gguf", layers=[0, 1])
    ds.meta["site"] = "attn_in"
    with pytest.raises(SteerableError, match="resid_post"):
        export_control_vector(ds, tmp_path / "cv.gguf")


def test_import_rejects_non_control_vectors(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ArtifactError, match="not a readable GGUF file"):
        import_control_vector(tmp_path / "x.gguf")


def _gguf(path, tensors):
    w = gguf.GGUFWriter(str(path), "controlvector")
    for name, vec in tensors.items():
        w.add_tensor(name, vec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_import_errors_are_artifact_errors(tmp_path):
    other = _gguf(tmp_path / "other.gguf", {"token_embd.weight": np.ones(4, dtype=np.float32)})
    with pytest.raises(ArtifactError, match=r"no direction\.N tensors"):
        import_control_vector(other)
    bad = np.ones(4, dtype=np.float32)
    bad[1] = np.nan
    nan = _gguf(tmp_path / "nan.gguf", {"direction.1": bad})
    with pytest.raises(ArtifactError, match=r"direction\.1 contains NaN or Inf"):
        import_control_vector(nan)
