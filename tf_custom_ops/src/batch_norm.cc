// KpconvBatchNorm: training-mode batch normalisation of [N, C] features, with its gradient.
//
// y = (x - mean) * gamma / sqrt(variance + epsilon) + beta with the batch mean and the biased
// batch variance per channel (what Keras and the original's tf.layers batch norm compute). Keras
// chains about ten reductions and element-wise ops over [N, C] each way; here the forward reads x
// twice and the backward reads x and dy twice. Channel sums accumulate in float64 over fixed
// blocks of rows, added in block order: the statistics are more accurate than the float32 chains
// and do not depend on the number of threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "cpu_loops.h"

namespace kpconv_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;
namespace errors = ::tensorflow::errors;

// x [N, C] and the per-channel vectors at `vectors`; returns C.
absl::Status NormShapes(InferenceContext* c, std::initializer_list<int> vectors,
                        DimensionHandle* channels) {
  ShapeHandle x, v;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &x));
  *channels = c->Dim(x, 1);
  for (int i : vectors) {
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &v));
    TF_RETURN_IF_ERROR(c->Merge(*channels, c->Dim(v, 0), channels));
  }
  return absl::OkStatus();
}

REGISTER_OP("KpconvBatchNorm")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("epsilon: float")
    .Output("y: float")
    .Output("mean: float")
    .Output("variance: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(NormShapes(c, {1, 2}, &channels));
      c->set_output(0, c->input(0));
      c->set_output(1, c->Vector(channels));
      c->set_output(2, c->Vector(channels));
      return absl::OkStatus();
    })
    .Doc("Batch normalisation over the rows of x, with the batch mean and biased variance.");

REGISTER_OP("KpconvBatchNormGrad")
    .Input("x: float")
    .Input("gamma: float")
    .Input("mean: float")
    .Input("variance: float")
    .Input("grad: float")
    .Attr("epsilon: float")
    .Output("grad_x: float")
    .Output("grad_gamma: float")
    .Output("grad_beta: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(NormShapes(c, {1, 2, 3}, &channels));
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(4), &merged));
      c->set_output(0, c->input(0));
      c->set_output(1, c->Vector(channels));
      c->set_output(2, c->Vector(channels));
      return absl::OkStatus();
    })
    .Doc("Gradient of KpconvBatchNorm's y w.r.t. x, gamma and beta.");

constexpr int64_t kBlockRows = 256;

// Per block of rows [b0, b1), per channel into partial [blocks, 3, C]: the sums of x - shift and
// (x - shift)^2 (dy == nullptr), or of dy, dy * (x - shift) and x - shift (the gradient's).
KPCONV_PER_ISA void BlockSums(const float* x, const float* dy, const double* shift, int64_t n,
                              int64_t c, int64_t b0, int64_t b1, double* partial) {
  for (int64_t blk = b0; blk < b1; ++blk) {
    double* __restrict s1 = partial + blk * 3 * c;
    double* __restrict s2 = s1 + c;
    double* __restrict s3 = s2 + c;
    std::fill(s1, s1 + 3 * c, 0.0);
    const int64_t end = std::min(n, (blk + 1) * kBlockRows);
    for (int64_t i = blk * kBlockRows; i < end; ++i) {
      const float* __restrict xi = x + i * c;
      if (dy == nullptr) {
        for (int64_t j = 0; j < c; ++j) {
          const double d = static_cast<double>(xi[j]) - shift[j];
          s1[j] += d;
          s2[j] += d * d;
        }
      } else {
        const float* __restrict gi = dy + i * c;
        for (int64_t j = 0; j < c; ++j) {
          const double g = gi[j], d = static_cast<double>(xi[j]) - shift[j];
          s1[j] += g;
          s2[j] += g * d;
          s3[j] += d;
        }
      }
    }
  }
}

