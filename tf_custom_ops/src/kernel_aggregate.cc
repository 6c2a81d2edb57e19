// KpconvKernelAggregate: the neighbour sum of a kernel point convolution, fused, with its gradient.
//
// For every query n and kernel point k it returns  sum_h w(n, h, k) * features[neighbors[n, h]],
// the [Nq, K, Din] tensor that the convolution then multiplies by its [K * Din, Dout] weights (a
// plain matmul, left to TensorFlow). Influences are those of kpconv_tf.ops: constant, linear,
// gaussian; sum or closest aggregation; rigid (shared [K, 3] kernel points) or deformable
// (per-query [Nq, K, 3] kernel points, neighbours outside every influence sphere dropped). Shadow
// neighbours (index Ns) carry zero features in the standard-op formulation, so they are skipped.
//
// Why fused: the standard-op formulation materialises the gathered [Nq, H, Din] features and
// contracts them with [Nq, H, K] influences in a batched matmul of tiny matrices (and the same
// twice more in the backward pass). Here each neighbour is read once and only its non-zero
// influences are accumulated: a linear influence reaches ~1-2 of the K kernel points, so most of
// that work disappears and no [Nq, H, *] tensor is ever stored. With geometry_gradients = false
// (fixed kernel points, points as data) the gradient op computes the features' gradient only.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cloud_checks.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace kpconv_tf {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

// Shape checks shared by both ops' shape functions; returns K and Din.
absl::Status AggregateShapes(InferenceContext* c, DimensionHandle* nq, DimensionHandle* k,
                             DimensionHandle* d) {
  ShapeHandle q, s, nb, f, kp, unused;
  bool deformable;
  TF_RETURN_IF_ERROR(c->GetAttr("deformable", &deformable));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &q));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &s));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &nb));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 2, &f));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(4), deformable ? 3 : 2, &kp));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(5), 0, &unused));
  DimensionHandle merged;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(q, 0), c->Dim(nb, 0), nq));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(s, 0), c->Dim(f, 0), &merged));
  *k = c->Dim(kp, deformable ? 1 : 0);
  *d = c->Dim(f, 1);
  return absl::OkStatus();
}

#define KPCONV_AGGREGATE_INPUTS_AND_ATTRS                               \
  Input("query_points: float")                                          \
      .Input("support_points: float")                                   \
      .Input("neighbors: int32")                                        \
      .Input("features: float")                                         \
      .Input("kernel_points: float")                                    \
      .Input("extent: float")                                           \
      .Attr("influence: {'constant', 'linear', 'gaussian'} = 'linear'") \
      .Attr("aggregation: {'sum', 'closest'} = 'sum'")                  \
      .Attr("deformable: bool = false")                                 \
      .Attr("geometry_gradients: bool = true")

REGISTER_OP("KpconvKernelAggregate")
    .KPCONV_AGGREGATE_INPUTS_AND_ATTRS.Output("aggregates: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle nq, k, d;
      TF_RETURN_IF_ERROR(AggregateShapes(c, &nq, &k, &d));
      c->set_output(0, c->MakeShape({nq, k, d}));
      return absl::OkStatus();
    })
    .Doc("Per query and kernel point, the influence-weighted sum of the neighbours' features.");

REGISTER_OP("KpconvKernelAggregateGrad")
    .KPCONV_AGGREGATE_INPUTS_AND_ATTRS.Input("grad: float")
    .Output("grad_features: float")
    .Output("grad_kernel_points: float")
    .Output("grad_centred: float")
    .SetShapeFn([](InferenceContext* c) {
      DimensionHandle nq, k, d;
      TF_RETURN_IF_ERROR(AggregateShapes(c, &nq, &k, &d));
      ShapeHandle grad, nb;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(6), 3, &grad));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 2, &nb));
      bool geometry;
      TF_RETURN_IF_ERROR(c->GetAttr("geometry_gradients", &geometry));
      c->set_output(0, c->input(3));
      c->set_output(1, geometry ? c->input(4) : c->MakeShape({0}));
      c->set_output(2, geometry ? c->MakeShape({nq, c->Dim(nb, 1), 3}) : c->MakeShape({0}));
      return absl::OkStatus();
    })
    .Doc(
        "Gradient of KpconvKernelAggregate w.r.t. features, kernel points and centred neighbours.");

enum class Influence { kConstant, kLinear, kGaussian };

