// cuemu: the CUDA execution model on the CPU, header-only, C++17, g++/clang.
//
// Kernel source written for nvcc compiles unchanged as host C++: __global__,
// __device__, __host__, __forceinline__ and __launch_bounds__ expand to nothing
// (or `inline`), __shared__ to `static thread_local`, and the built-in variables
// are thread-local uint3/dim3 that the scheduler sets before it resumes a thread.
//
// Execution: each block runs on one OS thread; each CUDA thread of the block is
// a fiber (ucontext makecontext; switching by swapcontext or, on x86-64, a small
// register switch). __syncthreads and warp operations (__shfl*_sync,
// __syncwarp, votes) are cooperative barriers: a fiber runs until it reaches
// one, then the next fiber runs. Blocks are spread over CUEMU_WORKERS OS threads.
//
// Checks (each reported with the block, thread and source line, then abort or
// throw): launch configuration limits, __syncthreads reached at different
// statements by threads of one block, warp operations whose mask names lanes
// that do not take part (deadlock), mismatched masks, reads from lanes outside
// the mask, a block that can make no progress. CUEMU_SCHEDULE=reverse|random
// changes the order fibers run between barriers, so a missing barrier shows as
// a wrong result; CUEMU_BLOCK_ORDER=reverse|random does the same for blocks.
#pragma once

// Kernel sources test this to choose cuemu::launch over <<<...>>>.
#define CUEMU_VERSION 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define CUEMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUEMU_ASAN 1
#endif
#endif
#ifdef CUEMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__
#define __managed__
#define __device_builtin__
#define __align__(n) alignas(n)
#define __grid_constant__
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif

// ------------------------------------------------------------------ vector types, errors, streams

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
};

constexpr int warpSize = 32;

// ------------------------------------------------------------------ the emulator

