// Typed handles of fastbn's ops, for C++ code that calls them through the dispatcher
// (the autograd in autograd.cpp, the eager entry points in eager.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastbn {

using TrainSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t, double,
    const std::optional<at::Tensor>&);
using EvalSignature = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double,
                                 int64_t, double, const std::optional<at::Tensor>&);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, double, bool, int64_t, double, std::array<bool, 3>);
using AddActBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, double, bool, int64_t, double);
using CompositeBackwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, bool, int64_t, double,
    const std::optional<at::Tensor>&);
using UpdateRunningStatsSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, int64_t);

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Looked up once, at the first call (the schemas are registered when the library loads).
struct OpHandles {
  c10::TypedOperatorHandle<TrainSignature> train = op_handle<TrainSignature>("fastbn::batch_norm_train");
  c10::TypedOperatorHandle<EvalSignature> eval = op_handle<EvalSignature>("fastbn::batch_norm_eval");
  c10::TypedOperatorHandle<BackwardSignature> backward = op_handle<BackwardSignature>("fastbn::batch_norm_backward");
  c10::TypedOperatorHandle<AddActBackwardSignature> add_act_backward =
      op_handle<AddActBackwardSignature>("fastbn::batch_norm_add_act_backward");
  c10::TypedOperatorHandle<CompositeBackwardSignature> composite_backward =
      op_handle<CompositeBackwardSignature>("fastbn::batch_norm_backward_composite");
  c10::TypedOperatorHandle<UpdateRunningStatsSignature> update_running_stats =
      op_handle<UpdateRunningStatsSignature>("fastbn::update_running_stats");
};

inline const OpHandles& ops() {
  static const OpHandles handles;
  return handles;
}

}  // namespace fastbn