struct Params {
  Influence influence;
  bool closest;
  bool deformable;
  float extent;
  float extent2;      // extent^2, the deformable in-range test
  float gauss_denom;  // 2 sigma^2 + 1e-9 with sigma = 0.3 extent
  int64_t k;
};

// Validated inputs of either op.
struct Inputs {
  const float* q;
  const float* s;
  const int32_t* nb;
  const float* f;
  const float* kp;
  int64_t nq, ns, h, d;
  Params p;
  const float* KernelPoints(int64_t n) const { return p.deformable ? kp + n * p.k * 3 : kp; }
  // Support s relative to query n.
  void Centre(int64_t n, int64_t s_index, float c[3]) const {
    for (int a = 0; a < 3; ++a) c[a] = s[3 * s_index + a] - q[3 * n + a];
  }
};

// The kernel points of the current query in structure-of-arrays form, with per-neighbour scratch,
// padded to a multiple of kLanes with far-away points so the arithmetic loops have no remainder
// (padding is never listed as active). Rigid kernel points are loaded once; deformable ones by
// Query(n).
constexpr int64_t kLanes = 16;
constexpr float kFarAway = 1e15f;  // its squared distance stays finite in float

struct Kernel {
  const Inputs& in;
  int64_t padded;
  std::vector<float> x, y, z, d2, w, dw;
  std::vector<int32_t> active;  // the kernel points with a non-zero influence (or gradient)
  explicit Kernel(const Inputs& inputs)
      : in(inputs),
        padded((in.p.k + kLanes - 1) / kLanes * kLanes),
        x(padded, kFarAway),
        y(padded, kFarAway),
        z(padded, kFarAway),
        d2(padded),
        w(padded),
        dw(padded),
        active(in.p.k) {
    if (!in.p.deformable) Load(in.kp);
  }
  void Query(int64_t n) {
    if (in.p.deformable) Load(in.KernelPoints(n));
  }

 private:
  void Load(const float* kp) {
    for (int64_t k = 0; k < in.p.k; ++k) {
      x[k] = kp[3 * k];
      y[k] = kp[3 * k + 1];
      z[k] = kp[3 * k + 2];
    }
  }
};

inline void LinearInfluence(const float* __restrict d2, const Params& p, bool with_grad, int64_t from,
                            int64_t to, float* __restrict w, float* __restrict dw) {
  for (int64_t k = from; k < to; ++k) {
    const float r = std::sqrt(std::max(d2[k], 1e-30f));
    const float v = 1.0f - r / p.extent;
    w[k] = std::max(v, 0.0f);
    dw[k] = (with_grad && v >= 0.0f && d2[k] >= 1e-30f) ? -0.5f / (r * p.extent) : 0.0f;
  }
}

// Influences w[k] of every kernel point on the centred neighbour c (and dw/d(d2) when
// `with_grad`), matching kpconv_tf.ops.influence_weights. Returns how many kernel points have a
// non-zero influence (or gradient), listed in kn->active; 0 also when the neighbour is unused
// (deformable and outside every influence sphere). The loops have no data-dependent branch: a
// linear influence reaches one or two of the K kernel points in an unpredictable pattern.
inline int64_t Influences(const float* c, const Params& p, bool with_grad, Kernel* kn) {
  const int64_t num = p.k;
  float* __restrict d2 = kn->d2.data();
  float* __restrict w = kn->w.data();
  float* __restrict dw = kn->dw.data();
  const float* __restrict x = kn->x.data();
  const float* __restrict y = kn->y.data();
  const float* __restrict z = kn->z.data();
  const int64_t padded = kn->padded;
  for (int64_t b = 0; b < padded; b += kLanes) {
    for (int64_t k = b; k < b + kLanes; ++k) {
      const float dx = c[0] - x[k], dy = c[1] - y[k], dz = c[2] - z[k];
      d2[k] = dx * dx + dy * dy + dz * dz;
    }
  }
  if (p.deformable) {
    int in_range = 0;
    for (int64_t k = 0; k < num; ++k) in_range |= d2[k] < p.extent2;
    if (!in_range) return 0;
  }
  int64_t first = 0, last = num;
  if (p.closest) {  // only the nearest kernel point (first on ties) keeps its influence
    for (int64_t k = 1; k < num; ++k)
      if (d2[k] < d2[first]) first = k;
    last = first + 1;
  }
  // The formulas run over whole lane blocks (or the one closest point); only [first, last) counts.
  const int64_t from = p.closest ? first : 0, to = p.closest ? last : padded;
  switch (p.influence) {
    case Influence::kConstant:
      for (int64_t k = from; k < to; ++k) {
        w[k] = p.deformable ? static_cast<float>(d2[k] < p.extent2) : 1.0f;
        dw[k] = 0.0f;
      }
      break;
    case Influence::kLinear:
      // Beyond the extent v < 0: no influence and no gradient.
      if (p.closest) {
        LinearInfluence(d2, p, with_grad, from, to, w, dw);
      } else {
        for (int64_t b = 0; b < padded; b += kLanes) LinearInfluence(d2, p, with_grad, b, b + kLanes, w, dw);
      }
      break;
    case Influence::kGaussian:
      for (int64_t k = from; k < to; ++k) {
        w[k] = std::exp(-d2[k] / p.gauss_denom);
        dw[k] = -w[k] / p.gauss_denom;
      }
      break;
  }
  int32_t* active = kn->active.data();
  int64_t count = 0;
  for (int64_t k = first; k < last; ++k) {
    active[count] = static_cast<int32_t>(k);
    count += (w[k] != 0.0f) | (dw[k] != 0.0f);
  }
  return count;
}

