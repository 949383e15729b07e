// Which CUDA implementation the chooser in csrc/cuda/batch_norm_cuda.cu uses.
// Auto in normal use; tests force General or OnChip on the same inputs
// (fastbn.ops.cuda_implementation). Lives outside the CUDA sources so that the
// CPU-only build exposes the same switch.
#pragma once

namespace fastbn {

enum class CudaImpl : int { Auto = 0, General = 1, OnChip = 2 };

CudaImpl cuda_impl_override();
void set_cuda_impl_override(CudaImpl impl);

}  // namespace fastbn
