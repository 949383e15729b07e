// The eager-mode forward of fastbn's modules and functional API in one Python call:
// fastbn._C._train_forward / _eval_forward (declared in eager.h, listed in ops.cpp).
//
// Why: on a small layer the per-call cost is what is left, and calling the ops from
// Python costs a boxed call each (every argument converted to an IValue and back):
// the training forward and the running-statistics update were two of them. Here both
// are one unboxed dispatcher call each, behind one Python call, as torch.batch_norm
// does. The ops are the same (with their C++ autograd, csrc/autograd.cpp), so
// fastbn/functional.py uses these only where it would call the ops plainly: not under
// torch.compile (which must see the ops) nor forward AD / torch.func (their own
// Functions). The arguments were checked by functional.check_batch_norm_args.
#include "eager.h"

#include <ATen/core/LegacyTypeDispatch.h>  // AutoDispatchBelowADInplaceOrView: torch 2.11 brings it in through no other include here
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "autograd.h"
#include "op_handles.h"

namespace fastbn {
namespace {

// Whether torch's compiled autograd is on now: the flag its context managers keep,
// torch._dynamo.compiled_autograd.compiled_autograd_enabled, where that module is loaded
// (it cannot be on before). A torch without the flag counts as on (the Function's node
// then, which compiled autograd can lift). Needs the GIL.
bool compiled_autograd_enabled() {
  static PyObject* const module_name = PyUnicode_InternFromString("torch._dynamo.compiled_autograd");
  static PyObject* const flag_name = PyUnicode_InternFromString("compiled_autograd_enabled");
  if (module_name == nullptr || flag_name == nullptr) throw python_error();
  PyObject* module = PyDict_GetItemWithError(PyImport_GetModuleDict(), module_name);  // borrowed
  if (module == nullptr) {
    if (PyErr_Occurred()) throw python_error();
    return false;
  }
  PyObject* flag = PyObject_GetAttr(module, flag_name);
  if (flag == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw python_error();
    PyErr_Clear();
    return true;
  }
  const int on = PyObject_IsTrue(flag);
  Py_DECREF(flag);
  if (on < 0) throw python_error();
  return on != 0;
}

const at::Tensor& tensor_argument(PyObject* const* args, Py_ssize_t index, const char* function) {
  TORCH_CHECK_TYPE(THPVariable_Check(args[index]), "fastbn._C.", function, ": argument ", index,
                   " must be a Tensor, not ", Py_TYPE(args[index])->tp_name);
  return THPVariable_Unpack(args[index]);
}

std::optional<at::Tensor> optional_tensor_argument(PyObject* const* args, Py_ssize_t index, const char* function) {
  if (args[index] == Py_None) return std::nullopt;
  return tensor_argument(args, index, function);
}

double float_argument(PyObject* const* args, Py_ssize_t index) {
  const double value = PyFloat_AsDouble(args[index]);
  if (value == -1.0 && PyErr_Occurred()) throw python_error();
  return value;
}

int64_t int_argument(PyObject* const* args, Py_ssize_t index) {
  const long long value = PyLong_AsLongLong(args[index]);
  if (value == -1 && PyErr_Occurred()) throw python_error();
  return value;
}

}  // namespace

// _train_forward(input, weight, bias, running_mean, running_var, momentum, eps, activation,
//                activation_param, residual) -> output; updates the running statistics when given.
PyObject* eager_train_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* function = "_train_forward";
  TORCH_CHECK_TYPE(nargs == 10, "fastbn._C._train_forward takes 10 arguments, got ", nargs);
  const at::Tensor& input = tensor_argument(args, 0, function);
  const auto weight = optional_tensor_argument(args, 1, function), bias = optional_tensor_argument(args, 2, function);
  const auto running_mean = optional_tensor_argument(args, 3, function);
  const auto running_var = optional_tensor_argument(args, 4, function);
  const double momentum = float_argument(args, 5), eps = float_argument(args, 6);
  const int64_t activation = int_argument(args, 7);
  const double activation_param = float_argument(args, 8);
  const auto residual = optional_tensor_argument(args, 9, function);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
              "fastbn._C._train_forward: running_mean and running_var must both be given or both be None");
  at::Tensor output;
  {
    const PlainAutogradNodes plain_nodes(!compiled_autograd_enabled());
    pybind11::gil_scoped_release no_gil;  // as torch's own bindings: other Python threads run meanwhile
    auto [y, mean, var] = ops().train.call(input, weight, bias, eps, activation, activation_param, residual);
    if (running_mean.has_value()) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // (no_grad and detach, cheaper)
      ops().update_running_stats.call(*running_mean, *running_var, mean, var, momentum,
                                      input.numel() / input.size(1));
    }
    output = std::move(y);
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

// _eval_forward(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
//               residual) -> output.
PyObject* eager_eval_forward(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* function = "_eval_forward";
  TORCH_CHECK_TYPE(nargs == 9, "fastbn._C._eval_forward takes 9 arguments, got ", nargs);
  const at::Tensor& input = tensor_argument(args, 0, function);
  const auto weight = optional_tensor_argument(args, 1, function), bias = optional_tensor_argument(args, 2, function);
  const at::Tensor& running_mean = tensor_argument(args, 3, function);
  const at::Tensor& running_var = tensor_argument(args, 4, function);
  const double eps = float_argument(args, 5);
  const int64_t activation = int_argument(args, 6);
  const double activation_param = float_argument(args, 7);
  const auto residual = optional_tensor_argument(args, 8, function);
  at::Tensor output;
  {
    const PlainAutogradNodes plain_nodes(!compiled_autograd_enabled());
    pybind11::gil_scoped_release no_gil;
    output = ops().eval.call(input, weight, bias, running_mean, running_var, eps, activation, activation_param,
                             residual);
  }
  return THPVariable_Wrap(std::move(output));
  END_HANDLE_TH_ERRORS
}

}  // namespace fastbn
