"""Sphere sampling, potentials, voting, reprojection and prediction files (training/scenes.py)."""

import numpy as np
import pytest
from sklearn.neighbors import KDTree

from training.datasets.base import DatasetError, Scene
from training.scenes import (
    SceneVoter,
    SphereCrop,
    SphereSampler,
    features_for,
    semantic3d_submission_name,
    write_predictions,
)
from utils.ply import read_ply


def make_scene(seed, n=600, m=1500, extent=(3.0, 2.0, 1.0), labelled=True, num_classes=4, name=None):
    rng = np.random.default_rng(seed)
    full = (rng.random((m, 3)) * extent).astype(np.float32)
    points = full[rng.choice(m, n, replace=False)]
    # Projection: nearest subsampled point of every full point, by float64 brute force.
    d2 = ((full[:, None, :].astype(np.float64) - points[None].astype(np.float64)) ** 2).sum(-1)
    projection = np.argmin(d2, axis=1).astype(np.int32)
    labels = np.floor(points[:, 0] / extent[0] * num_classes).astype(np.int32) if labelled else None
    full_labels = labels[projection] if labelled else None
    return Scene(
        name=name or f"scene_{seed}",
        points=points,
        colors=rng.random((n, 3)).astype(np.float32),
        labels=labels,
        tree=KDTree(points),
        projection=projection,
        full_labels=full_labels,
        full_points_loader=lambda: full,
    )


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(1), make_scene(2, n=400, m=900), make_scene(3, n=300, m=700, labelled=False)]


def crops_equal(a: SphereCrop, b: SphereCrop):
    return (
        a.scene_index == b.scene_index
        and np.array_equal(a.input_indices, b.input_indices)
        and np.array_equal(a.points, b.points)
        and np.array_equal(a.center, b.center)
    )