// Row helpers, inlined into the per-thread loops below, which are compiled once per instruction set.
inline void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline float Dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  // Sixteen running sums, one per lane: a single float sum is a dependency chain the compiler may
  // not reorder (no -ffast-math), so it would stay scalar.
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * y[i + l];
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

#define KPCONV_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))

// Forward sums of queries [begin, end) into out [Nq, K, Din].
KPCONV_PER_ISA void SumQueries(const Inputs& in, int64_t begin, int64_t end, float* out) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* w = kernel.w.data();
  const int32_t* active = kernel.active.data();
  for (int64_t n = begin; n < end; ++n) {
    float* agg = out + n * kn * in.d;
    std::fill(agg, agg + kn * in.d, 0.0f);
    kernel.Query(n);
    for (int64_t j = 0; j < in.h; ++j) {
      const int64_t s = in.nb[n * in.h + j];
      if (s == in.ns) continue;
      float c[3];
      in.Centre(n, s, c);
      const int64_t count = Influences(c, in.p, false, &kernel);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t k = active[i];
        Axpy(w[k], in.f + s * in.d, agg + k * in.d, in.d);
      }
    }
  }
}

// Geometric gradients of queries [begin, end): centred-neighbour gradients into gc [Nq, H, 3]
// and kernel point gradients into gk [Nq, K, 3] (deformable) or summed into gshared [K, 3]
// (rigid, double).
KPCONV_PER_ISA void GeometryGradients(const Inputs& in, const float* grad, int64_t begin,
                                      int64_t end, float* gk, float* gc, double* gshared) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* dw = kernel.dw.data();
  const int32_t* active = kernel.active.data();
  for (int64_t n = begin; n < end; ++n) {
    const float* kp = in.KernelPoints(n);
    kernel.Query(n);
    float* gkp = in.p.deformable ? gk + n * kn * 3 : nullptr;
    if (gkp) std::fill(gkp, gkp + kn * 3, 0.0f);
    for (int64_t j = 0; j < in.h; ++j) {
      float* gy = gc + (n * in.h + j) * 3;
      gy[0] = gy[1] = gy[2] = 0.0f;
      const int64_t s = in.nb[n * in.h + j];
      if (s == in.ns) continue;
      float c[3];
      in.Centre(n, s, c);
      const int64_t count = Influences(c, in.p, true, &kernel);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t k = active[i];
        if (dw[k] == 0.0f) continue;
        const float g_d2 = Dot(grad + (n * kn + k) * in.d, in.f + s * in.d, in.d) * dw[k];
        for (int a = 0; a < 3; ++a) {
          const float g = 2.0f * g_d2 * (c[a] - kp[3 * k + a]);
          gy[a] += g;
          if (gkp)
            gkp[3 * k + a] -= g;
          else
            gshared[3 * k + a] -= g;
        }
      }
    }
  }
}

// Feature gradients of supports [begin, end) into gf [Ns, Din], each summed over the (query,
// column) entries that read it, in `neighbors` order: entries[start[s] .. start[s + 1]).
KPCONV_PER_ISA void FeatureGradients(const Inputs& in, const float* grad, const int64_t* start,
                                     const int64_t* entries, int64_t begin, int64_t end,
                                     float* gf) {
  const int64_t kn = in.p.k;
  Kernel kernel(in);
  const float* w = kernel.w.data();
  const int32_t* active = kernel.active.data();
  for (int64_t s = begin; s < end; ++s) {
    float* row = gf + s * in.d;
    std::fill(row, row + in.d, 0.0f);
    for (int64_t e = start[s]; e < start[s + 1]; ++e) {
      const int64_t n = entries[e] / in.h;
      float c[3];
      in.Centre(n, s, c);
      kernel.Query(n);
      const int64_t count = Influences(c, in.p, false, &kernel);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t k = active[i];
        Axpy(w[k], grad + (n * kn + k) * in.d, row, in.d);
      }
    }
  }
}

