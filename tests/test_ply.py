import numpy as np
import pytest

from utils.ply import PlyError, read_ply, write_ply


def test_round_trip_types(tmp_path):
    rng = np.random.default_rng(0)
    fields = {
        "x": rng.random(10).astype(np.float32),
        "y": rng.random(10),
        "red": np.arange(10, dtype=np.uint8),
        "class": np.arange(10, dtype=np.int32),
    }
    write_ply(tmp_path / "a.ply", fields)
    data = read_ply(tmp_path / "a.ply")
    for name, values in fields.items():
        np.testing.assert_array_equal(data[name], values)
        assert data[name].dtype == values.dtype


def test_ascii_and_errors(tmp_path):
    path = tmp_path / "b.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty int label\n"
        "end_header\n1.5 3\n-2 4\n"
    )
    data = read_ply(path)
    np.testing.assert_allclose(data["x"], [1.5, -2])
    np.testing.assert_array_equal(data["label"], [3, 4])
    (tmp_path / "c.ply").write_bytes(b"nope\n")
    with pytest.raises(PlyError, match="not a PLY"):
        read_ply(tmp_path / "c.ply")
    with pytest.raises(FileNotFoundError):
        read_ply(tmp_path / "missing.ply")
    with pytest.raises(ValueError, match="same length"):
        write_ply(tmp_path / "d.ply", {"x": np.zeros(3), "y": np.zeros(4)})