namespace cuemu {

struct Config {
  int sm_count = 132;            // what cudaDevAttrMultiProcessorCount reports (H100 SXM)
  int workers = 1;               // OS threads that run blocks
  size_t stack_bytes = 64 << 10; // per CUDA thread
  int schedule = 0;              // 0 in order, 1 reverse, 2 random (per round), 3/4 warp-greedy (a warp runs
                                 // until all its lanes block at __syncthreads or exit; warp 0 first / last first)
  int block_order = 0;           // 0 in order, 1 reverse, 2 random
  unsigned seed = 1;
  bool strict = true;            // a thread exiting while others wait at __syncthreads is an error
  bool throw_on_error = true;    // throw cuemu::Error (else print and abort)
};

inline Config& config() {
  static Config c = [] {
    Config c;
    auto env = [](const char* n) { return getenv(n); };
    if (auto v = env("CUEMU_SM_COUNT")) c.sm_count = atoi(v);
    if (auto v = env("CUEMU_WORKERS")) c.workers = std::max(1, atoi(v));
    if (auto v = env("CUEMU_STACK_KB")) c.stack_bytes = size_t(atoi(v)) << 10;
    if (auto v = env("CUEMU_SEED")) c.seed = unsigned(atoi(v));
    if (auto v = env("CUEMU_SCHEDULE"))
      c.schedule = !strcmp(v, "reverse") ? 1 : !strcmp(v, "random") ? 2 : !strcmp(v, "warps") ? 3 : !strcmp(v, "warps-reverse") ? 4 : 0;
    if (auto v = env("CUEMU_BLOCK_ORDER")) c.block_order = !strcmp(v, "reverse") ? 1 : !strcmp(v, "random") ? 2 : 0;
    if (auto v = env("CUEMU_STRICT")) c.strict = atoi(v) != 0;
    return c;
  }();
  return c;
}

struct Stats {
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, resumes{0};
};
inline Stats& stats() {
  static Stats s;
  return s;
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

enum class State : unsigned char { Ready, AtBarrier, AtWarp, Done };

// Minimal register switch (x86-64 SysV): callee-saved registers, MXCSR and
// the x87 control word live on the stack of the fiber being left. glibc's
// swapcontext also saves the signal mask with a system call on every switch.
#if defined(__x86_64__) && !defined(CUEMU_USE_SWAPCONTEXT)
#define CUEMU_FAST_SWITCH 1
extern "C" void cuemu_switch(void** save_sp, void* load_sp);
extern "C" void cuemu_fiber_entry();
#ifndef CUEMU_SWITCH_DEFINED
#define CUEMU_SWITCH_DEFINED
asm(R"(
  .text
  .weak cuemu_switch
  .hidden cuemu_switch
  .type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch,.-cuemu_switch
  .weak cuemu_fiber_entry
  .hidden cuemu_fiber_entry
  .type cuemu_fiber_entry,@function
cuemu_fiber_entry:
  movq %r12, %rdi
  andq $-16, %rsp
  call *%r13
  ud2
  .size cuemu_fiber_entry,.-cuemu_fiber_entry
)");
#endif
#endif

// A saved execution context: a stack pointer (the register switch) or a ucontext.
#ifdef CUEMU_FAST_SWITCH
using Context = void*;
#else
using Context = ucontext_t;
#endif

struct Fiber {
  Context ctx{};
  char* stack = nullptr;
  uint3 tid{0, 0, 0};
  int linear = 0, warp = 0, lane = 0;
  State state = State::Ready;
  // where it waits, for diagnostics
  const char* file = nullptr;
  int line = 0;
  const char* op = nullptr;
  void* fake_stack = nullptr;  // AddressSanitizer's record of the fiber's stack while it is switched out
};

struct Warp {
  unsigned members = 0;   // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  unsigned arrived = 0;   // lanes waiting at the current warp operation
  unsigned expected = 0;  // its mask
  const char* op = nullptr;
  uint64_t stage[32];
  uint64_t pub[32];
  int vote_stage[32];
};

struct Block;
using Body = void (*)(void*);

// One OS thread's execution state: the block it runs and the fibers of that block.
struct Worker {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> order;
  char* stacks = nullptr;
  size_t stack_bytes = 0, stack_count = 0;
  Context sched{};  // the scheduler's context (the OS thread's own stack)
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  int current = -1;
  int live = 0;  // threads not exited
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0, bar_column = 0;
  Body body = nullptr;
  void* body_arg = nullptr;
  std::mt19937 rng;
  std::string error;  // first error of the block
  bool dirty = false; // a block was abandoned: its fibers' stack frames were never unwound

  ~Worker() {
    if (stacks) munmap(stacks, stack_bytes * stack_count);
  }
};

inline thread_local Worker* tl_worker = nullptr;

}  // namespace detail
}  // namespace cuemu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
inline thread_local cudaError_t cuemu_last_error = cudaSuccess;

namespace cuemu {
namespace detail {

[[noreturn]] inline void fail(const std::string& what);

inline std::string where() {
  char buf[160];
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
           threadIdx.y, threadIdx.z);
  return buf;
}

// Saves the running context in `from` and continues `to`, whose stack is
// [to_stack, to_stack + to_stack_size) (told to AddressSanitizer, which also keeps
// the leaving stack's record in *fake_stack).
inline void switch_context(Context* from, Context* to, void** fake_stack, const void* to_stack,
                           size_t to_stack_size) {
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack, to_stack, to_stack_size);
#else
  (void)fake_stack, (void)to_stack, (void)to_stack_size;
#endif
#ifdef CUEMU_FAST_SWITCH
  cuemu_switch(from, *to);
#else
  swapcontext(from, to);
#endif
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(*fake_stack, nullptr, nullptr);
#endif
}

// Back to the scheduler from the running fiber.
inline void yield_to_scheduler() {
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.current];
  switch_context(&f.ctx, &w.sched, &f.fake_stack, w.sched_stack_bottom, w.sched_stack_size);
}

// A fiber's first frame: run the kernel body, then report done.
inline void fiber_main(void*) {
  Worker& w = *tl_worker;
#ifdef CUEMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
  try {
    w.body(w.body_arg);
  } catch (const std::exception& e) {
    if (w.error.empty()) w.error = e.what();
  }
  Fiber& f = w.fibers[w.current];
  f.state = State::Done;
  --w.live;
  Warp& wp = w.warps[f.warp];
  wp.exited |= 1u << f.lane;
  // Threads still waiting at __syncthreads: on sm_70+ an exited thread no
  // longer counts, but code relying on that is fragile; strict mode reports it.
  if (w.bar_arrived > 0) {
    if (config().strict && w.error.empty())
      w.error = where() + " exited while other threads wait at __syncthreads (" + w.bar_file + ":" +
                std::to_string(w.bar_line) + ")";
    if (w.bar_arrived == w.live) {
      w.bar_arrived = 0;
      for (auto& o : w.fibers)
        if (o.state == State::AtBarrier) o.state = State::Ready;
    }
  }
#ifdef CUEMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, w.sched_stack_bottom, w.sched_stack_size);
#endif
#ifdef CUEMU_FAST_SWITCH
  void* dummy;
  cuemu_switch(&dummy, w.sched);
#else
  setcontext(&w.sched);
#endif
  __builtin_unreachable();
}

#ifndef CUEMU_FAST_SWITCH
inline void fiber_trampoline() { fiber_main(nullptr); }
#endif

inline void ensure_stacks(Worker& w, size_t count) {
  const size_t bytes = config().stack_bytes;
  if (w.stacks && w.stack_count >= count && w.stack_bytes == bytes) return;
  if (w.stacks) munmap(w.stacks, w.stack_bytes * w.stack_count);
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, bytes * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw Error("cuemu: cannot map fiber stacks");
  w.stacks = static_cast<char*>(p);
  w.stack_bytes = bytes;
  w.stack_count = count;
  for (size_t i = 0; i < count; ++i) mprotect(w.stacks + i * bytes, page, PROT_NONE);  // guard page
}

// Runs one block: every thread of blockDim as a fiber, until all are done.
inline void run_block(Worker& w, Body body, void* arg) {
  const Config& cfg = config();
  const unsigned nx = blockDim.x, ny = blockDim.y, nz = blockDim.z;
  const int n = int(nx * ny * nz);
  const int nwarps = (n + 31) / 32;
  ensure_stacks(w, size_t(n));
#ifdef CUEMU_ASAN
  if (w.dirty) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    for (size_t i = 0; i < w.stack_count; ++i)
      ASAN_UNPOISON_MEMORY_REGION(w.stacks + i * w.stack_bytes + page, w.stack_bytes - page);
  }
#endif
  w.dirty = false;
  w.fibers.resize(size_t(n));
  w.warps.assign(size_t(nwarps), Warp{});
  w.order.resize(size_t(n));
  w.body = body;
  w.body_arg = arg;
  w.live = n;
  w.bar_arrived = 0;
  w.error.clear();
  for (int i = 0; i < n; ++i) {
    Fiber& f = w.fibers[size_t(i)];
    f = Fiber{};
    f.tid = uint3{unsigned(i) % nx, (unsigned(i) / nx) % ny, unsigned(i) / (nx * ny)};
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.stack = w.stacks + size_t(i) * w.stack_bytes;
    w.warps[size_t(f.warp)].members |= 1u << f.lane;
#ifdef CUEMU_FAST_SWITCH
    // Initial frame for cuemu_switch: 16 bytes of MXCSR/FPU control, six
    // callee-saved registers (r12 = argument, r13 = function), return address.
    uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack + w.stack_bytes);
    sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(sp) & ~uintptr_t(15));
    *--sp = 0;                                              // alignment slot
    *--sp = reinterpret_cast<uint64_t>(&cuemu_fiber_entry);  // return address
    *--sp = 0;                                              // rbp
    *--sp = 0;                                              // rbx
    *--sp = 0;                                              // r12: argument
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);         // r13: function
    *--sp = 0;                                              // r14
    *--sp = 0;                                              // r15
    sp -= 2;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    memcpy(sp, &mxcsr, 4);
    memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, 2);
    f.ctx = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = w.stack_bytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_trampoline, 0);
#endif
  }
  for (int i = 0; i < n; ++i) w.order[size_t(i)] = i;
  if (cfg.schedule == 1) std::reverse(w.order.begin(), w.order.end());
  int done = 0;
  uint64_t resumes = 0;
  while (done < n) {
    if (cfg.schedule == 2) std::shuffle(w.order.begin(), w.order.end(), w.rng);
    bool progressed = false;
    auto resume = [&](int i) {
      Fiber& f = w.fibers[size_t(i)];
      if (f.state != State::Ready) return false;
      progressed = true;
      ++resumes;
      w.current = i;
      threadIdx = f.tid;
      switch_context(&w.sched, &f.ctx, &w.sched_fake_stack, f.stack, w.stack_bytes);
      if (f.state == State::Done) ++done;
      return true;
    };
    if (cfg.schedule >= 3) {
      // one warp at a time, as far as it can go: lanes that race ahead of other warps
      for (int k = 0; k < nwarps && w.error.empty(); ++k) {
        const int wi = cfg.schedule == 3 ? k : nwarps - 1 - k;
        for (bool again = true; again && w.error.empty();) {
          again = false;
          for (int l = 0; l < 32 && w.error.empty(); ++l) {
            const int i = wi * 32 + l;
            if (i < n && resume(i)) again = true;
          }
        }
      }
    } else {
      for (int i : w.order) {
        resume(i);
        if (!w.error.empty()) break;
      }
    }
    if (!w.error.empty()) break;
    if (!progressed) {
      // Deadlock: describe what every waiting thread waits for.
      std::string msg = "cuemu: block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                        std::to_string(blockIdx.z) + ") cannot make progress:";
      int shown = 0;
      for (auto& f : w.fibers) {
        if (f.state == State::Done || shown >= 8) continue;
        ++shown;
        char buf[256];
        snprintf(buf, sizeof buf, "\n  thread (%u,%u,%u) waits in %s at %s:%d", f.tid.x, f.tid.y, f.tid.z,
                 f.op ? f.op : "?", f.file ? f.file : "?", f.line);
        msg += buf;
      }
      for (size_t k = 0; k < w.warps.size(); ++k) {
        const Warp& wp = w.warps[k];
        if (wp.arrived) {
          char buf[200];
          snprintf(buf, sizeof buf, "\n  warp %zu: %s with mask 0x%08x, arrived 0x%08x, exited 0x%08x", k,
                   wp.op ? wp.op : "?", wp.expected, wp.arrived, wp.exited);
          msg += buf;
        }
      }
      w.error = msg;
      break;
    }
  }
  w.current = -1;
  if (!w.error.empty()) w.dirty = true;
  stats().blocks += 1;
  stats().threads += uint64_t(n);
  stats().resumes += resumes;
}

[[noreturn]] inline void fail(const std::string& what) {
  if (tl_worker && tl_worker->current >= 0) {
    // inside a fiber: record and leave the block through the scheduler
    Worker& w = *tl_worker;
    if (w.error.empty()) w.error = what;
    Fiber& f = w.fibers[w.current];
    f.state = State::AtBarrier;  // never resumed
    for (;;) yield_to_scheduler();
  }
  throw Error(what);
}

// ------------------------------------------------------------------ barriers

inline void syncthreads(const char* file, int line, const char* op = "__syncthreads", int column = 0) {
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.current];
  if (w.bar_arrived == 0) {
    w.bar_file = file;
    w.bar_line = line;
    w.bar_column = column;
  } else if (w.bar_line != line || w.bar_column != column || strcmp(w.bar_file, file) != 0) {
    fail("cuemu: " + where() + " reached " + op + " at " + file + ":" + std::to_string(line) +
         " while other threads of its block wait at " + w.bar_file + ":" + std::to_string(w.bar_line) +
         " (divergent barrier)");
  }
  f.file = file;
  f.line = line;
  f.op = op;
  if (++w.bar_arrived == w.live) {
    if (w.live != int(w.fibers.size()) && config().strict && w.error.empty())
      w.error = "cuemu: " + std::string(op) + " at " + file + ":" + std::to_string(line) + " reached by " +
                std::to_string(w.live) + " of " + std::to_string(w.fibers.size()) +
                " threads of block; the others have exited";
    w.bar_arrived = 0;
    for (auto& o : w.fibers)
      if (o.state == State::AtBarrier) o.state = State::Ready;
    return;
  }
  f.state = State::AtBarrier;
  yield_to_scheduler();
}

// All lanes of `mask` of the calling warp meet here. Returns after every one
// has arrived; the data they staged is then in Warp::pub.
inline Warp& warp_meet(unsigned mask, const char* op, const char* file, int line) {
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.current];
  Warp& wp = w.warps[size_t(f.warp)];
  const unsigned me = 1u << f.lane;
  if (!(mask & me))
    fail("cuemu: " + where() + " calls " + op + " at " + file + ":" + std::to_string(line) +
         " with a mask that excludes its own lane");
  if (mask & ~wp.members) {
    char buf[64];
    snprintf(buf, sizeof buf, "0x%08x (lanes 0x%08x exist)", mask, wp.members);
    fail("cuemu: " + where() + " calls " + op + " at " + file + ":" + std::to_string(line) + " with mask " + buf);
  }
  if (wp.arrived == 0) {
    wp.expected = mask;
    wp.op = op;
  } else if (wp.expected != mask) {
    char buf[96];
    snprintf(buf, sizeof buf, "mask 0x%08x while lanes 0x%08x wait with mask 0x%08x", mask, wp.arrived, wp.expected);
    fail("cuemu: " + where() + " calls " + op + " at " + file + ":" + std::to_string(line) + " with " + buf);
  }
  f.file = file;
  f.line = line;
  f.op = op;
  wp.arrived |= me;
  if (wp.arrived == wp.expected) {
    memcpy(wp.pub, wp.stage, sizeof wp.pub);
    wp.arrived = 0;
    const int base = f.warp * 32;
    for (int l = 0; l < 32; ++l) {
      if (!(mask & (1u << l))) continue;
      Fiber& o = w.fibers[size_t(base + l)];
      if (o.state == State::AtWarp) o.state = State::Ready;
    }
    return wp;
  }
  f.state = State::AtWarp;
  yield_to_scheduler();
  return wp;
}

enum class Shfl { Idx, Up, Down, Xor };

template <typename T>
T shfl(unsigned mask, T v, int arg, int width, Shfl kind, const char* op, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.current];
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("cuemu: " + std::string(op) + " at " + file + ":" + std::to_string(line) + " with width " +
         std::to_string(width));
  Warp& wp0 = w.warps[size_t(f.warp)];
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  wp0.stage[f.lane] = bits;
  Warp& wp = warp_meet(mask, op, file, line);
  const int lane = f.lane, seg = lane & ~(width - 1);
  int src = lane;
  switch (kind) {
    case Shfl::Idx: src = seg + (arg & (width - 1)); break;
    case Shfl::Up: src = lane - arg >= seg ? lane - arg : lane; break;
    case Shfl::Down: src = lane + arg < seg + width ? lane + arg : lane; break;
    case Shfl::Xor: src = (lane ^ arg) < seg + width ? (lane ^ arg) : lane; break;
  }
  if (!(mask & (1u << src)))
    fail("cuemu: " + where() + " " + op + " at " + file + ":" + std::to_string(line) + " reads lane " +
         std::to_string(src) + ", which is not in the mask (undefined value)");
  T out;
  memcpy(&out, &wp.pub[src], sizeof(T));
  return out;
}

inline unsigned vote(unsigned mask, int pred, const char* op, const char* file, int line) {
  Worker& w = *tl_worker;
  Fiber& f = w.fibers[w.current];
  w.warps[size_t(f.warp)].stage[f.lane] = pred ? 1 : 0;
  Warp& wp = warp_meet(mask, op, file, line);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && wp.pub[l]) ballot |= 1u << l;
  return ballot;
}

// ------------------------------------------------------------------ launch

