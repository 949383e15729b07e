// Argument checks and layout decisions shared by the CPU and CUDA entry points,
// so every backend rejects the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <array>
#include <optional>
#include <tuple>

#include "bn_math.h"

namespace fastbn {

// How a channel's values lie in memory.
//  Planar:      (N, C, S) with S contiguous: NCHW, NCDHW, (N, C, L).
//  Interleaved: (R, C) with C contiguous: channels_last, channels_last_3d, (N, C).
enum class Layout { Planar, Interleaved };

struct Geometry {
  int64_t N;  // batch
  int64_t C;  // channels
  int64_t S;  // spatial size (product of dims after C)
  Layout layout;
  c10::MemoryFormat format;  // memory format of the tensors the kernels read and write
  int64_t count() const { return N * S; }  // values per channel
};

// The memory format outputs get: channels_last(_3d) for inputs strictly in that
// format, contiguous otherwise (fastbn/ops.py's fake kernels mirror this rule).
c10::MemoryFormat output_memory_format(const at::Tensor& input);

// Sizes and layout of `input` once made dense in output_memory_format(input).
Geometry describe(const at::Tensor& input);

// A tensor argument the op needs: given, not None.
void check_defined(const at::Tensor& tensor, const char* name, const char* op);

// Float dtypes only, rank >= 2. `op` names the caller in messages.
void check_input(const at::Tensor& input, const char* op);

// An input the op writes over: no two of its elements may share memory (an expanded
// tensor); refused with torch's own message for in-place writes.
void check_writable_input(const at::Tensor& input, const char* op);

// A per-channel vector (weight, bias, mean, var, running stats): 1-D, C values,
// same device as input, dtype equal to input's or float32 for half/bfloat16 input.
void check_channel_vector(const at::Tensor& input, const at::Tensor& vec, const char* name, const char* op);
void check_channel_vector(const at::Tensor& input, const std::optional<at::Tensor>& vec, const char* name,
                          const char* op);

// A tensor paired value by value with input (a residual, a saved output):
// same sizes, dtype and device.
void check_like_input(const at::Tensor& input, const at::Tensor& other, const char* name, const char* op);

// The residual of batch_norm_add_act, checked with check_like_input and made
// dense in g.format; undefined when absent.
at::Tensor dense_residual(const at::Tensor& input, const std::optional<at::Tensor>& residual, const Geometry& g,
                          const char* op);

// update_running_stats's arguments: count 0 (no update) or more than 1 (the unbiased
// variance divides by count - 1); 1-D vectors of one size; running statistics of a
// floating dtype that share no memory with each other; mean and var float32 or float64
// alike; all on mean's device.
void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                const at::Tensor& mean, const at::Tensor& var, int64_t count, const char* op);

// batch_norm_backward_elemt's sums (given, per channel) and count: the values per channel
// over all processes, so at least those of this input (g.count()).
void check_backward_elemt_sums(const at::Tensor& input, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                               int64_t count, const Geometry& g, const char* op);

// The activation code of an op's `activation` argument (see Activation in bn_math.h).
Activation check_activation(int64_t activation, const char* op);

// The activation's parameter: finite for leaky_relu's slope and elu's alpha (a slope of
// inf or NaN would also turn the CPU kernels' padding lanes, dy = 0, into NaN sums).
void check_activation_param(Activation act, double param, const char* op);

// An activation in-place activated BN can undo (activation_invertible in bn_math.h).
void check_invertible(Activation act, double param, const char* op);

// check_activation, then check_activation_param: the activation code and its parameter.
Activation check_activation(int64_t activation, double param, const char* op);

// Runs __VA_ARGS__ (a lambda) with `constexpr Activation NAME` set to `act`.
#define FASTBN_ACTIVATION_SWITCH(act, NAME, ...)                                                        \
  [&] {                                                                                              \
    switch (act) {                                                                                   \
      case ::fastbn::Activation::ReLU: { constexpr auto NAME = ::fastbn::Activation::ReLU; return __VA_ARGS__(); }           \
      case ::fastbn::Activation::LeakyReLU: { constexpr auto NAME = ::fastbn::Activation::LeakyReLU; return __VA_ARGS__(); } \
      case ::fastbn::Activation::ELU: { constexpr auto NAME = ::fastbn::Activation::ELU; return __VA_ARGS__(); }             \
      case ::fastbn::Activation::SiLU: { constexpr auto NAME = ::fastbn::Activation::SiLU; return __VA_ARGS__(); }           \
      default: { constexpr auto NAME = ::fastbn::Activation::Identity; return __VA_ARGS__(); }                               \
    }                                                                                                \
  }()

