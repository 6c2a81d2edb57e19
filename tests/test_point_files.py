"""utils.point_files: every format read and written back, every bad input named, colours scaled."""

import os

import laspy
import numpy as np
import pytest

from utils.ply import write_ply
from utils.point_files import (
    POINT_FILE_SUFFIXES,
    PointFile,
    PointFileError,
    colors_of,
    read_point_file,
    write_point_file,
)


def _cloud(n=40, seed=0):
    rng = np.random.default_rng(seed)
    # Millimetre values: exact through LAS's 1 mm scale and through "%.3f" text.
    points = np.round(rng.uniform(-20, 20, (n, 3)), 3) + (500000.0, 5000000.0, 300.0)
    return points, rng


def _write_las(path, points, rng, point_format=3, colors16=True):
    """A LAS / LAZ file written with laspy itself (not with the module under test)."""
    header = laspy.LasHeader(point_format=point_format, version="1.2" if point_format < 6 else "1.4")
    header.scales = [0.001, 0.001, 0.001]
    header.offsets = np.floor(points.min(0))
    header.add_extra_dims([laspy.ExtraBytesParams(name="confidence", type=np.float32)])
    las = laspy.LasData(header)
    las.x, las.y, las.z = points[:, 0], points[:, 1], points[:, 2]
    n = len(points)
    fields = {
        "classification": rng.integers(0, 7, n).astype(np.uint8),
        "intensity": rng.integers(0, 65536, n).astype(np.uint16),
        "confidence": rng.uniform(0, 1, n).astype(np.float32),
    }
    if point_format in (2, 3, 7):
        top = 65536 if colors16 else 256
        fields.update({c: rng.integers(0, top, n).astype(np.uint16) for c in ("red", "green", "blue")})
    for name, values in fields.items():
        setattr(las, name, values)
    las.write(str(path))
    return fields


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_las_and_laz_written_by_laspy_read_with_every_dimension(tmp_path, suffix):
    points, rng = _cloud()
    path = tmp_path / f"tile{suffix}"
    fields = _write_las(path, points, rng)
    cloud = read_point_file(path)
    assert isinstance(cloud, PointFile) and cloud.path == path and cloud.las_header is not None
    assert cloud.points.dtype == np.float64 and cloud.points.shape == (40, 3)
    np.testing.assert_allclose(cloud.points, points, atol=1e-6)
    for name, values in fields.items():
        np.testing.assert_array_equal(cloud.fields[name], values)
    assert {"return_number", "gps_time", "point_source_id"} <= set(cloud.fields)
    assert not {"x", "y", "z", "X", "Y", "Z"} & set(cloud.fields)
    rgb = np.stack([fields[c] for c in ("red", "green", "blue")], 1)
    np.testing.assert_allclose(colors_of(cloud), rgb / 65535, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_las_round_trip_keeps_the_header_and_maps_fields(tmp_path, suffix):
    points, rng = _cloud()
    source = tmp_path / f"in{suffix}"
    _write_las(source, points, rng)
    cloud = read_point_file(source)
    preds = rng.integers(0, 5, len(points))
    probs = rng.uniform(0, 1, len(points))
    out = write_point_file(
        tmp_path / f"out{suffix}",
        cloud.points,
        {"classification": preds, "prob_tree": probs, "red": cloud.fields["red"]},
        las_header=cloud.las_header,
    )
    assert out == tmp_path / f"out{suffix}"
    back = read_point_file(out)
    np.testing.assert_allclose(back.points, points, atol=1e-6)
    np.testing.assert_array_equal(back.fields["classification"], preds)
    np.testing.assert_array_equal(back.fields["red"], cloud.fields["red"])
    np.testing.assert_allclose(back.fields["prob_tree"], probs)
    assert back.las_header.point_format.id == 3
    np.testing.assert_allclose(back.las_header.scales, cloud.las_header.scales)
    np.testing.assert_allclose(back.las_header.offsets, cloud.las_header.offsets)
    assert laspy.read(out).header.are_points_compressed == (suffix == ".laz")
    assert sorted(os.listdir(tmp_path)) == sorted([f"in{suffix}", f"out{suffix}"])  # no temporary left


def test_las_written_without_a_template(tmp_path):
    points, rng = _cloud()
    labels = rng.integers(0, 200, len(points))
    write_point_file(tmp_path / "a.las", points, {"classification": labels, "score": labels / 200.0})
    back = read_point_file(tmp_path / "a.las")
    assert back.las_header.point_format.id == 6  # no colours: LAS 1.4 format 6 (classification: a byte)
    np.testing.assert_allclose(back.points, points, atol=1e-6)
    np.testing.assert_array_equal(back.fields["classification"], labels)
    rgb = {c: np.full(len(points), 9, np.uint16) for c in ("red", "green", "blue")}
    write_point_file(tmp_path / "b.laz", points, rgb)
    assert read_point_file(tmp_path / "b.laz").las_header.point_format.id == 7


def test_las_writer_rejects_values_that_do_not_fit(tmp_path):
    points, _ = _cloud(5)
    with pytest.raises(ValueError, match="classification"):
        write_point_file(tmp_path / "a.las", points, {"classification": np.array([0, 1, 2, 3, 256])})
    with pytest.raises(ValueError, match="classification.*integers"):
        write_point_file(tmp_path / "a.las", points, {"classification": np.array([0, 1, 2, 3, 1.5])})
    with pytest.raises(ValueError, match="collides"):
        write_point_file(tmp_path / "a.ply", points, {"x": np.zeros(5)})
    with pytest.raises(ValueError, match=r"shape \[5\]"):
        write_point_file(tmp_path / "a.las", points, {"label": np.zeros(4)})
    with pytest.raises(ValueError, match="not '.txt'"):
        write_point_file(tmp_path / "a.txt", points, {})
    assert not list(tmp_path.iterdir())


def test_interrupted_las_write_leaves_no_file(tmp_path, monkeypatch):
    points, _ = _cloud(5)
    write_point_file(tmp_path / "old.las", points, {})

    def interrupted(self, destination, **kwargs):
        destination.write(b"LASF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(laspy.LasData, "write", interrupted)
    for name in ("new.las", "old.las"):
        with pytest.raises(KeyboardInterrupt):
            write_point_file(tmp_path / name, points, {"classification": np.ones(5, int)})
    assert os.listdir(tmp_path) == ["old.las"]
    monkeypatch.undo()
    assert "classification" in read_point_file(tmp_path / "old.las").fields  # the old file is intact
    assert not read_point_file(tmp_path / "old.las").fields["classification"].any()


def test_interrupted_ply_write_leaves_no_file(tmp_path, monkeypatch):
    points, _ = _cloud(5)

    def interrupted(source, destination):
        raise KeyboardInterrupt

    monkeypatch.setattr("utils.ply.os.replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_point_file(tmp_path / "a.ply", points, {"label": np.zeros(5, np.int32)})
    assert not list(tmp_path.iterdir())


def test_ply_round_trip_keeps_every_field(tmp_path):
    points, rng = _cloud()
    fields = {
        "red": rng.integers(0, 256, 40).astype(np.uint8),
        "scalar_height": rng.normal(size=40),
        "label": rng.integers(0, 3, 40).astype(np.int32),
    }
    write_point_file(tmp_path / "a.ply", points, fields)
    back = read_point_file(tmp_path / "a.ply")
    np.testing.assert_array_equal(back.points, points)  # written as doubles
    assert back.las_header is None and sorted(back.fields) == sorted(fields)
    for name, values in fields.items():
        np.testing.assert_array_equal(back.fields[name], values)
        assert back.fields[name].dtype == values.dtype
    write_ply(
        tmp_path / "f.ply",
        {
            "x": points[:, 0].astype(np.float32),
            "y": points[:, 1].astype(np.float32),
            "z": points[:, 2].astype(np.float32),
        },
    )
    assert read_point_file(tmp_path / "f.ply").points.dtype == np.float64


def test_text_files_with_and_without_names(tmp_path):
    points, rng = _cloud(6)
    colors = rng.integers(0, 256, (6, 3))
    labels = rng.integers(0, 3, 6)
    rows = [
        f"{x:.3f},{y:.3f},{z:.3f},{r},{g},{b},{k}" for (x, y, z), (r, g, b), k in zip(points, colors, labels)
    ]
    (tmp_path / "a.csv").write_text("X,Y,Z,Red,Green,Blue,label\n" + "\n".join(rows) + "\n")
    cloud = read_point_file(tmp_path / "a.csv")
    np.testing.assert_array_equal(cloud.points, points)
    assert sorted(cloud.fields) == ["blue", "green", "label", "red"]
    np.testing.assert_array_equal(cloud.fields["label"], labels)
    np.testing.assert_allclose(colors_of(cloud), colors / 255, rtol=1e-6)

    # Whitespace, a comment, a blank line, default names; then the same named by ``columns``.
    body = (
        "# scanner export\n"
        + "\n".join(r.replace(",", " ") for r in rows[:3])
        + "\n\n"
        + "\n".join(r.replace(",", "\t") for r in rows[3:])
        + "\n"
    )
    (tmp_path / "b.xyz").write_text(body)
    cloud = read_point_file(tmp_path / "b.xyz")
    np.testing.assert_array_equal(cloud.points, points)
    assert sorted(cloud.fields) == ["column_3", "column_4", "column_5", "column_6"]
    np.testing.assert_array_equal(cloud.fields["column_6"], labels)
    named = read_point_file(tmp_path / "b.xyz", ["x", "y", "z", "r", "g", "b"])
    assert sorted(named.fields) == ["b", "column_6", "g", "r"]  # a column beyond those named keeps its number
    np.testing.assert_allclose(colors_of(named), colors / 255, rtol=1e-6)
    (tmp_path / "c.txt").write_text(body)
    z_first = read_point_file(tmp_path / "c.txt", ["z", "y", "x", "red", "green", "blue", "label"])
    np.testing.assert_array_equal(z_first.points, points[:, ::-1])


def test_npy_plain_and_structured(tmp_path):
    points, rng = _cloud(8)
    labels = rng.integers(0, 4, 8)
    np.save(tmp_path / "a.npy", np.concatenate([points, labels[:, None]], 1))
    cloud = read_point_file(tmp_path / "a.npy", ["x", "y", "z", "label"])
    np.testing.assert_array_equal(cloud.points, points)
    np.testing.assert_array_equal(cloud.fields["label"], labels)
    assert list(read_point_file(tmp_path / "a.npy").fields) == ["column_3"]
    table = np.zeros(8, [("x", "f8"), ("y", "f8"), ("z", "f8"), ("intensity", "u2")])
    for i, c in enumerate("xyz"):
        table[c] = points[:, i]
    table["intensity"] = np.arange(8)
    np.save(tmp_path / "s.npy", table)
    cloud = read_point_file(tmp_path / "s.npy")
    np.testing.assert_array_equal(cloud.points, points)
    np.testing.assert_array_equal(cloud.fields["intensity"], np.arange(8))


def test_colors_scaling():
    n = 4
    points = np.zeros((n, 3))

    def cloud(values, dtype, las=False):
        return PointFile(
            "c",
            points,
            {c: np.asarray(values, dtype) for c in ("red", "green", "blue")},
            las_header=object() if las else None,
        )

    np.testing.assert_allclose(
        colors_of(cloud([0, 1000, 30000, 65535], np.uint16, las=True)),
        np.repeat(np.array([0, 1000, 30000, 65535])[:, None] / 65535, 3, 1),
        rtol=1e-6,
    )
    # 8-bit values in LAS's 16-bit fields, as many writers store them.
    np.testing.assert_allclose(
        colors_of(cloud([0, 10, 200, 255], np.uint16, las=True))[:, 0],
        np.array([0, 10, 200, 255]) / 255,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        colors_of(cloud([0, 10, 200, 255], np.uint8))[:, 1], np.array([0, 10, 200, 255]) / 255, rtol=1e-6
    )
    kept = colors_of(cloud([0, 0.25, 0.5, 1], np.float32))
    assert kept.dtype == np.float32 and kept.shape == (n, 3)
    np.testing.assert_array_equal(kept[:, 2], [0, 0.25, 0.5, 1])
    np.testing.assert_allclose(
        colors_of(cloud([0, 2.0, 128.0, 255.0], np.float64))[:, 0], [0, 2 / 255, 128 / 255, 1]
    )
    assert colors_of(PointFile("c", points, {"red": np.zeros(n), "green": np.zeros(n)})) is None
    short_names = PointFile("c", points, {c: np.ones(n) * 9 for c in "rgb"})
    assert colors_of(short_names)[0, 0] == pytest.approx(9 / 255)
    with pytest.raises(PointFileError, match="colours"):
        colors_of(cloud([0, -1, 3, 4], np.float64))
    with pytest.raises(PointFileError, match="colours"):
        colors_of(cloud([0, np.nan, 3, 4], np.float64))


def _bad(path, match, columns=None):
    with pytest.raises(PointFileError, match=match) as info:
        read_point_file(path, columns)
    assert str(path) in str(info.value)
    return str(info.value)


def test_empty_files_of_every_format(tmp_path):
    for name in ("a.txt", "b.csv"):
        (tmp_path / name).write_text("")
        _bad(tmp_path / name, "no points")
    (tmp_path / "h.txt").write_text("x y z\n\n")
    _bad(tmp_path / "h.txt", "no points")
    write_ply(tmp_path / "a.ply", {"x": np.zeros(0), "y": np.zeros(0), "z": np.zeros(0)})
    _bad(tmp_path / "a.ply", "no points")
    np.save(tmp_path / "a.npy", np.zeros((0, 3)))
    _bad(tmp_path / "a.npy", "no points")
    laspy.LasData(laspy.LasHeader(point_format=3, version="1.2")).write(str(tmp_path / "a.las"))
    _bad(tmp_path / "a.las", "no points")


def test_non_finite_coordinates_name_the_point_and_line(tmp_path):
    (tmp_path / "a.txt").write_text("0 0 0\n\n1 1 1\n2 nan 2\n")
    _bad(tmp_path / "a.txt", r"point 2 \(line 4\): non-finite coordinates")
    (tmp_path / "b.csv").write_text("x,y,z\n0,0,0\n1,1,inf\n")
    _bad(tmp_path / "b.csv", r"point 1 \(line 3\): non-finite")
    write_ply(tmp_path / "a.ply", {"x": np.array([0.0, 1.0]), "y": np.array([0.0, np.inf]), "z": np.zeros(2)})
    _bad(tmp_path / "a.ply", "point 1: non-finite")
    np.save(tmp_path / "a.npy", np.array([[0, 0, 0], [1, 1, 1], [np.nan, 0, 0.0]]))
    _bad(tmp_path / "a.npy", "point 2: non-finite")


def test_fewer_columns_than_asked(tmp_path):
    (tmp_path / "a.txt").write_text("1 2 3 4\n")
    message = _bad(
        tmp_path / "a.txt",
        "line 1 has 4 columns, fewer than the 6 asked",
        ["x", "y", "z", "red", "green", "blue"],
    )
    assert "red, green, blue" in message
    (tmp_path / "b.txt").write_text("1 2 3 4\n5 6 7 8\n5 6 7\n")
    _bad(tmp_path / "b.txt", "line 3 has 3 columns, fewer than the 4 expected")
    (tmp_path / "c.xyz").write_text("1 2\n")
    _bad(tmp_path / "c.xyz", "line 1 has 2 columns, fewer than the 3 asked")
    (tmp_path / "d.txt").write_text("1 2 3\n1 2 oops\n")
    _bad(tmp_path / "d.txt", "line 2 is malformed")
    (tmp_path / "e.txt").write_text("x y z\n1 2 3\n1 2 3 4\n")
    _bad(tmp_path / "e.txt", "line 3 is malformed")
    np.save(tmp_path / "a.npy", np.zeros((3, 4)))
    _bad(tmp_path / "a.npy", "4 columns, fewer than the 5 asked", ["x", "y", "z", "red", "label"])
    np.save(tmp_path / "b.npy", np.zeros((3, 2)))
    _bad(tmp_path / "b.npy", "fewer than the 3")
    with pytest.raises(ValueError, match="x, y and z"):
        read_point_file(tmp_path / "a.npy", ["a", "b", "c"])


def test_unknown_missing_and_corrupt_files(tmp_path):
    (tmp_path / "a.e57").write_bytes(b"x")
    message = _bad(tmp_path / "a.e57", "unknown point file extension '.e57'")
    assert all(s in message for s in POINT_FILE_SUFFIXES)
    _bad(tmp_path / "missing.las", "no such file")
    (tmp_path / "a.las").write_bytes(b"LASF" + os.urandom(300))
    _bad(tmp_path / "a.las", "unreadable LAS/LAZ")
    (tmp_path / "b.laz").write_bytes(b"not a laz file at all")
    _bad(tmp_path / "b.laz", "unreadable LAS/LAZ")
    points, rng = _cloud()
    _write_las(tmp_path / "c.laz", points, rng)
    data = (tmp_path / "c.laz").read_bytes()
    (tmp_path / "c.laz").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "c.laz", "unreadable LAS/LAZ")
    write_point_file(tmp_path / "d.ply", points, {})
    data = (tmp_path / "d.ply").read_bytes()
    (tmp_path / "d.ply").write_bytes(data[:-10])
    _bad(tmp_path / "d.ply", "unreadable PLY.*truncated")
    (tmp_path / "e.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
        "property float y\nproperty float z\nend_header\n0 0 0\n1 1\n"
    )
    _bad(tmp_path / "e.ply", "unreadable PLY")
    (tmp_path / "f.ply").write_text("solid cube\n")
    _bad(tmp_path / "f.ply", "unreadable PLY")
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY garbage")
    _bad(tmp_path / "a.npy", "unreadable .npy")
    np.save(tmp_path / "b.npy", np.array(["a", "b", "c"]))
    _bad(tmp_path / "b.npy", "numeric array")
    (tmp_path / "g.txt").write_bytes(b"\xff\xfe\x00garbage\x00\n")
    _bad(tmp_path / "g.txt", "malformed|no points")
