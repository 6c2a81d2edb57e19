// How the ops' hot loops run: split over TensorFlow's CPU worker pool, and compiled per
// instruction set.
//
// The per-thread loops are compiled once per instruction set (KPCONV_PER_ISA) and the loader
// picks the clone the CPU supports. Helpers they call are forced inline (KPCONV_INLINE): a helper
// left out of line runs with the baseline (SSE2) code.
#ifndef KPCONV_TF_CPU_LOOPS_H_
#define KPCONV_TF_CPU_LOOPS_H_

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

}  // namespace kpconv_tf

#endif  // KPCONV_TF_CPU_LOOPS_H_