class AggregateBase : public OpKernel {
 public:
  explicit AggregateBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    std::string influence, aggregation;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("influence", &influence));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("aggregation", &aggregation));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("deformable", &deformable_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("geometry_gradients", &geometry_gradients_));
    influence_ = influence == "constant" ? Influence::kConstant
                 : influence == "linear" ? Influence::kLinear
                                         : Influence::kGaussian;
    closest_ = aggregation == "closest";
  }

 protected:
  // Checks shapes, extent and every neighbour index; fills `in`. Returns false on error.
  bool Validate(OpKernelContext* ctx, Inputs* in) {
    const Tensor& q = ctx->input(0);
    const Tensor& s = ctx->input(1);
    const Tensor& nb = ctx->input(2);
    const Tensor& f = ctx->input(3);
    const Tensor& kp = ctx->input(4);
    const Tensor& extent = ctx->input(5);
    auto fail = [&](const absl::Status& status) {
      ctx->CtxFailure(status);
      return false;
    };
    if (!(q.dims() == 2 && q.dim_size(1) == 3))
      return fail(errors::InvalidArgument("query_points must have shape [Nq, 3], got ",
                                          q.shape().DebugString()));
    if (!(s.dims() == 2 && s.dim_size(1) == 3))
      return fail(errors::InvalidArgument("support_points must have shape [Ns, 3], got ",
                                          s.shape().DebugString()));
    if (!(nb.dims() == 2 && nb.dim_size(0) == q.dim_size(0)))
      return fail(errors::InvalidArgument("neighbors must have shape [Nq, H] with Nq = ",
                                          q.dim_size(0), ", got ", nb.shape().DebugString()));
    if (!(f.dims() == 2 && f.dim_size(0) == s.dim_size(0)))
      return fail(errors::InvalidArgument("features must have shape [Ns, Din] with Ns = ",
                                          s.dim_size(0), ", got ", f.shape().DebugString()));
    const bool kp_ok =
        deformable_ ? (kp.dims() == 3 && kp.dim_size(0) == q.dim_size(0) && kp.dim_size(2) == 3)
                    : (kp.dims() == 2 && kp.dim_size(1) == 3);
    if (!kp_ok || kp.dim_size(kp.dims() - 2) < 1)
      return fail(errors::InvalidArgument("kernel_points must have shape ",
                                          deformable_ ? "[Nq, K, 3] (deformable)" : "[K, 3]",
                                          " with K >= 1, got ", kp.shape().DebugString()));
    double extent_value;
    if (!CheckPositiveScalar(ctx, extent, "extent", &extent_value)) return false;
    const float e = static_cast<float>(extent_value);  // exact: it was read from a float
    in->q = q.flat<float>().data();
    in->s = s.flat<float>().data();
    in->nb = nb.flat<int32_t>().data();
    in->f = f.flat<float>().data();
    in->kp = kp.flat<float>().data();
    in->nq = q.dim_size(0);
    in->ns = s.dim_size(0);
    in->h = nb.dim_size(1);
    in->d = f.dim_size(1);
    in->p.influence = influence_;
    in->p.closest = closest_;
    in->p.deformable = deformable_;
    in->p.extent = e;
    in->p.extent2 = e * e;
    const float sigma = 0.3f * e;
    in->p.gauss_denom = 2.0f * (sigma * sigma) + 1e-9f;
    in->p.k = deformable_ ? kp.dim_size(1) : kp.dim_size(0);
    const int64_t total = in->nq * in->h;
    for (int64_t i = 0; i < total; ++i) {
      if (in->nb[i] < 0 || in->nb[i] > in->ns)
        return fail(errors::InvalidArgument("neighbors[", i / in->h, ", ", i % in->h,
                                            "] = ", in->nb[i], " is not in [0, ", in->ns,
                                            "] (Ns is the shadow index)"));
    }
    return true;
  }

  void ParallelFor(OpKernelContext* ctx, int64_t n, int64_t cost,
                   const std::function<void(int64_t, int64_t)>& fn) {
    ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(n, cost, fn);
  }

  Influence influence_;
  bool closest_;
  bool deformable_;
  bool geometry_gradients_;
};

