// fastbn._C's eager-mode forward entry points (eager.cpp), in its method table (ops.cpp).
#pragma once

#include <Python.h>

namespace fastbn {

PyObject* eager_train_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
PyObject* eager_eval_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastbn
