// The one way fastbn launches a kernel: launch_kernel(kernel, grid, block,
// shared_bytes, stream, args...) runs kernel<<<grid, block, shared_bytes, stream>>>(args...)
// and checks the launch. Under nvcc that is the <<<...>>> syntax; in the test-only
// host build against the cuemu emulator (tests/cuemu), which compiles this same
// source with g++, it is cuemu::launch, which runs the grid to completion on the CPU.
//
// `kernel` is a function pointer, so a kernel template's arguments must all be
// spelled out at the call (nvcc would deduce them from <<<...>>>'s arguments).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

// The dispatch key the CUDA entry points register under: CUDA normally; the
// emulated build registers them for CPU tensors (-DFASTBN_CUDA_DISPATCH_KEY=CPU).
#ifndef FASTBN_CUDA_DISPATCH_KEY
#define FASTBN_CUDA_DISPATCH_KEY CUDA
#endif

namespace fastbn::cuda {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
#if defined(__CUDACC__)
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
#elif defined(CUEMU_VERSION)
  cuemu::launch(kernel, grid, block, shared_bytes, stream, std::forward<Args>(args)...);
#else
#error "csrc/cuda is compiled by nvcc, or by a host compiler against tests/cuemu/include"
#endif
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastbn::cuda
