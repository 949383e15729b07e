#include "impl_switch.h"

#include <atomic>

namespace fastbn {
namespace {
std::atomic<int> override_value{static_cast<int>(CudaImpl::Auto)};
}

CudaImpl cuda_impl_override() { return static_cast<CudaImpl>(override_value.load(std::memory_order_relaxed)); }

void set_cuda_impl_override(CudaImpl impl) { override_value.store(static_cast<int>(impl), std::memory_order_relaxed); }

}  // namespace fastbn
