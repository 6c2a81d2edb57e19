// How the ops' hot loops run: split over TensorFlow's CPU worker pool (per-target ranges for
// deterministic gradient sums), and compiled per instruction set.
//
// The per-thread loops are compiled once per instruction set (KPCONV_PER_ISA) and the loader
// picks the clone the CPU supports. Helpers they call are forced inline (KPCONV_INLINE): a helper
// left out of line runs with the baseline (SSE2) code.
#ifndef KPCONV_TF_CPU_LOOPS_H_
#define KPCONV_TF_CPU_LOOPS_H_

#include <algorithm>
#include <cstdint>
#include <functional>

#include "tensorflow/core/framework/op_kernel.h"

#define KPCONV_INLINE inline __attribute__((always_inline))
#define KPCONV_LAMBDA_INLINE __attribute__((always_inline))
#define KPCONV_PER_ISA __attribute__((target_clones("avx512f", "avx2", "default")))

namespace kpconv_tf {

// fn(begin, end) over [0, n) on the op's worker pool; cost: cycles per unit, for the split.
inline void ParallelFor(::tensorflow::OpKernelContext* ctx, int64_t n, int64_t cost,
                        const std::function<void(int64_t, int64_t)>& fn) {
  ctx->device()->tensorflow_cpu_worker_threads()->workers->ParallelFor(n, cost, fn);
}

// fn(lo, hi) for the ranges of a split of [0, targets) into contiguous ranges, spread over the
// worker pool (at most four per thread, none shorter than 1024 targets). For gradients summed per
// target (support row) in a fixed order: each range owns its targets, so no two threads write the
// same row and the sums do not depend on the number of threads. Cost per range: `scan` (its pass
// over the rows that may touch it) plus its share of `work` (all the sums together).
inline void ForEachTargetRange(::tensorflow::OpKernelContext* ctx, int64_t targets, int64_t scan,
                               int64_t work, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t threads = ctx->device()->tensorflow_cpu_worker_threads()->num_threads;
  const int64_t num_ranges =
      std::max<int64_t>(1, std::min<int64_t>((targets + 1023) / 1024, 4 * threads));
  const int64_t range = (targets + num_ranges - 1) / num_ranges;
  ParallelFor(ctx, num_ranges, scan + work / num_ranges, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t lo = std::min(targets, r * range), hi = std::min(targets, (r + 1) * range);
      if (lo < hi) fn(lo, hi);
    }
  });
}

}  // namespace kpconv_tf

#endif  // KPCONV_TF_CPU_LOOPS_H_