@pytest.mark.parametrize("mode", ["random", "potentials"])
def test_sampler_is_deterministic_in_seed(scenes, mode):
    a = SphereSampler(scenes, 0.5, mode, seed=7)
    b = SphereSampler(scenes, 0.5, mode, seed=7)
    c = SphereSampler(scenes, 0.5, mode, seed=8)
    seq_a = [a.sample() for _ in range(15)]
    seq_b = [b.sample() for _ in range(15)]
    seq_c = [c.sample() for _ in range(15)]
    assert all(crops_equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not all(crops_equal(x, y) for x, y in zip(seq_a, seq_c))


@pytest.mark.parametrize("mode", ["random", "potentials"])
def test_state_round_trip_resumes_the_same_sequence(scenes, mode):
    a = SphereSampler(scenes, 0.4, mode, seed=3)
    for _ in range(10):
        a.sample()
    state = a.get_state()
    expected = [a.sample() for _ in range(10)]
    b = SphereSampler(scenes, 0.4, mode, seed=99)
    b.set_state(state)
    resumed = [b.sample() for _ in range(10)]
    assert all(crops_equal(x, y) for x, y in zip(expected, resumed))
    # The state is a copy: sampling after get_state does not alter it.
    c = SphereSampler(scenes, 0.4, mode, seed=1)
    c.set_state(state)
    assert crops_equal(c.sample(), expected[0])


def test_crops_hold_exactly_the_points_within_the_radius(scenes):
    radius = 0.45
    sampler = SphereSampler(scenes, radius, "potentials", seed=0)
    seen_scenes = set()
    for _ in range(30):
        crop = sampler.sample()
        scene = scenes[crop.scene_index]
        seen_scenes.add(crop.scene_index)
        d = np.linalg.norm(scene.points.astype(np.float64) - crop.center.astype(np.float64), axis=1)
        inside = set(np.flatnonzero(d <= radius - 1e-5))
        border = set(np.flatnonzero(np.abs(d - radius) < 1e-5))
        got = set(crop.input_indices.tolist())
        assert inside <= got <= inside | border
        assert len(got) == len(crop.input_indices) > 0
        assert crop.input_indices.dtype == np.int32
        assert crop.points.dtype == np.float32 and crop.colors.dtype == np.float32
        np.testing.assert_allclose(crop.points, scene.points[crop.input_indices] - crop.center, atol=1e-6)
        np.testing.assert_array_equal(crop.colors, scene.colors[crop.input_indices])
        np.testing.assert_array_equal(crop.heights, scene.points[crop.input_indices, 2])
        if scene.labels is None:
            assert crop.labels is None
        else:
            np.testing.assert_array_equal(crop.labels, scene.labels[crop.input_indices])
        # The centre is a scene point moved by noise of std radius / 10.
        nearest = np.min(np.linalg.norm(scene.points - crop.center, axis=1))
        assert nearest < radius
    assert seen_scenes == {0, 1, 2}


def test_potentials_follow_the_tukey_update(scenes):
    radius = 0.5
    sampler = SphereSampler(scenes, radius, "potentials", seed=4)
    for _ in range(5):
        sampler.sample()
    before = [p.copy() for p in sampler.potentials]
    expected_scene = int(np.argmin([p.min() for p in before]))
    crop = sampler.sample()
    assert crop.scene_index == expected_scene
    # The picked point was the scene's minimum: the centre lies within the noise of it.
    lowest = scenes[expected_scene].points[np.argmin(before[expected_scene])]
    assert np.linalg.norm(crop.center - lowest) < radius
    d2 = np.sum((scenes[expected_scene].points.astype(np.float64) - crop.center.astype(np.float64)) ** 2, 1)
    weights = np.where(d2 <= radius**2, (1 - d2 / radius**2) ** 2, 0.0)
    np.testing.assert_allclose(
        sampler.potentials[expected_scene], before[expected_scene] + weights, atol=1e-5
    )
    for i in range(len(scenes)):
        if i != expected_scene:
            np.testing.assert_array_equal(sampler.potentials[i], before[i])


def test_min_potential_rises_until_every_point_is_covered(scenes):
    sampler = SphereSampler(scenes, 0.6, "potentials", seed=0)
    assert 0 <= sampler.min_potential() < 1e-3
    covered = [np.zeros(len(s.points), bool) for s in scenes]
    history = [sampler.min_potential()]
    steps = 0
    while sampler.min_potential() < 1.0:
        crop = sampler.sample()
        covered[crop.scene_index][crop.input_indices] = True
        history.append(sampler.min_potential())
        steps += 1
        assert steps < 2000
    assert all(c.all() for c in covered)
    assert np.all(np.diff(history) >= 0)
    assert sampler.min_potential() == min(p.min() for p in sampler.potentials)


def test_random_mode_leaves_potentials_and_spreads_over_scenes(scenes):
    sampler = SphereSampler(scenes, 0.3, "random", seed=5)
    start = [p.copy() for p in sampler.potentials]
    picked = {sampler.sample().scene_index for _ in range(40)}
    assert picked == {0, 1, 2}
    for a, b in zip(start, sampler.potentials):
        np.testing.assert_array_equal(a, b)


def test_max_points_keeps_a_random_subset(scenes):
    sampler = SphereSampler(scenes, 2.0, "potentials", seed=0, max_points=50)
    crop = sampler.sample()
    assert len(crop.input_indices) == 49
    assert len(np.unique(crop.input_indices)) == 49
    # The potentials still count the whole sphere.
    assert np.sum(sampler.potentials[crop.scene_index] > 1e-3) > 49


def test_features_for_stacks_the_original_columns():
    rng = np.random.default_rng(0)
    crop = SphereCrop(
        points=rng.random((6, 3)).astype(np.float32),
        colors=rng.random((6, 3)).astype(np.float32),
        heights=rng.random(6).astype(np.float32),
        labels=None,
        input_indices=np.arange(6, dtype=np.int32),
        scene_index=0,
        center=np.zeros(3, np.float32),
    )
    ones = np.ones((6, 1))
    np.testing.assert_array_equal(features_for(crop, 1), ones)
    np.testing.assert_array_equal(features_for(crop, 2), np.hstack([ones, crop.heights[:, None]]))
    np.testing.assert_array_equal(features_for(crop, 3), crop.colors)
    np.testing.assert_array_equal(features_for(crop, 4), np.hstack([ones, crop.colors]))
    np.testing.assert_array_equal(
        features_for(crop, 5), np.hstack([ones, crop.colors, crop.heights[:, None]])
    )
    np.testing.assert_array_equal(features_for(crop, 7), np.hstack([ones, crop.colors, crop.points]))
    dropped = np.zeros_like(crop.colors)
    np.testing.assert_array_equal(features_for(crop, 4, colors=dropped), np.hstack([ones, dropped]))
    assert features_for(crop, 5).dtype == np.float32
    with pytest.raises(ValueError, match="in_features_dim"):
        features_for(crop, 6)


def test_voter_running_average_by_hand(scenes):
    voter = SceneVoter(scenes, num_classes=3, smoothing=0.9)
    a = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    b = np.array([[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    voter.update(0, np.array([4, 7]), a)
    voter.update(0, np.array([7, 9]), b)
    p = voter.probs[0]
    np.testing.assert_allclose(p[4], 0.1 * a[0], rtol=1e-6)
    np.testing.assert_allclose(p[7], 0.9 * (0.1 * a[1]) + 0.1 * b[0], rtol=1e-6)
    np.testing.assert_allclose(p[9], 0.1 * b[1], rtol=1e-6)
    assert not p[[0, 1, 2, 3, 5, 6, 8]].any() and not voter.probs[1].any()
    preds = voter.predictions(0)
    assert preds.dtype == np.int32 and preds.shape == (len(scenes[0].points),)
    assert (preds[4], preds[7], preds[9]) == (1, 2, 2)
    # Default smoothing is the original's 0.98.
    assert SceneVoter(scenes, 3).smoothing == 0.98


def test_voter_reprojects_through_the_projection(scenes):
    voter = SceneVoter(scenes, num_classes=4)
    rng = np.random.default_rng(0)
    for i, scene in enumerate(scenes):
        voter.update(i, np.arange(len(scene.points)), rng.random((len(scene.points), 4)))
    for i, scene in enumerate(scenes):
        full = voter.full_predictions(i)
        assert full.shape == (len(scene.projection),)
        np.testing.assert_array_equal(full, voter.predictions(i)[scene.projection])
        full_points = scene.full_points()
        # Every full point takes the class of its nearest subsampled point (brute force).
        d2 = ((full_points[:, None].astype(np.float64) - scene.points[None].astype(np.float64)) ** 2).sum(-1)
        np.testing.assert_array_equal(full, voter.predictions(i)[np.argmin(d2, 1)])
    bare = Scene("bare", scenes[0].points, scenes[0].colors, None, scenes[0].tree)
    bare_voter = SceneVoter([bare], 4)
    bare_voter.update(0, [0, 1], np.eye(4)[[2, 3]])
    np.testing.assert_array_equal(bare_voter.full_predictions(0), bare_voter.predictions(0))


def test_voter_errors(scenes):
    voter = SceneVoter(scenes, 3)
    with pytest.raises(ValueError, match="probs"):
        voter.update(0, [0, 1], np.zeros((3, 3)))
    with pytest.raises(IndexError, match="scene_index"):
        voter.update(5, [0], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="smoothing"):
        SceneVoter(scenes, 3, smoothing=1.0)


def test_write_predictions_full_resolution(tmp_path, scenes):
    scene = scenes[0]
    rng = np.random.default_rng(1)
    m = len(scene.projection)
    names = ["wall", "floor", "table top", "chair"]
    probs = rng.random((m, 4)).astype(np.float32)
    preds = np.argmax(probs, 1).astype(np.int32)
    pots = rng.random(m)
    paths = write_predictions(
        tmp_path, scene, preds, names, probs=probs, formats=("ply", "npm3d", "semantic3d"), potentials=pots
    )
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "predictions/scene_1.ply",
        "probs/scene_1.ply",
        "predictions/scene_1.labels",
        "predictions/scene_1.txt",
    ]
    cloud = read_ply(paths[0])
    assert cloud.dtype.names == ("x", "y", "z", "preds", "labels", "pots")
    full = scene.full_points()
    np.testing.assert_array_equal(np.stack([cloud["x"], cloud["y"], cloud["z"]], 1), full)
    np.testing.assert_array_equal(cloud["preds"], preds)
    np.testing.assert_array_equal(cloud["labels"], scene.full_labels)
    np.testing.assert_allclose(cloud["pots"], pots.astype(np.float32))
    prob_cloud = read_ply(paths[1])
    assert prob_cloud.dtype.names == ("x", "y", "z", "wall", "floor", "table_top", "chair")
    np.testing.assert_array_equal(np.stack([prob_cloud[n] for n in prob_cloud.dtype.names[3:]], 1), probs)
    for path in paths[2:]:
        np.testing.assert_array_equal(np.loadtxt(path, dtype=np.int64), preds + 1)
        assert path.read_text().splitlines()[0] == str(preds[0] + 1)


def test_write_predictions_subsampled_and_unlabelled(tmp_path, scenes):
    scene = scenes[2]
    preds = np.arange(len(scene.points), dtype=np.int64) % 3
    [path] = write_predictions(tmp_path, scene, preds, ["a", "b", "c"])
    cloud = read_ply(path)
    assert cloud.dtype.names == ("x", "y", "z", "preds")
    np.testing.assert_array_equal(cloud["preds"], preds)
    np.testing.assert_array_equal(cloud["z"], scene.points[:, 2])


def test_write_predictions_errors(tmp_path, scenes):
    scene = scenes[0]
    with pytest.raises(ValueError, match="formats"):
        write_predictions(tmp_path, scene, np.zeros(len(scene.points), int), ["a"], formats=("las",))
    with pytest.raises(ValueError, match="predictions has 5 entries"):
        write_predictions(tmp_path, scene, np.zeros(5, int), ["a"])
    with pytest.raises(ValueError, match="predictions must lie"):
        write_predictions(tmp_path, scene, np.full(len(scene.points), 4), ["a", "b"])
    with pytest.raises(ValueError, match="probs"):
        write_predictions(
            tmp_path,
            scene,
            np.zeros(len(scene.points), int),
            ["a", "b"],
            probs=np.zeros((len(scene.points), 3)),
        )
    bare = Scene("bare", scene.points, scene.colors, None, scene.tree, projection=scene.projection)
    with pytest.raises(DatasetError, match="bare"):
        write_predictions(tmp_path, bare, np.zeros(len(scene.projection), int), ["a"])


def test_semantic3d_submission_names():
    table = {
        "MarketplaceFeldkirch_Station4_rgb_intensity-reduced.ply": "marketsquarefeldkirch4-reduced.labels",
        "sg27_station10_rgb_intensity-reduced.ply": "sg27_10-reduced.labels",
        "sg28_Station2_rgb_intensity-reduced.ply": "sg28_2-reduced.labels",
        "StGallenCathedral_station6_rgb_intensity-reduced.ply": "stgallencathedral6-reduced.labels",
        "birdfountain_station1_xyz_intensity_rgb.ply": "birdfountain1.labels",
        "castleblatten_station1_intensity_rgb.ply": "castleblatten1.labels",
        "castleblatten_station5_xyz_intensity_rgb.ply": "castleblatten5.labels",
        "marketplacefeldkirch_station7_intensity_rgb.ply": "marketsquarefeldkirch7.labels",
        "sg27_station3_intensity_rgb.ply": "sg27_3.labels",
        "sg28_station5_xyz_intensity_rgb.ply": "sg28_5.labels",
        "stgallencathedral_station1_intensity_rgb.ply": "stgallencathedral1.labels",
        "stgallencathedral_station3_intensity_rgb.ply": "stgallencathedral3.labels",
        "stgallencathedral_station6_intensity_rgb.ply": "stgallencathedral6.labels",
        "marketplacefeldkirch_station1_intensity_rgb.ply": "marketsquarefeldkirch1.labels",
        "marketplacefeldkirch_station4_intensity_rgb.ply": "marketsquarefeldkirch4.labels",
        "sg27_station6_intensity_rgb.ply": "sg27_6.labels",
        "sg27_station8_intensity_rgb.ply": "sg27_8.labels",
        "sg27_station10_intensity_rgb.ply": "sg27_10.labels",
        "sg28_station2_intensity_rgb.ply": "sg28_2.labels",
    }
    for source, expected in table.items():
        assert semantic3d_submission_name(source) == expected
        assert semantic3d_submission_name(source[:-4]) == expected


def test_sampler_errors(scenes):
    with pytest.raises(ValueError, match="in_radius"):
        SphereSampler(scenes, 0.0)
    with pytest.raises(ValueError, match="mode"):
        SphereSampler(scenes, 1.0, mode="grid")
    with pytest.raises(ValueError, match="scenes"):
        SphereSampler([], 1.0)
    with pytest.raises(TypeError, match=r"scenes\[0\]"):
        SphereSampler([np.zeros((3, 3))], 1.0)
    with pytest.raises(ValueError, match="max_points"):
        SphereSampler(scenes, 1.0, max_points=1)
    sampler = SphereSampler(scenes, 1.0)
    state = sampler.get_state()
    state["potentials"] = state["potentials"][:2]
    with pytest.raises(ValueError, match="potentials"):
        sampler.set_state(state)