// The three column sums of BlockSums over all rows, added in block order.
void ChannelSums(OpKernelContext* ctx, const float* x, const float* dy, const double* shift,
                 int64_t n, int64_t c, std::vector<double> sums[3]) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  std::vector<double> partial(blocks * 3 * c);
  ParallelFor(ctx, blocks, kBlockRows * c * 4, [&](int64_t b0, int64_t b1) {
    BlockSums(x, dy, shift, n, c, b0, b1, partial.data());
  });
  for (int s = 0; s < 3; ++s) {
    sums[s].assign(c, 0.0);
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t j = 0; j < c; ++j) sums[s][j] += partial[(blk * 3 + s) * c + j];
  }
}

// out = (x - mean - mean_low) * scale + offset (forward), or scale * (dy - offset - (x - mean -
// mean_low) * k) (backward); mean + mean_low is the float64 mean.
KPCONV_PER_ISA void Rows(const float* x, const float* dy, const float* mean, const float* mean_low,
                         const float* scale, const float* offset, const float* k, int64_t c,
                         int64_t r0, int64_t r1, float* out) {
  for (int64_t i = r0; i < r1; ++i) {
    const float* __restrict xi = x + i * c;
    float* __restrict oi = out + i * c;
    if (dy == nullptr) {
      for (int64_t j = 0; j < c; ++j)
        oi[j] = ((xi[j] - mean[j]) - mean_low[j]) * scale[j] + offset[j];
    } else {
      const float* __restrict gi = dy + i * c;
      for (int64_t j = 0; j < c; ++j)
        oi[j] = scale[j] * (gi[j] - offset[j] - ((xi[j] - mean[j]) - mean_low[j]) * k[j]);
    }
  }
}

bool ValidateVectors(OpKernelContext* ctx, const Tensor& x, std::initializer_list<int> inputs,
                     std::initializer_list<const char*> names) {
  if (x.dims() != 2) {
    ctx->CtxFailure(
        errors::InvalidArgument("x must have shape [N, C], got ", x.shape().DebugString()));
    return false;
  }
  auto name = names.begin();
  for (int i : inputs) {
    const Tensor& v = ctx->input(i);
    if (!(v.dims() == 1 && v.dim_size(0) == x.dim_size(1))) {
      ctx->CtxFailure(errors::InvalidArgument(*name, " must have shape [C] with C = ",
                                              x.dim_size(1), ", got ", v.shape().DebugString()));
      return false;
    }
    ++name;
  }
  return true;
}

class BatchNormBase : public OpKernel {
 public:
  explicit BatchNormBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(ctx, epsilon_ >= 0.0f && std::isfinite(epsilon_),
                errors::InvalidArgument("epsilon must be finite and >= 0, got ", epsilon_));
  }

 protected:
  float epsilon_;
};

class BatchNormOp : public BatchNormBase {
 public:
  using BatchNormBase::BatchNormBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    if (!ValidateVectors(ctx, x_t, {1, 2}, {"gamma", "beta"})) return;
    const int64_t n = x_t.dim_size(0), c = x_t.dim_size(1);
    const float* x = x_t.flat<float>().data();
    const float* gamma = ctx->input(1).flat<float>().data();
    const float* beta = ctx->input(2).flat<float>().data();
    Tensor *y_t = nullptr, *mean_t = nullptr, *var_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_t.shape(), &y_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &mean_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({c}), &var_t));
    float* mean = mean_t->flat<float>().data();
    float* variance = var_t->flat<float>().data();

    // Sums of x - x[0] keep the variance free of cancellation when |mean| >> deviation.
    std::vector<double> shift(c, 0.0), sums[3];
    if (n > 0)
      for (int64_t j = 0; j < c; ++j) shift[j] = x[j];
    ChannelSums(ctx, x, nullptr, shift.data(), n, c, sums);
    const std::vector<double>&s1 = sums[0], &s2 = sums[1];
    std::vector<float> scale(c), mean_low(c);
    for (int64_t j = 0; j < c; ++j) {
      // An empty batch gives NaN statistics, as Keras's mean over no rows does.
      const double m = s1[j] / static_cast<double>(n);
      const double v = std::max(s2[j] / static_cast<double>(n) - m * m, 0.0);
      mean[j] = static_cast<float>(shift[j] + m);
      // x - mean is exact for x near the mean; the float64 mean's remainder follows it.
      mean_low[j] = static_cast<float>(shift[j] + m - static_cast<double>(mean[j]));
      variance[j] = static_cast<float>(v);
      scale[j] = static_cast<float>(gamma[j] / std::sqrt(v + static_cast<double>(epsilon_)));
    }
    float* y = y_t->flat<float>().data();
    ParallelFor(ctx, n, 3 * c, [&](int64_t r0, int64_t r1) {
      Rows(x, nullptr, mean, mean_low.data(), scale.data(), beta, nullptr, c, r0, r1, y);
    });
  }
};

