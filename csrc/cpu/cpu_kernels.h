// The CPU kernels as seen from the operator entry points (batch_norm_cpu.cpp):
// the dtype- and activation-dispatched passes, compiled once per x86 vector ISA
// from csrc/cpu/per_isa/batch_norm_kernels.cpp (setup.py), each copy in its own
// namespace fastbn::cpu::<ISA> (as ATen's at::vec::CPU_CAPABILITY), and picked
// at run time by active_kernels() (cpu_capability.h).
//
// The operands arrive checked and dense in g.format, the per-channel vectors in
// the accumulation dtype (undefined weight/bias: identity); never with
// g.count() == 0.
#pragma once

#include <ATen/core/Tensor.h>

#include "bn_checks.h"
#include "bn_math.h"

namespace fastbn::cpu {

struct CpuKernels {
  // Training forward of x into y (may be x): batch mean and biased variance into mean/var.
  void (*train)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& y, const at::Tensor& mean,
                const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias, double eps, Activation act,
                double activation_param, const Geometry& g);
  // Evaluation forward of x into y (may be x) with the given statistics.
  void (*eval)(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& y, const at::Tensor& mean,
               const at::Tensor& var, const at::Tensor& weight, const at::Tensor& bias, double eps, Activation act,
               double activation_param, const Geometry& g);
  // The fused backward into b's outputs.
  void (*backward)(const BackwardCall& b, double eps, double activation_param, bool train);
  // batch_norm_invert_output into call.grad and call.centered.
  void (*invert_output)(const InvertCall& call, double eps, double activation_param);
  // Per-channel mean and biased variance of x.
  void (*stats)(const at::Tensor& x, const Geometry& g, const at::Tensor& mean, const at::Tensor& var);
  // Per-channel sum(g) and sum(g * (x - mean)), g = dy * act'(z), into sum_dy/sum_dy_xmu (zeros).
  void (*backward_reduce)(const PhaseOperands& o, Activation act, double eps, double activation_param,
                          const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu);
  // grad_input into dx from the global sums (float64) over `count` values per channel.
  void (*backward_elemt)(const PhaseOperands& o, Activation act, double eps, double activation_param,
                         const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, int64_t count, const at::Tensor& dx);
};

// One table per compiled ISA (defined in per_isa/batch_norm_kernels.cpp).
namespace DEFAULT {
extern const CpuKernels kernels;
}
#if defined(FASTBN_X86_KERNELS)
namespace AVX2 {
extern const CpuKernels kernels;
}
namespace AVX512 {
extern const CpuKernels kernels;
}
#endif
#if defined(FASTBN_AVX512_BF16_KERNELS)
namespace AVX512_BF16 {
extern const CpuKernels kernels;
}
#endif

}  // namespace fastbn::cpu