// float for half/bfloat16/float, double for double.
at::ScalarType accumulate_dtype(at::ScalarType input_dtype);

// `vec` as a contiguous tensor of the accumulation dtype, or an undefined tensor.
at::Tensor to_accumulate(const std::optional<at::Tensor>& vec, at::ScalarType acc_dtype);

// The training forwards' checked arguments, and their statistics outputs
// (allocated, C values of the accumulation dtype).
struct TrainOperands {
  Geometry g;
  Activation act;
  at::Tensor mean, var;
};

// Every backend's training forwards run these checks, in this order, before any write.
TrainOperands train_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, int64_t activation, double activation_param,
                             const char* op);

// batch_norm_train_'s: train_operands's checks, then an invertible activation and an input
// it can write over.
TrainOperands train_inplace_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, int64_t activation,
                                     double activation_param, const char* op);

// The evaluation forwards' checked arguments: describe(input) and the activation.
struct EvalOperands {
  Geometry g;
  Activation act;
};

EvalOperands eval_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                           const at::Tensor& running_var, int64_t activation, double activation_param,
                           const char* op);

// batch_norm_eval_'s: eval_operands's checks, then as train_inplace_operands.
EvalOperands eval_inplace_operands(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
                                   const at::Tensor& running_var, int64_t activation, double activation_param,
                                   const char* op);

// The operands of the backward ops (fused and SyncBatchNorm's phases), checked and made dense:
// x and dy in the layout of describe(input), the vectors in the accumulation dtype.
struct PhaseOperands {
  Geometry g;
  at::Tensor x, dy, w, b, mean, var;
};

PhaseOperands backward_phase_operands(const at::Tensor& grad_output, const at::Tensor& input,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& mean, const at::Tensor& var, const char* op);

// The fused backward ops' checked operands and their outputs, allocated:
// grad_input and (with a residual) grad_residual in the layout of describe(input),
// grad_weight and grad_bias in the accumulation dtype: zeros when empty() (no kernel
// runs), else uninitialized (the kernels assign every channel's; none may accumulate).
// need_input and need_params come from batch_norm_backward's output_mask: without
// need_input, grad_input is an empty tensor and the CPU kernels compute no dx; without
// need_params, their evaluation backward computes no sums (training needs them for dx),
// so grad_weight and grad_bias stay uninitialized: masked_backward_outputs returns
// them empty, and nothing else may read them.
struct BackwardCall {
  PhaseOperands o;
  at::Tensor residual;  // dense in o.g.format, or undefined
  Activation act;
  at::Tensor grad_input, grad_residual, grad_weight, grad_bias;
  bool need_input = true, need_params = true;
  bool empty() const { return o.g.count() == 0 || o.g.C == 0; }
};

using OutputMask = std::array<bool, 3>;  // (grad_input, grad_weight, grad_bias)
constexpr OutputMask kEveryOutput{true, true, true};

BackwardCall backward_call(const at::Tensor& grad_output, const at::Tensor& input,
                           const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                           int64_t activation, double activation_param, const char* op,
                           OutputMask output_mask = kEveryOutput);

// batch_norm_backward's (grad_input, grad_weight, grad_bias) under its output_mask: an
// output that is not wanted comes back as an empty tensor of its dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_outputs(const BackwardCall& b, OutputMask output_mask);

// batch_norm_invert_output's checked operands (o.x is the output y; o.mean is
// unused: in-place activated BN's backward works on centered values) and its
// outputs, allocated in the accumulation dtype and the layout of describe(output).
struct InvertCall {
  PhaseOperands o;
  Activation act;
  at::Tensor grad, centered;
  bool empty() const { return o.g.count() == 0 || o.g.C == 0; }
};

InvertCall invert_output_call(const at::Tensor& grad_output, const at::Tensor& output,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& var, int64_t activation, double activation_param, const char* op);

}  // namespace fastbn