class BatchNormGradOp : public BatchNormBase {
 public:
  using BatchNormBase::BatchNormBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_t = ctx->input(0);
    if (!ValidateVectors(ctx, x_t, {1, 2, 3}, {"gamma", "mean", "variance"})) return;
    const Tensor& dy_t = ctx->input(4);
    OP_REQUIRES(ctx, dy_t.shape() == x_t.shape(),
                errors::InvalidArgument("grad must have the shape of x ", x_t.shape().DebugString(),
                                        ", got ", dy_t.shape().DebugString()));
    const int64_t n = x_t.dim_size(0), c = x_t.dim_size(1);
    const float* x = x_t.flat<float>().data();
    const float* gamma = ctx->input(1).flat<float>().data();
    const float* mean = ctx->input(2).flat<float>().data();
    const float* variance = ctx->input(3).flat<float>().data();
    const float* dy = dy_t.flat<float>().data();
    Tensor *dx_t = nullptr, *dg_t = nullptr, *db_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_t.shape(), &dx_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({c}), &dg_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({c}), &db_t));

    // With xhat = (x - mean) * inv: dbeta = sum dy, dgamma = sum dy * xhat and
    // dx = gamma * inv * (dy - sum dy / N - xhat * sum(dy * xhat) / N). The float32 mean is off
    // the float64 one by delta = sum(x - mean) / N: sum dy (x - mean64) = sum dy (x - mean) - delta
    // sum dy.
    std::vector<double> shift(mean, mean + c), sums[3];
    ChannelSums(ctx, x, dy, shift.data(), n, c, sums);
    std::vector<float> scale(c), offset(c), k(c), mean_low(c);
    const std::vector<double>& sum_dy = sums[0];
    std::vector<double> sum_dy_centred(c);
    for (int64_t j = 0; j < c; ++j) {
      const double delta = sums[2][j] / static_cast<double>(n);
      sum_dy_centred[j] = sums[1][j] - delta * sum_dy[j];
      mean_low[j] = static_cast<float>(delta);
    }
    float* dg = dg_t->flat<float>().data();
    float* db = db_t->flat<float>().data();
    for (int64_t j = 0; j < c; ++j) {
      const double inv = 1.0 / std::sqrt(static_cast<double>(variance[j]) + epsilon_);
      db[j] = static_cast<float>(sum_dy[j]);
      dg[j] = static_cast<float>(sum_dy_centred[j] * inv);
      scale[j] = static_cast<float>(gamma[j] * inv);
      offset[j] = static_cast<float>(sum_dy[j] / static_cast<double>(n));
      k[j] = static_cast<float>(inv * inv * sum_dy_centred[j] / static_cast<double>(n));
    }
    float* dx = dx_t->flat<float>().data();
    ParallelFor(ctx, n, 5 * c, [&](int64_t r0, int64_t r1) {
      Rows(x, dy, mean, mean_low.data(), scale.data(), offset.data(), k.data(), c, r0, r1, dx);
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvBatchNorm").Device(DEVICE_CPU), BatchNormOp);
REGISTER_KERNEL_BUILDER(Name("KpconvBatchNormGrad").Device(DEVICE_CPU), BatchNormGradOp);

}  // namespace
}  // namespace kpconv_tf