class KernelAggregateOp : public AggregateBase {
 public:
  using AggregateBase::AggregateBase;

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    if (!Validate(ctx, &in)) return;
    const int64_t kn = in.p.k;
    Tensor* out_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({in.nq, kn, in.d}), &out_t));
    float* out = out_t->flat<float>().data();
    const int64_t cost = in.h * (kn * 12 + 2 * in.d) + kn * in.d;
    ParallelFor(ctx, in.nq, cost,
                [&](int64_t begin, int64_t end) { SumQueries(in, begin, end, out); });
  }
};

class KernelAggregateGradOp : public AggregateBase {
 public:
  using AggregateBase::AggregateBase;

  void Compute(OpKernelContext* ctx) override {
    Inputs in;
    if (!Validate(ctx, &in)) return;
    const int64_t kn = in.p.k;
    const Tensor& grad_t = ctx->input(6);
    OP_REQUIRES(ctx,
                grad_t.dims() == 3 && grad_t.dim_size(0) == in.nq && grad_t.dim_size(1) == kn &&
                    grad_t.dim_size(2) == in.d,
                errors::InvalidArgument("grad must have shape [", in.nq, ", ", kn, ", ", in.d,
                                        "], got ", grad_t.shape().DebugString()));
    const float* grad = grad_t.flat<float>().data();
    const bool geometry = geometry_gradients_;
    Tensor *gf_t = nullptr, *gk_t = nullptr, *gc_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, ctx->input(3).shape(), &gf_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, geometry ? ctx->input(4).shape() : TensorShape({0}),
                                             &gk_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            2, geometry ? TensorShape({in.nq, in.h, 3}) : TensorShape({0}), &gc_t));
    float* gf = gf_t->flat<float>().data();
    float* gk = gk_t->flat<float>().data();
    float* gc = gc_t->flat<float>().data();

    // 1. With geometry: per query, the gradients of the centred neighbours and kernel points.
    // Shared (rigid) kernel points are summed per block of queries, in double, then over blocks.
    if (geometry) {
      const int64_t num_blocks = std::min<int64_t>(in.nq, 256);
      const int64_t block = num_blocks ? (in.nq + num_blocks - 1) / num_blocks : 0;
      std::vector<double> kp_partial(in.p.deformable ? 0 : num_blocks * kn * 3, 0.0);
      ParallelFor(ctx, num_blocks, block * in.h * (kn * 16 + 2 * in.d), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          double* gshared = kp_partial.empty() ? nullptr : kp_partial.data() + b * kn * 3;
          GeometryGradients(in, grad, b * block, std::min(in.nq, (b + 1) * block), gk, gc, gshared);
        }
      });
      if (!in.p.deformable) {
        for (int64_t i = 0; i < kn * 3; ++i) {
          double total = 0.0;
          for (int64_t b = 0; b < num_blocks; ++b) total += kp_partial[b * kn * 3 + i];
          gk[i] = static_cast<float>(total);
        }
      }
    }

    // 2. Per support: its feature gradient, summed in `neighbors` order over the entries that
    // read it (found through a support-major index), so no two threads write the same row and
    // the sum does not depend on the thread count or on how clouds are batched together.
    std::vector<int64_t> start(in.ns + 2, 0);
    const int64_t total = in.nq * in.h;
    for (int64_t i = 0; i < total; ++i) ++start[in.nb[i] + 1];
    for (int64_t s = 0; s <= in.ns; ++s) start[s + 1] += start[s];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    std::vector<int64_t> entries(total);
    for (int64_t i = 0; i < total; ++i) entries[fill[in.nb[i]]++] = i;
    const int64_t per_support = in.ns ? total / in.ns + 1 : 1;
    ParallelFor(ctx, in.ns, per_support * (kn * 12 + 2 * in.d), [&](int64_t s0, int64_t s1) {
      FeatureGradients(in, grad, start.data(), entries.data(), s0, s1, gf);
    });
  }
};

REGISTER_KERNEL_BUILDER(Name("KpconvKernelAggregate").Device(DEVICE_CPU), KernelAggregateOp);
REGISTER_KERNEL_BUILDER(Name("KpconvKernelAggregateGrad").Device(DEVICE_CPU),
                        KernelAggregateGradOp);

}  // namespace
}  // namespace kpconv_tf
