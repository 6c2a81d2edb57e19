"""The KPConv Keras layer (rigid and deformable)."""

from __future__ import annotations

import keras
import tensorflow as tf

from kpconv_tf import ops
from kpconv_tf.config import AGGREGATIONS, FIXED_MODES, INFLUENCES
from kpconv_tf.initializers import OriginalTruncatedNormal
from kpconv_tf.kernel_points import load_kernels
from kpconv_tf.losses import (
    OFFSET_LOSS_VARIANTS,
    deformable_offsets_loss,
    deformation_statistics,
    nearest_squared_distances,
)


@keras.saving.register_keras_serializable(package="kpconv_tf")
class KPConv(keras.layers.Layer):
    """Kernel point convolution.

    Called as ``layer(query_points, support_points, neighbors, features)`` with float32
    ``[Nq, 3]``, ``[Ns, 3]``, int32 ``[Nq, H]`` (shadow index Ns) and float32 ``[Ns, Din]``; returns
    float32 ``[Nq, filters]``. ``return_deformed=True`` (deformable only) also returns the deformed
    kernel points ``[Nq, K, 3]`` (for the offset losses and visualisation).

    Args:
      filters: Dout.
      kernel_size: number of kernel points K.
      extent: influence distance sigma of the kernel points (points' units); the kernel points lie
        at a mean radius of 1.5 * extent, as in the original.
      radius: the neighbourhood radius the neighbours were searched with (informational; the
        original derives extent = KP_extent * radius / density_parameter).
      influence: 'constant' | 'linear' | 'gaussian'. aggregation: 'sum' | 'closest'.
      fixed: kernel disposition constraint, 'center' | 'verticals' | 'none'.
      deformable: learn per-query offsets with an inner rigid KPConv (own zero-initialised
        ``offset_conv_weights`` [K, Din, 3K] and ``offset_conv_bias``, no batch norm); offsets are
        in units of ``extent``.
      modulated: deformable only; K extra offset channels give 2 * sigmoid modulations.
      offset_mode: 'kpconv' (the paper's offset KPConv) or 'mlp' (the original's
        ``KPConv_deformable_v2``, used by its inception blocks: a pointwise linear map
        ``offset_mlp_weights`` [Din, 3(K-1) | 4(K-1)] + ``offset_mlp_bias`` of the *query* features;
        the first kernel point never moves and, if modulated, gets modulation 0 as in the original).
      offset_bound: deformable only; > 0 bounds every offset coordinate to this many extents with
        ``bound * tanh(raw / bound)`` (slope 1 at zero, so small offsets are unchanged); 0 leaves
        them unbounded, as the original.
      offset_loss: deformable only; None, or the regularisation term this layer adds with
        ``add_loss`` at every call (``kpconv_tf.losses.OFFSET_LOSS_VARIANTS``), times
        ``offset_loss_weight``; 'permissive' and 'fitting' normalise by ``radius`` (required then),
        the others by ``extent``; ``repulse_extent`` is point2point's repulsion threshold. With a
        loss, ``deformation_statistics`` holds (mean offset norm in extents, share of lost kernel
        points) of the last call, float32 scalars.
      kernel_seed: seeds the kernel rotation/jitter (None: random, as the original).
      implementation: how the neighbour sums run (``kpconv_tf.ops``): 'auto' (default: the fused
        CPU op for float32 when no GPU is visible, standard TF ops otherwise), 'fused' or
        'standard' (standard TF ops only: any device, XLA).

    Variables carry the original's names: ``weights`` [K, Din, Dout], non-trainable
    ``kernel_points`` [K, 3] (saved with the weights, never regenerated on load). Gradients reach
    the features and the weights, never the point coordinates (data, as in the original).
    """

    def __init__(
        self,
        filters,
        kernel_size=15,
        extent=1.0,
        radius=None,
        influence="linear",
        aggregation="sum",
        fixed="center",
        deformable=False,
        modulated=False,
        kernel_seed=None,
        kernel_initializer=None,
        offset_mode="kpconv",
        implementation="auto",
        offset_bound=0.0,
        offset_loss=None,
        offset_loss_weight=1.0,
        repulse_extent=1.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(filters) < 1:
            raise ValueError(f"filters must be >= 1, got {filters}")
        if int(kernel_size) < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if not float(extent) > 0:
            raise ValueError(f"extent must be > 0, got {extent}")
        if influence not in INFLUENCES:
            raise ValueError(f"influence must be one of {INFLUENCES}, got {influence!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if fixed not in FIXED_MODES:
            raise ValueError(f"fixed must be one of {FIXED_MODES}, got {fixed!r}")
        if modulated and not deformable:
            raise ValueError("modulated=True needs deformable=True")
        if offset_mode not in ("kpconv", "mlp"):
            raise ValueError(f"offset_mode must be 'kpconv' or 'mlp', got {offset_mode!r}")
        if implementation not in ops.IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {ops.IMPLEMENTATIONS}, got {implementation!r}")
        if not float(offset_bound) >= 0:
            raise ValueError(f"offset_bound must be >= 0 (0: unbounded), got {offset_bound}")
        if offset_loss is not None and (not deformable or offset_loss not in OFFSET_LOSS_VARIANTS):
            raise ValueError(
                f"offset_loss must be None or, for a deformable KPConv, one of {OFFSET_LOSS_VARIANTS}; "
                f"got {offset_loss!r} (deformable={deformable})"
            )
        if offset_loss in ("permissive", "fitting") and radius is None:
            raise ValueError(f"offset_loss={offset_loss!r} is normalised by the radius: pass radius")
        self.offset_loss = offset_loss
        self.offset_loss_weight = float(offset_loss_weight)
        self.repulse_extent = float(repulse_extent)
        self.deformation_statistics = None
        self.offset_bound = float(offset_bound)
        self.offset_mode = offset_mode
        self.implementation = implementation
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.extent = float(extent)
        self.radius = None if radius is None else float(radius)
        self.influence = influence
        self.aggregation = aggregation
        self.fixed = fixed
        self.deformable = bool(deformable)
        self.modulated = bool(modulated)
        self.kernel_seed = kernel_seed
        self.kernel_initializer = keras.initializers.get(kernel_initializer or OriginalTruncatedNormal())

    def build(self, query_points_shape, support_points_shape, neighbors_shape, features_shape):
        d_in = features_shape[-1]
        if d_in is None:
            raise ValueError("KPConv needs a static feature dimension (features.shape[-1])")
        k = self.kernel_size
        initial_points = load_kernels(1.5 * self.extent, k, self.fixed, seed=self.kernel_seed)
        self.kernel_points = self.add_weight(
            name="kernel_points",
            shape=(k, 3),
            trainable=False,
            initializer=keras.initializers.Constant(initial_points),
        )
        self.kernel = self.add_weight(
            name="weights", shape=(k, d_in, self.filters), initializer=self.kernel_initializer
        )
        if self.deformable and self.offset_mode == "mlp":
            offset_dim = (4 if self.modulated else 3) * (k - 1)
            self.offset_mlp_weights = self.add_weight(
                name="offset_mlp_weights", shape=(d_in, offset_dim), initializer="zeros"
            )
            self.offset_mlp_bias = self.add_weight(
                name="offset_mlp_bias", shape=(offset_dim,), initializer="zeros"
            )
        elif self.deformable:
            offset_dim = (4 if self.modulated else 3) * k
            self.offset_conv_weights = self.add_weight(
                name="offset_conv_weights", shape=(k, d_in, offset_dim), initializer="zeros"
            )
            self.offset_conv_bias = self.add_weight(
                name="offset_conv_bias", shape=(offset_dim,), initializer="zeros"
            )

    @property
    def offset_variables(self):
        """The offset convolution's variables (their gradients are scaled in training)."""
        if not self.deformable:
            return []
        if self.offset_mode == "mlp":
            return [self.offset_mlp_weights, self.offset_mlp_bias]
        return [self.offset_conv_weights, self.offset_conv_bias]

    def offsets(self, query_points, support_points, neighbors, features):
        """Raw offset output [Nq, 3K or 4K], offsets [Nq, K, 3] (x extent), modulations or None."""
        k = self.kernel_size
        if self.offset_mode == "mlp":
            # Query features: the original applies the map to the features it is given, which are
            # the queries' only when queries == supports (its inception blocks).
            raw = tf.matmul(features, self.offset_mlp_weights) + self.offset_mlp_bias
            moved = self._bounded(tf.reshape(raw[:, : 3 * (k - 1)], [-1, k - 1, 3]))
            offsets = tf.concat([tf.zeros_like(moved[:, :1]), moved], axis=1) * self.extent
            modulations = None
            if self.modulated:
                m = 2.0 * tf.sigmoid(raw[:, 3 * (k - 1) :])
                modulations = tf.concat([tf.zeros_like(m[:, :1]), m], axis=1)
            return raw, offsets, modulations
        raw = (
            ops.kpconv(
                query_points,
                support_points,
                neighbors,
                features,
                self.kernel_points,
                self.offset_conv_weights,
                self.extent,
                self.influence,
                self.aggregation,
                self.implementation,
                geometry_gradients=False,
            )
            + self.offset_conv_bias
        )
        offsets = self._bounded(tf.reshape(raw[:, : 3 * k], [-1, k, 3])) * self.extent
        modulations = 2.0 * tf.sigmoid(raw[:, 3 * k :]) if self.modulated else None
        return raw, offsets, modulations

    def _bounded(self, offsets):
        """Offsets in extent units, squashed into [-offset_bound, offset_bound] when bounded."""
        if not self.offset_bound:
            return offsets
        return self.offset_bound * tf.tanh(offsets / self.offset_bound)

    def call(self, query_points, support_points, neighbors, features, return_deformed=False):
        if not self.deformable:
            if return_deformed:
                raise ValueError("return_deformed=True needs a deformable KPConv")
            return ops.kpconv(
                query_points,
                support_points,
                neighbors,
                features,
                self.kernel_points,
                self.kernel,
                self.extent,
                self.influence,
                self.aggregation,
                implementation=self.implementation,
                geometry_gradients=False,
            )
        _, offsets, modulations = self.offsets(query_points, support_points, neighbors, features)
        out = ops.kpconv_deformable(
            query_points,
            support_points,
            neighbors,
            features,
            self.kernel_points,
            offsets,
            self.kernel,
            self.extent,
            self.influence,
            self.aggregation,
            modulations,
            implementation=self.implementation,
        )
        deformed = self.kernel_points[None] + offsets
        if self.offset_loss is not None:
            self._add_offset_loss(deformed, query_points, support_points, neighbors)
        if return_deformed:
            return out, deformed
        return out

    def _add_offset_loss(self, deformed, query_points, support_points, neighbors):
        nearest_d2 = nearest_squared_distances(deformed, query_points, support_points, neighbors)
        term = deformable_offsets_loss(
            self.offset_loss,
            deformed,
            query_points,
            support_points,
            neighbors,
            self.radius,
            self.extent,
            self.repulse_extent,
            nearest_d2,
        )
        self.add_loss(tf.constant(self.offset_loss_weight, tf.float32) * term)
        self.deformation_statistics = deformation_statistics(
            deformed, self.kernel_points, nearest_d2, self.extent
        )

    def compute_output_shape(self, query_points_shape, *args, **kwargs):
        return (query_points_shape[0], self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            extent=self.extent,
            radius=self.radius,
            influence=self.influence,
            aggregation=self.aggregation,
            fixed=self.fixed,
            deformable=self.deformable,
            modulated=self.modulated,
            kernel_seed=self.kernel_seed,
            offset_mode=self.offset_mode,
            offset_bound=self.offset_bound,
            offset_loss=self.offset_loss,
            offset_loss_weight=self.offset_loss_weight,
            repulse_extent=self.repulse_extent,
            implementation=self.implementation,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
