// Elementwise passes: the forward and backward applied to one channel's run (span_*)
// or to a tile of interleaved rows (tile_*).
// Part of the CPU kernels' vector loops (vec_kernels.h lists them all); compiled once per ISA.
#pragma once

#include <array>
#include <type_traits>
#include <utility>

#include "cpu/vec_reductions.h"

namespace fastbn::cpu::CPU_CAPABILITY {

// Calls block(i, count, streamed) over the span [0, n) in blocks of at most
// kBlock values: when streaming, first the head up to the output's 64-byte
// alignment in plain stores, then whole blocks (streamed) and a short tail.
// The whole blocks pass count as the constant kBlock: with `block` inlined
// (callers mark it C10_ALWAYS_INLINE_ATTRIBUTE) their loads and stores need no
// test of the count. (Not inlined, GCC called the bfloat16 backward's block as a
// function per 32 values, reloading the coefficient vectors each time.)
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE void for_each_span_block(const scalar_t* out, int64_t n, bool stream, const F& block) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;
  // an output not aligned to its element size (a view of raw bytes) can never be
  // aligned for streaming stores: plain stores, in whole blocks, throughout
  stream = stream && reinterpret_cast<uintptr_t>(out) % sizeof(scalar_t) == 0;
  // The head can span several blocks: 64 bytes are up to 31 half/bfloat16
  // values, and a block of them is 16 values on AVX2 and DEFAULT.
  const int64_t head = stream_head(out, n, stream);
  for (int64_t i = 0; i < head; i += kBlock) block(i, std::min<int64_t>(kBlock, head - i), false);
  int64_t i = head;
  if (stream) {
    for (; i + kBlock <= n; i += kBlock) block(i, kBlock, true);
  } else {
    for (; i + kBlock <= n; i += kBlock) block(i, kBlock, false);
  }
  if (i < n) block(i, n - i, false);
}

// y = act(((x - mean_hi) - mean_lo) * scale + bias [+ residual]) (forward_apply in
// bn_math.h) over a span; residual may be null; y may be x (in-place activated BN).
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t n,
                         const ForwardCoefficients<acc_t>& k, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const auto f = forward_vecs(k);
  const Vec vparam(param);
  for_each_span_block(y, n, stream, [&](int64_t i, int64_t count, bool streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    Vec lo, hi;
    load_values<Order::Any>(x + i, count, lo, hi);
    lo = f.z(lo);
    hi = f.z(hi);
    if (residual != nullptr) {
      Vec rlo, rhi;
      load_values<Order::Any>(residual + i, count, rlo, rhi);
      lo = lo + rlo;
      hi = hi + rhi;
    }
    store_values<Order::Any>(y + i, count, vec_activation<A>(lo, vparam), vec_activation<A>(hi, vparam), streamed);
  });
}

// dx = g * k_dy + (x - mean) * k_xmu + k_const over a span, g = dy * act'(z [+ residual]);
// grad_residual (may be null) gets g. residual may be null.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void span_backward(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, scalar_t* dx,
                          scalar_t* grad_residual, int64_t n, const ForwardCoefficients<acc_t>& fk,
                          const BackwardCoefficients<acc_t>& k, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const auto f = forward_vecs(fk);
  const Vec vparam(param), vmean(k.mean), vkdy(k.k_dy), vkxmu(k.k_xmu), vkconst(k.k_const);
  for_each_span_block(dx, n, stream, [&](int64_t i, int64_t count, bool streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    Vec dlo, dhi, xlo, xhi, rlo, rhi;
    load_values<Order::Any>(dy + i, count, dlo, dhi);
    load_values<Order::Any>(x + i, count, xlo, xhi);
    load_residual<A, Order::Any>(residual, i, count, rlo, rhi);
    const Vec glo = grad_before_activation<A>(dlo, xlo, rlo, f, vparam);
    const Vec ghi = grad_before_activation<A>(dhi, xhi, rhi, f, vparam);
    store_values<Order::Any>(dx + i, count, at::vec::fmadd(glo, vkdy, at::vec::fmadd(xlo - vmean, vkxmu, vkconst)),
                             at::vec::fmadd(ghi, vkdy, at::vec::fmadd(xhi - vmean, vkxmu, vkconst)), streamed);
    // grad_residual's alignment may differ from dx's: plain stores
    if (grad_residual != nullptr) store_values<Order::Any>(grad_residual + i, count, glo, ghi);
  });
}

