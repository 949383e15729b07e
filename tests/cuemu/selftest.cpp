// cuemu's self-test: the emulated execution model gives the right answers, and
// each diagnostic fires where it must. Exits non-zero on the first failure.
//   g++ -std=c++17 -O1 -Itests/cuemu/include tests/cuemu/selftest.cpp -o selftest -lpthread && ./selftest
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

__global__ void block_sum(const float* x, float* out, int n) {
  __shared__ float warp_sums[32];
  const int tid = threadIdx.x;
  float v = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) v += x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (tid % 32 == 0) warp_sums[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    v = tid < int(blockDim.x / 32) ? warp_sums[tid] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (tid == 0) atomicAdd(out, v);
  }
}

__global__ void lane_ops(int* out) {
  const int lane = threadIdx.x % 32;
  const int up = __shfl_up_sync(0xffffffffu, lane, 1);          // lane 0 keeps its own value
  const int idx = __shfl_sync(0xffffffffu, lane, 5);            // broadcast lane 5
  const int seg = __shfl_xor_sync(0xffffffffu, lane, 1, 16);     // width 16
  const unsigned ballot = __ballot_sync(0xffffffffu, lane % 2);  // odd lanes
  out[threadIdx.x * 4 + 0] = up;
  out[threadIdx.x * 4 + 1] = idx;
  out[threadIdx.x * 4 + 2] = seg;
  out[threadIdx.x * 4 + 3] = int(ballot == 0xaaaaaaaau);
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shuffle_in_divergent_branch(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);  // lanes 16..31 never come
  out[threadIdx.x] = v;
}

__global__ void missing_barrier(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = float(threadIdx.x);
  // no __syncthreads here
  out[threadIdx.x] = s[63 - threadIdx.x];
}

int failures = 0;
void check(bool ok, const std::string& what) {
  printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += !ok;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const cuemu::Error& e) {
    return e.what();
  }
  return "";
}

int main() {
  const int n = 100000;
  std::vector<float> x(n);
  double ref = 0;
  for (int i = 0; i < n; ++i) ref += x[i] = float(i % 97) * 0.5f;
  for (int sched : {0, 1, 2, 3, 4}) {
    cuemu::config().schedule = sched;
    float out = 0;
    cuemu::launch(block_sum, dim3(7), dim3(256), 0, nullptr, x.data(), &out, n);
    check(std::abs(out - ref) <= 1e-6 * ref, "block sum, schedule " + std::to_string(sched));
  }
  cuemu::config().schedule = 0;

  std::vector<int> lanes(64 * 4);
  cuemu::launch(lane_ops, dim3(1), dim3(64), 0, nullptr, lanes.data());
  bool lanes_ok = true;
  for (int t = 0; t < 64; ++t) {
    const int l = t % 32;
    lanes_ok &= lanes[t * 4 + 0] == (l == 0 ? 0 : l - 1) && lanes[t * 4 + 1] == 5 && lanes[t * 4 + 2] == (l ^ 1) &&
                lanes[t * 4 + 3] == 1;
  }
  check(lanes_ok, "shuffles (up, idx, xor with width 16) and ballot");

  int flags[32];
  check(error_of([&] { cuemu::launch(divergent_barrier, dim3(1), dim3(32), 0, nullptr, flags); })
                .find("divergent barrier") != std::string::npos,
        "a barrier in both branches of an if is reported");
  float o[64];
  check(error_of([&] { cuemu::launch(shuffle_in_divergent_branch, dim3(1), dim3(32), 0, nullptr, o); })
                .find("cannot make progress") != std::string::npos,
        "a shuffle whose mask names lanes that never come is reported");
  float out = 0;
  check(error_of([&] { cuemu::launch(block_sum, dim3(1), dim3(2048), 0, nullptr, x.data(), &out, n); })
                .find("invalid launch configuration") != std::string::npos &&
            cudaGetLastError() == cudaErrorInvalidConfiguration && cudaGetLastError() == cudaSuccess,
        "a block of 2048 threads is refused and sets cudaGetLastError once");

  // A missing barrier: the in-order schedule happens to hide it, reverse shows it.
  auto wrong_values = [&] {
    cuemu::launch(missing_barrier, dim3(1), dim3(64), 0, nullptr, o);
    int wrong = 0;
    for (int i = 0; i < 64; ++i) wrong += o[i] != float(63 - i);
    return wrong;
  };
  cuemu::config().schedule = 1;
  check(wrong_values() > 0, "a missing barrier gives wrong values under the reverse schedule");
  cuemu::config().schedule = 0;
  printf("%s\n", failures ? "SELFTEST FAILED" : "selftest passed");
  return failures ? 1 : 0;
}
