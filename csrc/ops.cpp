// The operator schemas, defined once for every backend (CPU here in csrc/cpu,
// CUDA in csrc/cuda), and the Python module stub that loads them.
//
// Statistics travel as (mean, biased variance) in the accumulation dtype
// (float32 for half/bfloat16 input): the running-variance update needs the
// variance itself, and 1/sqrt(var + eps) is recomputed where needed by the
// shared formula in bn_math.h.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "cpu/output_streaming.h"
#include "eager.h"
#include "impl_switch.h"

TORCH_LIBRARY(fastbn, m) {
  // `activation` fuses an activation after the normalization: 0 none, 1 relu,
  // 2 leaky_relu (activation_param: negative slope), 3 elu (activation_param:
  // alpha), 4 silu. Backward recomputes the pre-activation output from input.
  //
  // Training forward: batch statistics and normalization in one pass over the
  // channel's data. Returns (output, batch mean, batch biased variance).
  // `residual`, when given, is added before the activation: act(bn(x) + residual),
  // the end of a ResNet block.
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps, int activation=0, "
      "float activation_param=0., Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  // Evaluation forward with given (running) statistics.
  m.def(
      "batch_norm_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
      "float eps, int activation=0, float activation_param=0., Tensor? residual=None) -> Tensor");
  // In-place activated BN: the same forwards writing the output over the input
  // (train returns the batch mean and biased variance).
  m.def(
      "batch_norm_train_(Tensor(a!) input, Tensor? weight, Tensor? bias, float eps, int activation=0, "
      "float activation_param=0.) -> (Tensor, Tensor)");
  m.def(
      "batch_norm_eval_(Tensor(a!) input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
      "float eps, int activation=0, float activation_param=0.) -> ()");
  // Backward of both: (grad_input, grad_weight, grad_bias). `train` says whether
  // mean/var were batch statistics (they then depend on the input) or constants.
  // grad_weight and grad_bias come in the accumulation dtype. output_mask says which
  // of the three are wanted, as in torch's native_batch_norm_backward: one that is
  // not wanted comes back as an empty tensor (0 elements; torch's gives None), and
  // the CPU kernels skip the pass only it needs (the dx pass; in evaluation the
  // reduction). The CUDA kernels compute all three.
  m.def(
      "batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
      "float eps, bool train, int activation=0, float activation_param=0., "
      "bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)");
  // Backward of act(bn(input) + residual): (grad_input, grad_residual, grad_weight, grad_bias).
  m.def(
      "batch_norm_add_act_backward(Tensor grad_output, Tensor input, Tensor residual, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor var, float eps, bool train, int activation, float activation_param) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // In-place activated BN's backward inputs, from the output y = act(bn(x)) alone:
  // (g = grad_output * act'(z), x - mean), both in the accumulation dtype.
  // Needs an invertible activation and no zero weight.
  m.def(
      "batch_norm_invert_output(Tensor grad_output, Tensor output, Tensor? weight, Tensor? bias, Tensor var, "
      "float eps, int activation, float activation_param) -> (Tensor, Tensor)");
  // The same gradients as batch_norm_backward / batch_norm_add_act_backward, in
  // differentiable torch ops (CompositeImplicitAutograd, written in fastbn/ops.py):
  // what the C++ autograd (autograd.cpp) calls when a graph of the backward is
  // wanted (double backward). mean/var: None in training (recomputed from input).
  // Returns (grad_input, grad_weight, grad_bias, grad_residual); without a residual
  // the last is the gradient that would reach one (grad_output through the activation).
  m.def(
      "batch_norm_backward_composite(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor? mean, "
      "Tensor? var, float eps, bool train, int activation=0, float activation_param=0., Tensor? residual=None) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // SyncBatchNorm's phases. Local statistics: (mean, biased variance) of each
  // channel's numel / C values, in the accumulation dtype.
  m.def("batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // Local backward sums (sum(g), sum(g * (x - mean))), g = grad_output * act'(z).
  m.def(
      "batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor var, float eps, int activation=0, float activation_param=0.) -> (Tensor, Tensor)");
  // grad_input from sums over the global batch of `count` values per channel.
  m.def(
      "batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor mean, "
      "Tensor var, Tensor sum_dy, Tensor sum_dy_xmu, float eps, int count, int activation=0, "
      "float activation_param=0.) -> Tensor");
  // running = (1 - factor) * running + factor * batch, variance unbiased by count / (count - 1).
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor var, "
      "float factor, int count) -> ()");
}

namespace {

// _set_cuda_impl(int): 0 auto, 1 general, 2 on-chip (see impl_switch.h).
PyObject* set_cuda_impl(PyObject* /*self*/, PyObject* args) {
  int value = 0;
  if (!PyArg_ParseTuple(args, "i", &value)) return nullptr;
  if (value < 0 || value > 2) {
    PyErr_SetString(PyExc_ValueError, "cuda implementation must be 0 (auto), 1 (general) or 2 (on-chip)");
    return nullptr;
  }
  fastbn::set_cuda_impl_override(static_cast<fastbn::CudaImpl>(value));
  Py_RETURN_NONE;
}

PyObject* get_cuda_impl(PyObject* /*self*/, PyObject* /*args*/) {
  return PyLong_FromLong(static_cast<long>(fastbn::cuda_impl_override()));
}

// The CPU kernels' ISA (cpu/cpu_capability.h): which runs, which can, and a
// switch for tests. Errors come back as RuntimeError with fastbn's message.
PyObject* get_cpu_capability(PyObject* /*self*/, PyObject* /*args*/) {
  try {
    return PyUnicode_FromString(fastbn::cpu::capability_name(fastbn::cpu::active_capability()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* set_cpu_capability(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  try {
    fastbn::cpu::set_active_capability(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cpu_capabilities(PyObject* /*self*/, PyObject* /*args*/) {
  const auto supported = fastbn::cpu::supported_capabilities();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(supported.size()));
  if (names == nullptr) return nullptr;
  for (size_t i = 0; i < supported.size(); ++i) {
    PyObject* name = PyUnicode_FromString(fastbn::cpu::capability_name(supported[i]));
    if (name == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SetItem(names, static_cast<Py_ssize_t>(i), name);
  }
  return names;
}

// The CPU outputs' streaming-store threshold (cpu/output_streaming.h): the size in
// use, a switch for tests and benchmarks, and the cache size the default follows.
PyObject* get_streaming_bytes(PyObject* /*self*/, PyObject* /*args*/) {
  return PyLong_FromLongLong(fastbn::cpu::streaming_bytes());
}

PyObject* set_streaming_bytes(PyObject* /*self*/, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &bytes)) return nullptr;
  try {
    fastbn::cpu::set_streaming_bytes(bytes);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* last_level_cache_bytes(PyObject* /*self*/, PyObject* /*args*/) {
  return PyLong_FromLongLong(fastbn::cpu::last_level_cache_bytes());
}

PyMethodDef module_methods[] = {
    {"_set_cuda_impl", set_cuda_impl, METH_VARARGS, "Force the CUDA implementation (tests)."},
    {"_get_cuda_impl", get_cuda_impl, METH_NOARGS, "The forced CUDA implementation."},
    {"_get_cpu_capability", get_cpu_capability, METH_NOARGS, "The ISA whose CPU kernels run."},
    {"_set_cpu_capability", set_cpu_capability, METH_VARARGS, "Run another supported ISA's CPU kernels (tests)."},
    {"_cpu_capabilities", cpu_capabilities, METH_NOARGS, "The ISAs this CPU and build can run, lowest first."},
    {"_get_streaming_bytes", get_streaming_bytes, METH_NOARGS, "CPU outputs from this size on are streamed."},
    {"_set_streaming_bytes", set_streaming_bytes, METH_VARARGS, "Stream CPU outputs from another size (tests)."},
    {"_last_level_cache_bytes", last_level_cache_bytes, METH_NOARGS, "cpu0's largest data cache (sysfs), 0: unknown."},
    {"_train_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fastbn::eager_train_forward)),
     METH_FASTCALL, "Eager training forward: batch_norm_train and the running-statistics update (eager.cpp)."},
    {"_eval_forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fastbn::eager_eval_forward)),
     METH_FASTCALL, "Eager eval forward: batch_norm_eval (eager.cpp)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// `import fastbn._C` runs the TORCH_LIBRARY registrations above; the module
// itself reports how it was built and holds the implementation switches. A
// FASTBN_CPU_CAPABILITY this CPU cannot honour fails the import (every CPU op
// would fail with the same message).
PyObject* PyInit__C(void) {
  try {
    fastbn::cpu::active_capability();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ImportError, e.what_without_backtrace());
    return nullptr;
  }
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fastbn's compiled operators (registered under torch.ops.fastbn)",
      -1,    // no per-module state
      module_methods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FASTBN_WITH_CUDA
  PyModule_AddIntConstant(module, "with_cuda", 1);
#else
  PyModule_AddIntConstant(module, "with_cuda", 0);
#endif
  return module;
}
}