// Row tiles: `rows` consecutive rows of C interleaved channels, walked one
// block of channels at a time down the tile, so each block's per-channel
// coefficients are loaded once per tile rather than once per row (with C = 32
// a row is a single block: per-row loads would double the instructions per
// value). The tile stays in L1/L2 across its channel blocks. rows_in_order
// (tiles_in_row_order: tensors that come from L3 or memory): with several
// blocks, rows are walked in memory order instead and the coefficients come
// from L1 each time: a block-by-block walk reads each row in pieces, which the
// hardware prefetchers follow poorly from memory (32,64,56,56 channels_last
// eval 1136 -> 848 µs; 32,256,14,14 fwd+bwd step 1.26x faster). With the
// tensor in L2 the block walk is faster (an op called in a loop on
// 32,256,14,14: 161 against 182 µs). Half and bfloat16 walk groups of rows
// (tile_group_rows) in that order instead of single rows. Rows of 2 to 4 whole
// blocks need neither: their coefficients stay in registers (walk_register_tile).

// Rows per group of the row-order walk: each channel block's coefficients (8
// vectors forward, 16 backward) are loaded once per group, then the block is
// applied down the group's rows. Half and bfloat16: groups of about
// kTileGroupBytes, still read in memory order at that scale. Their passes are bound
// by the conversions, and the per-row reloads took load slots from them: module
// fwd+bwd steps (2 threads, in-process A/B, 7 rounds) were 1.08-1.23x faster with
// AVX-512 and 1.20-1.31x with AVX2 on (32,64,56,56), (64,96,28,28), (8,64,112,112)
// bfloat16, 1.06-1.14x in half. float32 and float64 (bound by memory) keep single
// rows: 1 KiB groups gave 0.8x-1.12x there, no consistent direction.
constexpr int64_t kTileGroupBytes = 1024;
template <typename scalar_t>
inline int64_t tile_group_rows(int64_t C) {
  if constexpr (!Lanes<scalar_t>::kReduced) return 1;
  return std::max<int64_t>(1, kTileGroupBytes / (C * int64_t(sizeof(scalar_t))));
}

// Calls walk(has_extras, streamed) with the two runtime flags as compile-time
// constants (std::bool_constant), so a tile's loops compile without their tests.
// With the tests in the loop (and the block width computed per block) GCC kept the
// row loop's counter on the stack and tested a flag from the stack per block; the float32
// channels_last eval of (16,512,7,7), in L2, took 2.7x torch's `x * 1.5` per
// thread; specialized, module eval steps were 1.07x-1.47x faster and fwd+bwd steps
// 1.07x-1.15x (float32 channels_last, 2 threads; bench/NOTES.md, thirteenth session).
template <typename F>
C10_ALWAYS_INLINE void with_constant_flags(bool has_extras, bool stream, const F& walk) {
  if (has_extras) {
    stream ? walk(std::true_type{}, std::true_type{}) : walk(std::true_type{}, std::false_type{});
  } else {
    stream ? walk(std::false_type{}, std::true_type{}) : walk(std::false_type{}, std::false_type{});
  }
}

// Rows of 2 to kMaxRegisterTileBlocks whole channel blocks, in either order: the
// coefficients of every block of the row are loaded once per tile and kept in
// registers (those that do not fit spill to the stack), and the rows are walked in
// memory order, each row's blocks unrolled. The row-order walk of walk_tile loads
// each block's coefficients again for every row, 8-16 vectors per 2 of data. Ops
// in a loop, 2 threads, a 2-vCPU Zen 4 guest (1 MiB L2 per core, 32 MiB L3), three
// alternations of the builds before and after, channels_last float32: eval of
// (250,64,11,11) (row order) 195-224 -> 133-137 µs, (32,96,14,14) (block walk) 53-62
// -> 44-50 µs, training forward of (250,64,11,11) 257-294 -> 191-217 µs; bfloat16
// (64,96,28,28) eval 440-472 -> 410-425 µs; others within the host's spread.
constexpr int64_t kMaxRegisterTileBlocks = 4;
template <typename F>
C10_ALWAYS_INLINE void with_register_tile_blocks(int64_t blocks, const F& f) {
  static_assert(kMaxRegisterTileBlocks == 4, "one case per block count");
  switch (blocks) {
    case 2: return f(std::make_index_sequence<2>{});
    case 3: return f(std::make_index_sequence<3>{});
    default: return f(std::make_index_sequence<4>{});
  }
}

