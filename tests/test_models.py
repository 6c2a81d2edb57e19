"""Blocks and KP-CNN: the original checkpoint's outputs, every block, per-cloud independence, sizes."""

import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kpconv_tf import blocks, convert
from kpconv_tf.architecture import BLOCK_TYPES, BlockSpec, block_type
from kpconv_tf.config import Config, ConfigError
from kpconv_tf.models import KPCNN, build_network
from kpconv_tf.pyramid import build_pyramid
from training.trainer import l2_regularization

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "original_tf", "public")
RIGID = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "global_average",
]
# The paper's deformable KP-CNN: the last 5 KPConv blocks are deformable (supplementary A).
DEFORMABLE = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_strided",
    "resnetb_deformable",
    "resnetb_deformable_strided",
    "resnetb_deformable",
    "resnetb_deformable_strided",
    "resnetb_deformable",
    "global_average",
]


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def original():
    d = np.load(os.path.join(FIXTURES, "model_kpcnn.npz"))
    config = convert.config_from_original(os.path.join(FIXTURES, "model_kpcnn_parameters.txt"))
    model = convert.load_original_checkpoint(os.path.join(FIXTURES, "model_kpcnn_ckpt", "model.ckpt"), config)
    inputs = convert.inputs_from_original([d[n] for n in d["flat_input_names"]], config)
    return d, config, model, inputs


def test_config_from_original_parameters(original):
    _, config, _, _ = original
    assert config.model.architecture == RIGID[:7] + DEFORMABLE[7:]
    assert config.dataset.num_classes == 40 and config.model.first_features_dim == 16
    assert config.model.kp_influence == "linear" and config.model.convolution_mode == "sum"
    assert config.train.lr_decays[1] == pytest.approx(0.971628)
    assert config.model.num_layers == 5 and config.train.semantics == "original"


def test_checkpoint_import_reproduces_the_original(original):
    d, config, model, inputs = original
    for l in range(5):
        np.testing.assert_array_equal(inputs[f"lengths_{l}"], d[f"stack_lengths_{l}"])
    outputs = model.encode(inputs, training=False)
    assert len(outputs) == len(d["block_names"])
    for i, out in enumerate(outputs):
        assert rel_err(out, d[f"block_{i:02d}"]) < 1e-4, d["block_names"][i]
    logits = model(inputs, training=False)
    assert rel_err(logits, d["logits"]) < 1e-4
    assert float(tf.reduce_sum(model.losses)) == pytest.approx(float(d["offsets_loss"]), rel=1e-4)
    assert float(l2_regularization(model.variables, config.train.weights_decay)) == pytest.approx(
        float(d["regularization_loss"]), rel=1e-5
    )
    loss = model.output_loss(d["labels"], logits)
    assert float(loss) == pytest.approx(float(d["output_loss"]), rel=1e-4)


def test_kernel_points_come_from_the_checkpoint(original):
    _, _, model, _ = original
    reader = tf.train.load_checkpoint(os.path.join(FIXTURES, "model_kpcnn_ckpt", "model.ckpt"))
    mapping = convert.original_variable_map(model)
    name = "KernelPointNetwork/layer_2/resnetb_0/conv2/kernel_points"
    np.testing.assert_array_equal(mapping[name].numpy(), reader.get_tensor(name))
    assert len(mapping) == 188


def test_mismatched_checkpoint_lists_the_variables(original):
    _, config, _, _ = original
    other = Config.from_dict(config.to_dict(), ["model.first_features_dim=8"])
    with pytest.raises(ValueError, match="shape mismatch: KernelPointNetwork/layer_0/simple_0/weights"):
        convert.load_original_checkpoint(os.path.join(FIXTURES, "model_kpcnn_ckpt", "model.ckpt"), other)


def _config(arch, **model):
    return Config.from_dict(
        {
            "dataset": {"num_classes": 40},
            "model": {
                **dict(
                    architecture=arch,
                    first_features_dim=64,
                    density_parameter=5.0,
                    kp_influence="linear",
                    convolution_mode="sum",
                    kernel_seed=0,
                ),
                **model,
            },
        }
    )


@pytest.mark.parametrize("arch,expected", [(RIGID, 14.3e6), (DEFORMABLE, 15.2e6)])
def test_parameter_counts_match_table3(arch, expected):
    model = build_network(_config(arch))
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count == pytest.approx(expected, rel=0.005)


