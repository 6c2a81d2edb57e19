"""SavedModel export: both signatures, reload in a fresh process, helpful error without the ops."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf.config import Config
from kpconv_tf.export import export_saved_model
from kpconv_tf.inputs import input_spec
from kpconv_tf.models import build_network
from kpconv_tf.pyramid import build_pyramid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = ["simple", "resnetb_strided", "resnetb_deformable", "global_average"]


@pytest.mark.slow
def test_export_round_trip_in_a_fresh_process(tmp_path):
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 5},
            "model": dict(
                architecture=ARCH,
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
                kernel_seed=3,
            ),
        }
    )
    model = build_network(config)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 3)).astype(np.float32) * 0.3
    lengths = np.array([200, 300], np.int32)
    features = np.ones((500, 1), np.float32)
    expected = tf.nn.softmax(model(build_pyramid(points, lengths, features, config.model))).numpy()
    export_saved_model(model, config, tmp_path / "saved")
    assert "import tf_custom_ops" in (tmp_path / "saved" / "README.txt").read_text()
    np.savez(tmp_path / "batch.npz", points=points, lengths=lengths, features=features)

    code = f"""
import json, numpy as np, tensorflow as tf
from kpconv_tf.export import load_exported
from kpconv_tf.pyramid import build_pyramid
from kpconv_tf.config import Config
d = np.load({str(tmp_path / "batch.npz")!r})
m = load_exported({str(tmp_path / "saved")!r})
raw = m.signatures['serving_default'](points=tf.constant(d['points']), features=tf.constant(d['features']),
                                      lengths=tf.constant(d['lengths']))['probabilities'].numpy()
print(json.dumps(raw.tolist()))
"""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reloaded = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(reloaded, expected, rtol=1e-5, atol=1e-6)

    # Without the ops registered, loading fails with TF's error naming our op.
    bare = f"import tensorflow as tf; tf.saved_model.load({str(tmp_path / 'saved')!r})"
    out = subprocess.run([sys.executable, "-c", bare], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "Kpconv" in out.stderr


def test_precomputed_signature_matches_the_model(tmp_path):
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 4},
            "model": dict(
                architecture=ARCH,
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
                kernel_seed=2,
            ),
        }
    )
    model = build_network(config)
    points = np.random.default_rng(1).normal(size=(300, 3)).astype(np.float32) * 0.3
    inputs = build_pyramid(points, np.array([300], np.int32), np.ones((300, 1), np.float32), config.model)
    export_saved_model(model, config, tmp_path / "saved")
    loaded = tf.saved_model.load(str(tmp_path / "saved"))  # the ops are registered in this process
    got = loaded.precomputed(inputs)["probabilities"]
    np.testing.assert_allclose(got, tf.nn.softmax(model(inputs)), rtol=1e-5, atol=1e-6)
    # The saved signature is the input layout's, key for key.
    (saved,), _ = loaded.precomputed.concrete_functions[0].structured_input_signature
    described = {key: (spec.shape.as_list(), spec.dtype) for key, spec in saved.items()}
    assert described == {key: (s.shape.as_list(), s.dtype) for key, s in input_spec(config).items()}


def test_keras_file_round_trip(tmp_path):
    import keras

    config = Config.from_dict(
        {
            "dataset": {"num_classes": 3},
            "model": dict(
                network_model="segmentation",
                architecture=["simple", "resnetb_deformable_strided", "resnetb", "nearest_upsample", "unary"],
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
                kernel_seed=4,
            ),
        }
    )
    model = build_network(config)
    points = np.random.default_rng(2).normal(size=(200, 3)).astype(np.float32) * 0.3
    inputs = build_pyramid(points, np.array([200], np.int32), np.ones((200, 1), np.float32), config.model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.config.to_dict() == config.to_dict()
    np.testing.assert_allclose(loaded(inputs), model(inputs), rtol=1e-6, atol=1e-6)