template <typename scalar_t, typename Coefficients, typename Block, size_t... kBlocks>
C10_ALWAYS_INLINE void walk_register_tile(int64_t rows, const Coefficients& coefficients, const Block& block,
                                          std::index_sequence<kBlocks...>) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;
  const std::array q{coefficients(int64_t(kBlocks) * kBlock)...};
  for (int64_t r = 0; r < rows; ++r) (block(r, int64_t(kBlocks) * kBlock, kBlock, q[kBlocks]), ...);
}

// Walks a tile: block(r, c0, width, coefficients(c0)) for every row r and block of
// channels c0 (width values, the constant kBlock but in a last partial block): rows
// of 2 to kMaxRegisterTileBlocks whole blocks row by row (walk_register_tile), other
// rows each block down a group of rows: the whole tile, or tile_group_rows in row order.
template <typename scalar_t, typename Coefficients, typename Block>
C10_ALWAYS_INLINE void walk_tile(int64_t rows, int64_t C, bool rows_in_order, const Coefficients& coefficients,
                                 const Block& block) {
  using L = Lanes<scalar_t>;
  if (C % L::kBlock == 0 && C / L::kBlock >= 2 && C / L::kBlock <= kMaxRegisterTileBlocks) {
    return with_register_tile_blocks(C / L::kBlock, [&](auto blocks) C10_ALWAYS_INLINE_ATTRIBUTE {
      walk_register_tile<scalar_t>(rows, coefficients, block, blocks);
    });
  }
  const int64_t group = rows_in_order && C > L::kBlock ? tile_group_rows<scalar_t>(C) : rows;
  const int64_t whole = C / L::kBlock * L::kBlock;
  for (int64_t r0 = 0; r0 < rows; r0 += group) {
    const int64_t r1 = std::min(rows, r0 + group);
    for (int64_t c0 = 0; c0 < whole; c0 += L::kBlock) {
      const auto q = coefficients(c0);
      for (int64_t r = r0; r < r1; ++r) block(r, c0, L::kBlock, q);
    }
    if (whole < C) {
      const auto q = coefficients(whole);
      for (int64_t r = r0; r < r1; ++r) block(r, whole, C - whole, q);
    }
  }
}

// y[r][c] = act(forward_apply(k[c], x[r][c]) [+ residual[r][c]]); residual may be
// null. stream: whole blocks as streaming stores (rows must start aligned).
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void tile_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t rows, int64_t C,
                         const ForwardArrays<acc_t>& k, acc_t param, bool stream, bool rows_in_order) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vparam(param);
  struct Coefficients {
    ForwardVecs<Vec> f0, f1;
  };
  auto coefficients = [&](int64_t c0) C10_ALWAYS_INLINE_ATTRIBUTE {
    return Coefficients{forward_vecs(k, c0), forward_vecs(k, c0 + L::kVec)};
  };
  with_constant_flags(residual != nullptr, stream, [&](auto has_residual, auto streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    auto block = [&](int64_t r, int64_t c0, int64_t width, const Coefficients& q) C10_ALWAYS_INLINE_ATTRIBUTE {
      const int64_t at = r * C + c0;
      Vec v0, v1;
      load_values(x + at, width, v0, v1);
      Vec z0 = q.f0.z(v0), z1 = q.f1.z(v1);
      if constexpr (decltype(has_residual)::value) {
        Vec r0, r1;
        load_values(residual + at, width, r0, r1);
        z0 = z0 + r0;
        z1 = z1 + r1;
      }
      store_values(y + at, width, vec_activation<A>(z0, vparam), vec_activation<A>(z1, vparam),
                   decltype(streamed)::value);
    };
    walk_tile<scalar_t>(rows, C, rows_in_order, coefficients, block);
  });
}