def _two_clouds(seed=0, sizes=(300, 420)):
    rng = np.random.default_rng(seed)
    clouds = []
    for n in sizes:
        p = rng.normal(size=(n, 3))
        clouds.append(
            (p / np.linalg.norm(p, axis=1, keepdims=True) * rng.uniform(0.3, 0.5)).astype(np.float32)
        )
    return clouds


def _batch(clouds, config):
    points = np.concatenate(clouds)
    lengths = np.array([len(c) for c in clouds], np.int32)
    return build_pyramid(points, lengths, np.ones((len(points), 1), np.float32), config.model)


SMALL_ARCHS = {
    "unary": ["simple", "unary", "resnetb_strided", "global_average"],
    "simple_strided": ["simple", "simple_strided", "resnetb", "global_average"],
    "resnetb_light": ["simple", "resnetb_light", "resnetb_light_strided", "resnetb_light", "global_average"],
    "max_pool": ["simple", "max_pool", "resnetb", "max_pool_wide", "resnetb_deformable", "global_average"],
    "deformable": ["simple", "resnetb_deformable", "resnetb_deformable_strided", "resnetb", "global_average"],
    "resnet_vgg": ["simple", "resnet", "resnetb_strided", "vgg", "resnet", "global_average"],
    "inception": [
        "simple",
        "inception_deformable",
        "inception_deformable_strided",
        "inception_deformable",
        "global_average",
    ],
}


@pytest.mark.parametrize("name", sorted(SMALL_ARCHS))
def test_every_block_runs_and_clouds_are_independent(name):
    config = _config(SMALL_ARCHS[name], first_features_dim=8, first_subsampling_dl=0.05)
    model = KPCNN(config)
    clouds = _two_clouds()
    logits = model(_batch(clouds, config), training=False)
    assert logits.shape == (2, 40) and np.all(np.isfinite(logits.numpy()))
    other = [clouds[0], _two_clouds(seed=5, sizes=(250,))[0]]
    changed = model(_batch(other, config), training=False)
    np.testing.assert_allclose(changed[0], logits[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(changed[1], logits[1])
    assert np.isfinite(float(tf.reduce_sum(model.losses)))


def test_upsampling_blocks_run():
    config = _config(
        ["simple", "resnetb_strided", "resnetb", "nearest_upsample", "unary"],
        first_features_dim=8,
        first_subsampling_dl=0.05,
    )
    inputs = _batch(_two_clouds(), config)
    for name in ("nearest_upsample", "simple_upsample", "resnetb_upsample"):
        block = blocks.make_block(_spec(name), config, "kpfcnn")
        out = block(tf.ones([int(inputs["points_1"].shape[0]), 16]), inputs)
        assert out.shape[0] == inputs["points_0"].shape[0]


def _spec(name, layer=1, radius=0.5, fdim=8):
    kind = block_type(name)
    out = 16 if kind.width is None else kind.width * fdim
    return BlockSpec(name, kind, kind.kind == "upsample", layer, 0, radius, radius / 5, fdim, 16, out)


def test_unknown_block():
    with pytest.raises(ValueError, match="unknown block"):
        block_type("resnext")
    with pytest.raises(ConfigError, match=r"model.architecture\[1\] must be one of"):
        _config(["simple", "resnext", "global_average"])


def test_every_original_block_name_is_available():
    names = [
        "unary",
        "simple",
        "simple_strided",
        "resnet",
        "resnetb",
        "resnetb_light",
        "resnetb_strided",
        "resnetb_light_strided",
        "resnetb_deformable",
        "resnetb_deformable_strided",
        "inception_deformable",
        "inception_deformable_strided",
        "vgg",
        "max_pool",
        "max_pool_wide",
        "global_average",
        "nearest_upsample",
        "simple_upsample",
        "resnetb_upsample",
    ]
    assert sorted(names) == sorted(BLOCK_TYPES)
    for name in names:
        block = blocks.make_block(_spec(name), _config(RIGID), "kpcnn")
        assert block.block_type == name and block.name == f"{_spec(name).scope.replace('/', '_')}"


S3DIS_LIKE = [
    "simple",
    "resnetb",
    "resnetb_strided",
    "resnetb",
    "resnetb_deformable_strided",
    "resnetb_deformable",
    "nearest_upsample",
    "unary",
    "nearest_upsample",
    "unary",
]


def test_kpfcnn_runs_per_point_and_maps_original_names():
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 7},
            "model": dict(
                network_model="segmentation",
                architecture=S3DIS_LIKE,
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
                kernel_seed=1,
            ),
        }
    )
    model = build_network(config)
    clouds = _two_clouds()
    inputs = _batch(clouds, config)
    logits = model(inputs, training=False)
    assert logits.shape == (sum(len(c) for c in clouds), 7)
    assert np.all(np.isfinite(logits.numpy())) and np.isfinite(float(tf.reduce_sum(model.losses)))
    names = convert.original_variable_map(model)
    assert "KernelPointNetwork/uplayer_1/unary_0/weights" in names
    assert "KernelPointNetwork/head_unary_conv/batch_normalization/gamma" in names
    # Decoder skip: uplayer_1 unary sees 64 upsampled + 32 skip channels of layer 1.
    assert names["KernelPointNetwork/uplayer_1/unary_0/weights"].shape == (64 + 32, 16)
    other = [clouds[0], _two_clouds(seed=9, sizes=(200,))[0]]
    changed = model(_batch(other, config), training=False)
    n0 = len(clouds[0])
    np.testing.assert_allclose(changed[:n0], logits[:n0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", [*SMALL_ARCHS.values(), S3DIS_LIKE], ids=[*SMALL_ARCHS, "s3dis_like"])
def test_block_specs_give_every_blocks_widths_and_scope(arch):
    network_model = "segmentation" if "nearest_upsample" in arch else "classification"
    config = _config(arch, first_features_dim=8, first_subsampling_dl=0.05, network_model=network_model)
    config.dataset.num_classes = 7
    model = build_network(config)
    inputs = _batch(_two_clouds(), config)
    _, outputs = model.run_blocks(inputs)
    width = config.dataset.in_features_dim
    for (spec, block), out in zip(model.blocks_with_specs(), outputs, strict=True):
        assert spec.scope.replace("/", "_") == block.name and spec.name == block.block_type
        assert spec.in_width == width, spec
        assert out.shape[-1] == spec.out_width, spec
        width = spec.out_width + (0 if spec.concat_skip is None else _skip_width(model, spec.concat_skip))


def _skip_width(model, layer):
    """Width of the features entering the encoder block that ends ``layer``."""
    ending = [
        spec for spec, _ in model.blocks_with_specs() if not spec.decoder and spec.kind in ("strided", "pool")
    ]
    return ending[layer].in_width


@pytest.mark.parametrize("arch_name,expected", [("rigid", 14.1e6), ("deformable", 14.9e6)])
def test_kpfcnn_parameter_counts_match_table3_scenes(arch_name, expected):
    # Scannet / Semantic3D configuration of Table 3 (first_features_dim 64, 5 layers).
    encoder = RIGID[:-1] if arch_name == "rigid" else DEFORMABLE[:-1]
    decoder = ["nearest_upsample", "unary"] * 4
    config = Config.from_dict(
        {
            "dataset": {"num_classes": 20, "in_features_dim": 4},
            "model": dict(
                network_model="segmentation",
                architecture=encoder + decoder,
                first_features_dim=64,
                density_parameter=5.0,
                kernel_seed=0,
            ),
        }
    )
    model = build_network(config)
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert count == pytest.approx(expected, rel=0.01)


def test_convert_cli_writes_config_and_weights(original, tmp_path):
    d, config, model, inputs = original
    run = tmp_path / "Log_original"
    (run / "snapshots").mkdir(parents=True)
    for suffix in ("index", "data-00000-of-00001"):
        src = os.path.join(FIXTURES, "model_kpcnn_ckpt", f"model.ckpt.{suffix}")
        (run / "snapshots" / f"snap-7.{suffix}").write_bytes(Path(src).read_bytes())
    (run / "parameters.txt").write_text(Path(FIXTURES, "model_kpcnn_parameters.txt").read_text())
    convert.main([str(run), str(tmp_path / "out")])
    restored_config = Config.from_yaml(tmp_path / "out" / "config.yaml")
    assert restored_config.to_dict() == config.to_dict()
    restored = build_network(restored_config)
    restored.load_weights(tmp_path / "out" / "model.weights.h5")
    np.testing.assert_allclose(restored(inputs), model(inputs), rtol=1e-6, atol=1e-6)


def test_multi_head_part_segmentation_uses_each_clouds_head():
    config = Config.from_dict(
        {
            "dataset": {"num_classes": [4, 2, 3]},
            "model": dict(
                network_model="multi_segmentation",
                architecture=S3DIS_LIKE,
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
                kernel_seed=1,
            ),
        }
    )
    model = build_network(config)
    clouds = _two_clouds()
    inputs = dict(_batch(clouds, config))
    inputs["object_labels"] = tf.constant([2, 0], tf.int32)
    logits = model(inputs, training=False)
    assert logits.shape == (sum(len(c) for c in clouds), 4)
    # Swapping the first cloud's category changes only its points' logits.
    swapped = dict(inputs, object_labels=tf.constant([1, 0], tf.int32))
    other = model(swapped, training=False)
    n0 = len(clouds[0])
    assert not np.allclose(other[:n0], logits[:n0])
    np.testing.assert_allclose(other[n0:], logits[n0:], rtol=1e-6, atol=1e-6)
    names = convert.original_variable_map(model)
    assert names["KernelPointNetwork/softmax/weights"].shape == (3, 8, 4)
    assert names["KernelPointNetwork/head_unary_conv/weights"].shape[1] == 24


def test_inputs_from_original_segmentation_order():
    config = Config.from_dict(
        {
            "dataset": {"num_classes": [3, 2]},
            "model": dict(
                network_model="multi_segmentation",
                architecture=S3DIS_LIKE,
                first_features_dim=8,
                first_subsampling_dl=0.05,
                density_parameter=5.0,
            ),
        }
    )
    clouds = _two_clouds()
    ours = _batch(clouds, config)
    L = config.model.num_layers
    n0 = int(ours["points_0"].shape[0])
    lengths = ours["lengths_0"].numpy()
    in_batches = np.full((2, lengths.max()), n0, np.int32)
    for b, (start, n) in enumerate(zip([0, lengths[0]], lengths)):
        in_batches[b, :n] = np.arange(start, start + n)
    point_objects = np.repeat([1, 0], lengths).astype(np.int32)
    flat = (
        [ours[f"points_{l}"] for l in range(L)]
        + [ours[f"neighbors_{l}"] for l in range(L)]
        + [ours[f"pools_{l}"] if l < L - 1 else np.zeros((0, 1), np.int32) for l in range(L)]
        + [ours[f"upsamples_{l}"] if l < L - 1 else np.zeros((0, 1), np.int32) for l in range(L)]
        + [
            ours["features"],
            np.ones(n0, np.float32),
            in_batches,
            in_batches,
            np.zeros(n0, np.int32),
            point_objects,
            np.ones((2, 3), np.float32),
            np.eye(3)[None].repeat(2, 0),
            np.arange(2),
        ]
    )
    inputs = convert.inputs_from_original(flat, config)
    for key, value in ours.items():
        np.testing.assert_array_equal(inputs[key], value)
    np.testing.assert_array_equal(inputs["object_labels"], [1, 0])


@pytest.mark.parametrize("name", ["max_pool", "inception"])
def test_fused_and_standard_ops_train_alike(name):
    """A training forward and its gradients with the compiled ops (KPConv, max pool, batch norm) and
    after ``use_standard_ops()``, on the same weights; then no layer is left on the compiled ops."""
    keras.utils.set_random_seed(0)
    config = _config(SMALL_ARCHS[name], first_features_dim=8, first_subsampling_dl=0.05)
    model = KPCNN(config)
    # six clouds: the fc batch norm's statistics over B clouds amplify rounding less than over two
    inputs = _batch(_two_clouds(seed=3, sizes=(300, 420, 250, 380, 330, 270)), config)
    model(inputs, training=False)
    dropout_uniform = tf.random.stateless_uniform([6, 1024], seed=[0, 1])

    def step():
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True, dropout_uniform=dropout_uniform)
            loss = tf.reduce_sum(tf.square(logits))
        return [logits, *tape.gradient(loss, model.trainable_variables)], model.non_trainable_variables

    initial = [v.numpy() for v in model.non_trainable_variables]
    fused, fused_stats = step()
    fused_stats = [v.numpy() for v in fused_stats]
    for v, value in zip(model.non_trainable_variables, initial):
        v.assign(value)
    model.use_standard_ops()
    standard, standard_stats = step()
    # norm-wise (up to 4e-5 over seeds 0-5): the fc batch norm amplifies single entries' rounding
    for a, b in zip(fused + fused_stats, standard + [v.numpy() for v in standard_stats]):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b) + 1e-6, (a.shape, np.abs(a - b).max())
    implementations = {
        layer.implementation
        for _, block in model.blocks_with_specs()
        for layer in [block, *vars(block).values()]
        if hasattr(layer, "implementation")
    }
    assert implementations == {"standard"}
    assert model.fc_norm.implementation == "standard"
