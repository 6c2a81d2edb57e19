"""The KpconvBatchNorm op and its gradient against float64 references, and the BatchNorm layer's
fused training path against Keras's."""

import keras
import numpy as np
import tensorflow as tf
from layer_harness import run_layer_test

import tf_custom_ops
from kpconv_tf.batch_norm import BatchNorm

EPSILON = 1e-6


def reference(x, gamma, beta, dy):
    """float64 (y, mean, biased variance, dx, dgamma, dbeta)."""
    x, gamma, beta, dy = (np.asarray(a, np.float64) for a in (x, gamma, beta, dy))
    mean, variance = x.mean(axis=0), x.var(axis=0)
    inv = 1.0 / np.sqrt(variance + EPSILON)
    xhat = (x - mean) * inv
    dx = gamma * inv * (dy - dy.mean(axis=0) - xhat * (dy * xhat).mean(axis=0))
    return xhat * gamma + beta, mean, variance, dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def ours(x, gamma, beta, dy):
    x, gamma, beta = (tf.constant(a) for a in (x, gamma, beta))
    with tf.GradientTape() as tape:
        tape.watch([x, gamma, beta])
        y, mean, variance = tf_custom_ops.batch_norm(x, gamma, beta, EPSILON)
        loss = tf.reduce_sum(y * dy)
    return (y, mean, variance, *tape.gradient(loss, [x, gamma, beta]))


def _problem(rng, n, c, mean=0.0, scale=1.0):
    x = (rng.standard_normal((n, c)) * scale + mean).astype(np.float32)
    gamma = (rng.random(c) + 0.5).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    return x, gamma, beta, rng.standard_normal((n, c)).astype(np.float32)


class BatchNormOpTest(tf.test.TestCase):
    def test_matches_float64_reference(self):
        rng = np.random.default_rng(0)
        # several row blocks, a width off the vector width, a tiny batch, a large offset
        for n, c, mean, scale in [(3000, 37, 0.0, 1.0), (2, 5, 1.0, 2.0), (5000, 8, 100.0, 0.5)]:
            problem = _problem(rng, n, c, mean, scale)
            for got, want, name in zip(
                ours(*problem), reference(*problem), ["y", "mean", "var", "dx", "dg", "db"]
            ):
                atol = 1e-6 * max(1.0, float(np.abs(want).max()))
                self.assertAllClose(got, want, rtol=1e-5, atol=atol, msg=f"{name} of {(n, c, mean)}")

    def test_statistics_are_more_accurate_than_float32_reductions(self):
        rng = np.random.default_rng(1)
        x, gamma, beta, dy = _problem(rng, 100000, 16, mean=10.0, scale=0.1)
        want = reference(x, gamma, beta, dy)
        keras_mean, keras_variance = tf.nn.moments(tf.constant(x), [0])
        _, mean, variance, *_ = ours(x, gamma, beta, dy)
        for got, base, ref in [(mean, keras_mean, want[1]), (variance, keras_variance, want[2])]:
            self.assertLess(np.abs(got - ref).max(), np.abs(base.numpy() - ref).max())

    def test_one_row_and_no_rows(self):
        y, mean, variance, dx, dg, db = ours(*_problem(np.random.default_rng(2), 1, 3))
        self.assertAllEqual(variance, np.zeros(3))
        self.assertAllClose(dx, np.zeros((1, 3)))
        empty = ours(*_problem(np.random.default_rng(3), 0, 3))
        self.assertEqual(empty[0].shape, (0, 3))
        self.assertTrue(np.all(np.isnan(empty[1])))  # a mean over no rows, as Keras's

    def test_bad_input_names_the_argument(self):
        x = tf.ones([4, 3])
        with self.assertRaisesRegex((ValueError, tf.errors.InvalidArgumentError), "gamma|Dimensions"):
            tf_custom_ops.batch_norm(x, tf.ones([2]), tf.ones([3]), EPSILON)
        with self.assertRaisesRegex((ValueError, tf.errors.InvalidArgumentError), "rank|x must"):
            tf_custom_ops.batch_norm(tf.ones([4]), tf.ones([3]), tf.ones([3]), EPSILON)
        with self.assertRaisesRegex(ValueError, "epsilon"):
            tf_custom_ops.batch_norm(x, tf.ones([3]), tf.ones([3]), -1.0)
        with self.assertRaisesRegex(TypeError, "x must be float32"):
            tf_custom_ops.batch_norm(tf.ones([4, 3], tf.float64), tf.ones([3]), tf.ones([3]), EPSILON)
        grad_op = tf_custom_ops._ops.kpconv_batch_norm_grad
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "grad must have the shape of x"):
            grad_op(x, tf.ones([3]), tf.ones([3]), tf.ones([3]), tf.ones([2, 3]), epsilon=EPSILON)


def _layer_step(implementation, x, dy, momentum=0.9):
    layer = BatchNorm(implementation=implementation, momentum=momentum, epsilon=EPSILON)
    layer.build(x.shape)
    layer.gamma.assign(np.linspace(0.5, 1.5, x.shape[1]))
    layer.beta.assign(np.linspace(-1.0, 1.0, x.shape[1]))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(y * dy)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)]


class BatchNormLayerTest(tf.test.TestCase):
    def test_fused_training_matches_keras_and_float64(self):
        rng = np.random.default_rng(4)
        x, _, _, dy = _problem(rng, 2000, 12, mean=3.0, scale=2.0)
        fused, standard = _layer_step("fused", x, dy), _layer_step("standard", x, dy)
        # Keras's float32 chain is itself off float64 by ~5e-5 on dgamma here
        for got, want in zip(fused, standard):
            self.assertAllClose(got, want, rtol=2e-4, atol=1e-5)
        gamma, beta = np.linspace(0.5, 1.5, 12), np.linspace(-1.0, 1.0, 12)
        y, mean, variance, dx, dg, db = reference(x, gamma, beta, dy)
        moving_mean, moving_variance = 0.1 * mean, 0.9 + 0.1 * variance
        for got, want in zip(fused[:6], (y, dx, dg, db, moving_mean, moving_variance)):
            self.assertAllClose(got, want, rtol=1e-5, atol=1e-5)
        # inference uses the moving statistics (Keras's path either way)
        self.assertAllClose(fused[6], standard[6], rtol=1e-5, atol=1e-5)

    def test_round_trip_and_fallbacks(self):
        x = tf.constant(np.random.default_rng(5).standard_normal((50, 4)).astype(np.float32))
        run_layer_test(BatchNorm(implementation="fused", epsilon=EPSILON), (x,), {"training": False}, 2, 2)
        layer = BatchNorm(implementation="fused", synchronized=True, epsilon=EPSILON)
        standard = keras.layers.BatchNormalization(synchronized=True, epsilon=EPSILON)
        self.assertAllClose(layer(x, training=True), standard(x, training=True), rtol=1e-6, atol=1e-6)
        with self.assertRaisesRegex(ValueError, "implementation"):
            BatchNorm(implementation="gpu")


if __name__ == "__main__":
    tf.test.main()