// dx[r][c] = backward_apply(k[c], g, x[r][c]), g = dy * act'(z [+ residual]);
// grad_residual (may be null) gets g. residual may be null. stream as in tile_forward.
template <Activation A, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline void tile_backward(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, scalar_t* dx,
                          scalar_t* grad_residual, int64_t rows, int64_t C, const ForwardArrays<acc_t>& fk,
                          const BackwardArrays<acc_t>& k, acc_t param, bool stream, bool rows_in_order) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vparam(param);
  // One block of channels c0 .. c0 + kBlock of one row, with its coefficients.
  struct Coefficients {
    ForwardVecs<Vec> f0, f1;
    Vec mean0, mean1, kdy0, kdy1, kxmu0, kxmu1, kconst0, kconst1;
  };
  auto coefficients = [&](int64_t c0) C10_ALWAYS_INLINE_ATTRIBUTE {
    const int64_t c1 = c0 + L::kVec;
    return Coefficients{forward_vecs(fk, c0), forward_vecs(fk, c1),
                        Vec::loadu(k.mean.data() + c0), Vec::loadu(k.mean.data() + c1),
                        Vec::loadu(k.k_dy.data() + c0), Vec::loadu(k.k_dy.data() + c1),
                        Vec::loadu(k.k_xmu.data() + c0), Vec::loadu(k.k_xmu.data() + c1),
                        Vec::loadu(k.k_const.data() + c0), Vec::loadu(k.k_const.data() + c1)};
  };
  // the extras: a residual (read) or grad_residual (written); neither, in plain BN
  const bool has_extras = residual != nullptr || grad_residual != nullptr;
  with_constant_flags(has_extras, stream, [&](auto extras, auto streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr bool kExtras = decltype(extras)::value;
    auto block = [&](int64_t r, int64_t c0, int64_t width, const Coefficients& q) C10_ALWAYS_INLINE_ATTRIBUTE {
      const int64_t at = r * C + c0;
      Vec d0, d1, v0, v1, r0, r1;
      load_values(dy + at, width, d0, d1);
      load_values(x + at, width, v0, v1);
      load_residual<A>(kExtras ? residual : static_cast<const scalar_t*>(nullptr), at, width, r0, r1);
      const Vec g0 = grad_before_activation<A>(d0, v0, r0, q.f0, vparam);
      const Vec g1 = grad_before_activation<A>(d1, v1, r1, q.f1, vparam);
      store_values(dx + at, width, at::vec::fmadd(g0, q.kdy0, at::vec::fmadd(v0 - q.mean0, q.kxmu0, q.kconst0)),
                   at::vec::fmadd(g1, q.kdy1, at::vec::fmadd(v1 - q.mean1, q.kxmu1, q.kconst1)),
                   decltype(streamed)::value);
      if constexpr (kExtras) {
        if (grad_residual != nullptr) store_values(grad_residual + at, width, g0, g1);
      }
    };
    walk_tile<scalar_t>(rows, C, rows_in_order, coefficients, block);
  });
}

// ------------------------------------------------ planar ranges across runs
// The planar elementwise passes over a contiguous range of runs (a thread's part, or
// one sample's chunk of a channel group) as one span: blocks of kBlock values placed
// by the output's alignment rather than by the runs, a block that crosses from one
// run into the next taking, lane by lane, the coefficients of the run the lane lies
// in. Why: walked run by run, a plane that is not a whole number of 64-byte lines
// (14x14 float32: 784 bytes) starts and ends every run inside a line, and those
// lines took plain stores, which first read the line: streaming then saved nothing.
// The eval op on (32,256,14,14) float32 NCHW, cold input and output, took 730-940 µs
// streamed run by run against 404-449 for the same bytes in 56x56 planes and 428-514
// for channels_last (streamed by whole rows). Needs S >= kBlock: a block then crosses
// at most one run's end (flat_planar_walk).