inline void check_launch(dim3 g, dim3 b, size_t smem) {
  auto bad = [](const std::string& s) {
    cuemu_last_error = cudaErrorInvalidConfiguration;
    throw Error("cuemu: invalid launch configuration: " + s);
  };
  if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0) bad("zero dimension");
  if (b.x > 1024 || b.y > 1024 || b.z > 64) bad("block dimension over limit");
  if (uint64_t(b.x) * b.y * b.z > 1024) bad("more than 1024 threads per block");
  if (g.x > 2147483647u || g.y > 65535 || g.z > 65535) bad("grid dimension over limit");
  if (smem > 48 * 1024) bad("dynamic shared memory over 48 KiB");
}

inline Worker& worker_for_this_thread() {
  static thread_local Worker w;
  return w;
}

// Runs `body` for every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, Body body, void* arg) {
  const Config& cfg = config();
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order;
  if (cfg.block_order != 0) {
    order.resize(nblocks);
    for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
    if (cfg.block_order == 1) std::reverse(order.begin(), order.end());
    else std::shuffle(order.begin(), order.end(), std::mt19937(cfg.seed));
  }
  std::atomic<uint64_t> next{0};
  std::mutex err_mu;
  std::string first_error;
  auto work = [&](unsigned wid) {
    Worker& w = worker_for_this_thread();
    w.rng.seed(cfg.seed * 7919u + wid);
    Worker* saved = tl_worker;
    tl_worker = &w;
    gridDim = grid;
    blockDim = block;
    for (;;) {
      const uint64_t k = next.fetch_add(1);
      if (k >= nblocks) break;
      const uint64_t id = order.empty() ? k : order[k];
      blockIdx = uint3{unsigned(id % grid.x), unsigned((id / grid.x) % grid.y), unsigned(id / (uint64_t(grid.x) * grid.y))};
      run_block(w, body, arg);
      if (!w.error.empty()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (first_error.empty()) first_error = w.error;
        next = nblocks;
        break;
      }
    }
    tl_worker = saved;
  };
  const unsigned nworkers = unsigned(std::min<uint64_t>(uint64_t(cfg.workers), nblocks));
  if (nworkers <= 1) {
    work(0);
  } else {
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < nworkers; ++i) threads.emplace_back(work, i);
    for (auto& t : threads) t.join();
  }
  if (!first_error.empty()) {
    cuemu_last_error = cudaErrorLaunchFailure;
    if (cfg.throw_on_error) throw Error(first_error);
    fprintf(stderr, "%s\n", first_error.c_str());
    abort();
  }
}

}  // namespace detail

// launch(kernel, grid, block, shared_bytes, stream, args...): converts the
// arguments to the kernel's parameter types once, as a launch does, and runs
// the grid to completion before returning (every stream is synchronous).
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  detail::check_launch(grid, block, smem);
  stats().launches += 1;
  struct Call {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
  } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  detail::run_grid(grid, block,
                   [](void* p) {
                     auto* c = static_cast<Call*>(p);
                     std::apply(c->k, c->params);  // each thread gets its own copy of the parameters
                   },
                   &call);
  return cudaSuccess;
}

}  // namespace cuemu

// ------------------------------------------------------------------ device functions

