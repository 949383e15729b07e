// The test-only emulated build of fastbn's CUDA operators: the very file nvcc
// compiles, csrc/cuda/batch_norm_cuda.cu, compiled by g++ against the cuemu
// emulator (tests/cuemu/include first on the include path) and registered for
// CPU tensors (-DFASTBN_CUDA_DISPATCH_KEY=CPU), so that a session that loads this
// library runs the CUDA kernels on every CPU tensor fastbn gets.
// Built by tests/cuemu/build.py; the shared helpers (bn_checks, impl_switch)
// come from fastbn/_C, which this library links against.
#include "cuda/batch_norm_cuda.cu"

#include <torch/library.h>

namespace {
int64_t launches() { return int64_t(cuemu::stats().launches.load()); }
void set_sm_count(int64_t count) {
  TORCH_CHECK(count >= 1, "fastbn_cuemu.set_sm_count: count must be positive, got ", count);
  cuemu::config().sm_count = int(count);
}
int64_t sm_count() { return cuemu::config().sm_count; }
}  // namespace

// The emulator's controls, for tests: kernel launches so far, and the SM count
// that cudaDeviceGetAttribute reports (it sizes the general kernels' grids).
TORCH_LIBRARY(fastbn_cuemu, m) {
  m.def("launches() -> int", &launches);
  m.def("set_sm_count(int count) -> ()", &set_sm_count);
  m.def("sm_count() -> int", &sm_count);
}