// Lanes where `mask` is set from `a`, the others from `b`.
template <typename Vec>
C10_ALWAYS_INLINE ForwardVecs<Vec> select_lanes(const Vec& mask, const ForwardVecs<Vec>& a, const ForwardVecs<Vec>& b) {
  return {Vec::blendv(b.hi, a.hi, mask), Vec::blendv(b.lo, a.lo, mask), Vec::blendv(b.scale, a.scale, mask),
          Vec::blendv(b.bias, a.bias, mask)};
}

// One channel's backward coefficients as vectors (the forward ones recompute z for
// the activation's derivative).
template <typename Vec>
struct BackwardVecs {
  ForwardVecs<Vec> f;
  Vec mean, k_dy, k_xmu, k_const;
};

template <typename acc_t>
C10_ALWAYS_INLINE BackwardVecs<Vectorized<acc_t>> backward_vecs(const ForwardCoefficients<acc_t>& fk,
                                                                const BackwardCoefficients<acc_t>& k) {
  using Vec = Vectorized<acc_t>;
  return {forward_vecs(fk), Vec(k.mean), Vec(k.k_dy), Vec(k.k_xmu), Vec(k.k_const)};
}

template <typename Vec>
C10_ALWAYS_INLINE BackwardVecs<Vec> select_lanes(const Vec& mask, const BackwardVecs<Vec>& a,
                                                 const BackwardVecs<Vec>& b) {
  return {select_lanes(mask, a.f, b.f), Vec::blendv(b.mean, a.mean, mask), Vec::blendv(b.k_dy, a.k_dy, mask),
          Vec::blendv(b.k_xmu, a.k_xmu, mask), Vec::blendv(b.k_const, a.k_const, mask)};
}

// Calls block(i, count, streamed, lo, hi) over the offsets [begin, end) of a planar
// tensor of runs of S values (run r is channel r % C's) in blocks of kBlock values,
// lo and hi the coefficients of the block's low and high vector of lanes; `out` (the
// output) places the blocks: when streaming, a head in plain stores up to its 64-byte
// alignment, then whole blocks streamed, and a short tail. coefficients(c): channel
// c's, called once per run, only for runs in the range. S >= kBlock.
template <typename scalar_t, typename Coefficients, typename Block>
C10_ALWAYS_INLINE void for_each_flat_block(const scalar_t* out, int64_t begin, int64_t end, int64_t S, int64_t C,
                                           bool stream, const Coefficients& coefficients, const Block& block) {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  using T = typename Vec::value_type;
  if (begin >= end) return;
  int64_t run_end = (begin / S + 1) * S, c = begin / S % C;
  auto k = coefficients(c);
  Vec lane_lo, lane_hi;  // each lane's value in the block, as the blocks load (Order::Any)
  lane_positions<Order::Any, scalar_t>(lane_lo, lane_hi);
  auto next_block = [&](int64_t i, int64_t count, auto streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    if (i == run_end) {  // the last block ended with its run
      run_end += S;
      c = c + 1 == C ? 0 : c + 1;
      k = coefficients(c);
    }
    if (i + count <= run_end) return block(i, count, streamed, k, k);
    const Vec boundary(T(run_end - i));  // the lanes below it are this run's
    run_end += S;
    c = c + 1 == C ? 0 : c + 1;
    const auto next = coefficients(c);
    block(i, count, streamed, select_lanes(lane_lo < boundary, k, next), select_lanes(lane_hi < boundary, k, next));
    k = next;
  };
  // an output not aligned to its element size can never be aligned for streaming stores
  stream = stream && reinterpret_cast<uintptr_t>(out) % sizeof(scalar_t) == 0;
  const int64_t head_end = begin + stream_head(out + begin, end - begin, stream);
  for (int64_t i = begin; i < head_end; i += L::kBlock) {
    next_block(i, std::min<int64_t>(L::kBlock, head_end - i), std::false_type{});
  }
  int64_t i = head_end;
  if (stream) {
    for (; i + L::kBlock <= end; i += L::kBlock) next_block(i, L::kBlock, std::true_type{});
  } else {
    for (; i + L::kBlock <= end; i += L::kBlock) next_block(i, L::kBlock, std::false_type{});
  }
  if (i < end) next_block(i, end - i, std::false_type{});
}