#define __syncthreads() ::cuemu::detail::syncthreads(__FILE__, __LINE__, "__syncthreads", __COUNTER__)
#define __syncwarp(...) ::cuemu::detail::syncwarp_impl(__FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_sync(mask, v, lane, ...) \
  ::cuemu::detail::shfl_dispatch(mask, v, lane, ::cuemu::detail::Shfl::Idx, "__shfl_sync", __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::cuemu::detail::shfl_dispatch(mask, v, d, ::cuemu::detail::Shfl::Up, "__shfl_up_sync", __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...)                                                                          \
  ::cuemu::detail::shfl_dispatch(mask, v, d, ::cuemu::detail::Shfl::Down, "__shfl_down_sync", __FILE__, __LINE__, \
                                 ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) \
  ::cuemu::detail::shfl_dispatch(mask, v, m, ::cuemu::detail::Shfl::Xor, "__shfl_xor_sync", __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, p) ::cuemu::detail::vote(mask, p, "__ballot_sync", __FILE__, __LINE__)
#define __any_sync(mask, p) (::cuemu::detail::vote(mask, p, "__any_sync", __FILE__, __LINE__) != 0u)
#define __all_sync(mask, p) \
  (::cuemu::detail::vote(mask, p, "__all_sync", __FILE__, __LINE__) == (mask))
#define __syncthreads_count(p) ::cuemu::detail::syncthreads_reduce(p, 0, __FILE__, __LINE__)
#define __syncthreads_and(p) ::cuemu::detail::syncthreads_reduce(p, 1, __FILE__, __LINE__)
#define __syncthreads_or(p) ::cuemu::detail::syncthreads_reduce(p, 2, __FILE__, __LINE__)

namespace cuemu {
namespace detail {
template <typename T>
T shfl_dispatch(unsigned mask, T v, int arg, Shfl kind, const char* op, const char* file, int line, int width = 32) {
  return shfl(mask, v, arg, width, kind, op, file, line);
}
inline void syncwarp_impl(const char* file, int line, unsigned mask = 0xffffffffu) {
  // a full mask in a partial warp means the lanes that exist
  Worker& w = *tl_worker;
  Warp& wp = w.warps[size_t(w.fibers[w.current].warp)];
  if (mask == 0xffffffffu) mask = wp.members;
  warp_meet(mask, "__syncwarp", file, line);
}
inline int syncthreads_reduce(int pred, int kind, const char* file, int line) {
  // two barriers: accumulate, read, then reset for the next use
  Worker& w = *tl_worker;
  static thread_local int acc_count, acc_and, acc_or;
  if (w.bar_arrived == 0) acc_count = 0, acc_and = 1, acc_or = 0;
  acc_count += pred != 0;
  acc_and &= pred != 0;
  acc_or |= pred != 0;
  syncthreads(file, line, "__syncthreads_count/and/or");
  const int out = kind == 0 ? acc_count : kind == 1 ? acc_and : acc_or;
  syncthreads(file, line, "__syncthreads_count/and/or");
  return out;
}
}  // namespace detail
}  // namespace cuemu

inline unsigned __activemask() { return ::cuemu::detail::tl_worker->warps[size_t(::cuemu::detail::tl_worker->fibers[::cuemu::detail::tl_worker->current].warp)].members & ~::cuemu::detail::tl_worker->warps[size_t(::cuemu::detail::tl_worker->fibers[::cuemu::detail::tl_worker->current].warp)].exited; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
// CUDA declares min/max for arithmetic types at global scope in device code.
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline T max(T a, T b) { return a < b ? b : a; }

// atomics: blocks may run on several OS threads, so these are real atomics.
template <typename T>
inline T cuemu_atomic_rmw(T* p, T v, int op) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomic on 4- or 8-byte values");
  if constexpr (std::is_integral<T>::value) {
    switch (op) {
      case 0: return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
      case 1: return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
    }
  }
  T old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  for (;;) {
    T next = op == 0 ? T(old + v) : op == 1 ? v : op == 2 ? (v < old ? v : old) : (old < v ? v : old);
    if (__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
template <typename T>
inline T atomicAdd(T* p, T v) { return cuemu_atomic_rmw(p, v, 0); }
template <typename T>
inline T atomicExch(T* p, T v) { return cuemu_atomic_rmw(p, v, 1); }
template <typename T>
inline T atomicMin(T* p, T v) { return cuemu_atomic_rmw(p, v, 2); }
template <typename T>
inline T atomicMax(T* p, T v) { return cuemu_atomic_rmw(p, v, 3); }
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  __atomic_compare_exchange(p, &compare, &v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}

// ------------------------------------------------------------------ runtime API subset

inline cudaError_t cudaGetLastError() {
  cudaError_t e = cuemu_last_error;
  cuemu_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuemu_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "cuemu error";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = ::cuemu::config().sm_count; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