// span_forward over the offsets [begin, end) of a planar tensor (see
// for_each_flat_block); coefficients(c): channel c's ForwardCoefficients.
template <Activation A, typename scalar_t, typename acc_t, typename Coefficients>
inline void flat_forward(const scalar_t* x, const scalar_t* residual, scalar_t* y, int64_t begin, int64_t end,
                         int64_t S, int64_t C, const Coefficients& coefficients, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const Vec vparam(param);
  auto vecs = [&](int64_t c) C10_ALWAYS_INLINE_ATTRIBUTE { return forward_vecs(coefficients(c)); };
  auto walk = [&](auto has_residual) C10_ALWAYS_INLINE_ATTRIBUTE {
    auto block = [&](int64_t i, int64_t count, auto streamed, const ForwardVecs<Vec>& f_lo,
                     const ForwardVecs<Vec>& f_hi) C10_ALWAYS_INLINE_ATTRIBUTE {
      Vec lo, hi;
      load_values<Order::Any>(x + i, count, lo, hi);
      lo = f_lo.z(lo);
      hi = f_hi.z(hi);
      if constexpr (decltype(has_residual)::value) {
        Vec rlo, rhi;
        load_values<Order::Any>(residual + i, count, rlo, rhi);
        lo = lo + rlo;
        hi = hi + rhi;
      }
      store_values<Order::Any>(y + i, count, vec_activation<A>(lo, vparam), vec_activation<A>(hi, vparam),
                               decltype(streamed)::value);
    };
    for_each_flat_block(y, begin, end, S, C, stream, vecs, block);
  };
  residual != nullptr ? walk(std::true_type{}) : walk(std::false_type{});
}

// span_backward over the offsets [begin, end) of a planar tensor (see
// for_each_flat_block); coefficients(c): channel c's BackwardVecs.
template <Activation A, typename scalar_t, typename acc_t, typename Coefficients>
inline void flat_backward(const scalar_t* dy, const scalar_t* x, const scalar_t* residual, scalar_t* dx,
                          scalar_t* grad_residual, int64_t begin, int64_t end, int64_t S, int64_t C,
                          const Coefficients& coefficients, acc_t param, bool stream) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const Vec vparam(param);
  const bool has_extras = residual != nullptr || grad_residual != nullptr;
  auto walk = [&](auto extras) C10_ALWAYS_INLINE_ATTRIBUTE {
    constexpr bool kExtras = decltype(extras)::value;
    auto block = [&](int64_t i, int64_t count, auto streamed, const BackwardVecs<Vec>& k_lo,
                     const BackwardVecs<Vec>& k_hi) C10_ALWAYS_INLINE_ATTRIBUTE {
      Vec dlo, dhi, xlo, xhi, rlo, rhi;
      load_values<Order::Any>(dy + i, count, dlo, dhi);
      load_values<Order::Any>(x + i, count, xlo, xhi);
      load_residual<A, Order::Any>(kExtras ? residual : static_cast<const scalar_t*>(nullptr), i, count, rlo, rhi);
      const Vec glo = grad_before_activation<A>(dlo, xlo, rlo, k_lo.f, vparam);
      const Vec ghi = grad_before_activation<A>(dhi, xhi, rhi, k_hi.f, vparam);
      const Vec dx_lo = at::vec::fmadd(glo, k_lo.k_dy, at::vec::fmadd(xlo - k_lo.mean, k_lo.k_xmu, k_lo.k_const));
      const Vec dx_hi = at::vec::fmadd(ghi, k_hi.k_dy, at::vec::fmadd(xhi - k_hi.mean, k_hi.k_xmu, k_hi.k_const));
      store_values<Order::Any>(dx + i, count, dx_lo, dx_hi, decltype(streamed)::value);
      if constexpr (kExtras) {
        if (grad_residual != nullptr) store_values<Order::Any>(grad_residual + i, count, glo, ghi);
      }
    };
    for_each_flat_block(dx, begin, end, S, C, stream, coefficients, block);
  };
  has_extras ? walk(std::true_type{}) : walk(std::false_type{});
}

}  // namespace fastbn::cpu::CPU_CAPABILITY
