// How the CPU passes (batch_norm_passes.h) divide their work: parts per thread, runs
// of a plane, row groups and tiles of interleaved rows, channel blocks, and the size
// thresholds (cache, streaming stores) that pick a walk. Compiled once per ISA.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#include <algorithm>
#include <type_traits>
#include <utility>

#include "bn_checks.h"
#include "cpu/output_streaming.h"
#include "cpu/vec_kernels.h"

#ifndef CPU_CAPABILITY
#error "compiled once per ISA with CPU_CAPABILITY set: include only from csrc/cpu/per_isa/ (see setup.py)"
#endif

namespace fastbn::cpu::CPU_CAPABILITY {

// Values per statistics piece: 16 KiB of float, so its second pass hits L1.
constexpr int64_t kPiece = 4096;

// The j-th of `parts` near-equal ranges of [0, count).
inline std::pair<int64_t, int64_t> part_range(int64_t count, int64_t parts, int64_t j) {
  return {count * j / parts, count * (j + 1) / parts};
}

// Parts a planar pass splits the values into: one per thread, at least kPiece values each.
inline int64_t planar_tasks(const Geometry& g) {
  return std::clamp<int64_t>(g.N * g.C * g.S / kPiece, 1, at::get_num_threads());
}

// Calls task(t, begin, end) in parallel for the `tasks` parts of [0, total).
template <typename F>
inline void parallel_parts(int64_t total, int64_t tasks, const F& task) {
  at::parallel_for(0, tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const auto [begin, end] = part_range(total, tasks, t);
      task(t, begin, end);
    }
  });
}

// Calls f(offset, length, c) for each run of one plane (one sample's values of
// channel c) within the flat range [begin, end) of a planar tensor.
template <typename F>
inline void for_each_plane_run(int64_t begin, int64_t end, const Geometry& g, const F& f) {
  if (begin >= end) return;
  int64_t c = begin / g.S % g.C;  // then counted: no division per run (short runs: S = 25)
  for (int64_t length = std::min(g.S - begin % g.S, end - begin); begin < end;
       begin += length, length = std::min(g.S, end - begin)) {
    f(begin, length, c);
    if (++c == g.C) c = 0;
  }
}

// for_each_plane_run for reductions that take kRuns whole runs at once: calls
// group(offset, channels) for kRuns consecutive whole runs, run j of channel
// channels[j] (the channels wrap around to 0 at C: a group may span samples, and with
// C < kRuns hold a channel more than once), and single(offset, length, c) for the runs
// left over at the ends of [begin, end), in memory order.
template <int64_t kRuns, typename Single, typename Group>
inline void for_each_plane_run_group(int64_t begin, int64_t end, const Geometry& g, const Single& single,
                                     const Group& group) {
  if (begin >= end) return;
  int64_t c = begin / g.S % g.C;
  int64_t offset = begin;
  if (offset % g.S != 0) {  // the part starts inside a run
    const int64_t length = std::min(g.S - offset % g.S, end - offset);
    single(offset, length, c);
    offset += length;
    if (++c == g.C) c = 0;
  }
  int64_t channels[kRuns];
  for (; offset + kRuns * g.S <= end; offset += kRuns * g.S) {
    for (int64_t j = 0; j < kRuns; ++j, c = c + 1 == g.C ? 0 : c + 1) channels[j] = c;
    group(offset, channels);
  }
  for (; offset < end; offset += g.S) {
    single(offset, std::min(g.S, end - offset), c);
    if (++c == g.C) c = 0;
  }
}

// Number of row blocks the interleaved reductions split R rows into.
inline int64_t interleaved_tasks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 8));
}

// Rows per statistics piece: about 512 KiB of float, so the second pass over
// the piece hits L2 (1 MiB per core on Zen 4; 2 MiB on recent Intel cores). Each
// piece ends in scalar work per channel (moments, the second-pass check, a
// merge): with 128 KiB pieces and C = 256 that was about 40% of the statistics.
inline int64_t rows_per_piece(int64_t C) { return std::clamp<int64_t>(131072 / std::max<int64_t>(C, 1), 8, 4096); }

// Rows per parallel chunk of the elementwise passes.
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// Calls f(first_row, rows) for consecutive groups of `group` rows covering [begin, end).
template <typename F>
inline void for_each_row_group(int64_t begin, int64_t end, int64_t group, const F& f) {
  for (int64_t r = begin; r < end; r += group) f(r, std::min(group, end - r));
}

// Calls f(first_row, rows) for tiles of about 4096 values (tile_forward /
// tile_backward) covering the rows [begin, end).
template <typename F>
inline void for_each_row_tile(int64_t begin, int64_t end, int64_t C, const F& f) {
  for_each_row_group(begin, end, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), f);
}

// Calls f(c0, width) for each block of interleaved channels.
template <typename scalar_t, typename F>
inline void for_each_channel_block(int64_t C, const F& f) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock;
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) f(c0, std::min(kBlock, C - c0));
}

// Planar training passes walk a group of channels at a time (in parallel over
// groups) where it pays: the group's statistics or backward sums over its N chunks
// (one sample's runs of the group's channels, contiguous), then the elementwise pass
// over the same chunks while they are in L2, so the inputs come from L3 or memory
// once, not twice. A group is the fewest channels whose chunk reaches
// kChannelGroupChunk bytes (runs N apart are followed poorly by the prefetchers;
// longer chunks less so); runs must be at least kChannelGroupMinRun bytes (shorter
// ones are summed faster several at a time, planar_grouped_*), the group's inputs
// within half the L2, and there must be 2 groups per thread. Module fwd+bwd step,
// 2 threads, in-process A/B on a 2-vCPU Xeon (2 MiB L2), against the memory-order
// walk: one channel per group (runs from 4 KiB) 1.12x-1.20x on 32,64,56,56 and
// 8,64,112,112 (float32 and bfloat16); groups of float32 14x14 and 28x28 runs
// 1.33x-1.41x on 32,256,14,14, 32,512,14,14, 8,256,28,28, 32,128,28,28 (64,96,28,28:
// 1.07x-1.10x); bfloat16 1.02x-1.13x; runs under 512 bytes 0.85x-1.01x. Returns the
// channels per group, or 0 for the memory-order walk. `inputs`: the tensors the
// pass reads (x; x and dy; and a residual).
constexpr int64_t kChannelGroupChunk = 4096;
constexpr int64_t kChannelGroupMinRun = 512;
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
    const long reported = 0;
#endif
    return reported > 0 ? int64_t(reported) : int64_t(1) << 20;
  }();
  return bytes;
}
template <typename scalar_t>
inline int64_t planar_channel_group(const Geometry& g, int64_t inputs) {
  const int64_t run_bytes = g.S * int64_t(sizeof(scalar_t));
  if (g.layout != Layout::Planar || run_bytes < kChannelGroupMinRun) return 0;
  const int64_t channels = (kChannelGroupChunk + run_bytes - 1) / run_bytes;
  const int64_t groups = (g.C + channels - 1) / channels;
  const bool fits = g.N * channels * run_bytes * inputs <= l2_cache_bytes() / 2;
  return fits && groups >= 2 * at::get_num_threads() ? channels : 0;
}

// Bytes of a tensor of g's size.
template <typename scalar_t>
inline int64_t tensor_bytes(const Geometry& g) {
  return g.N * g.C * g.S * int64_t(sizeof(scalar_t));
}

// Whether a tensor of g's size is too large to stay in the caches between
// passes (kOutOfCacheBytes, about half a server L3): the interleaved reductions'
// walk (row_walk_group_rows) follows it.
constexpr int64_t kOutOfCacheBytes = int64_t(16) << 20;
template <typename scalar_t>
inline bool larger_than_cache(const Geometry& g) {
  return tensor_bytes<scalar_t>(g) >= kOutOfCacheBytes;
}

// Whether the interleaved elementwise passes walk each tile's rows in memory
// order (tile_forward / tile_backward's rows_in_order): for tensors from
// kRowOrderBytes on, whose tiles come from L3 or memory rather than L2. 4 MiB:
// in a module's fwd+bwd step (x, y, dy, dx alive; 2 threads, paired in one
// process) row order was 1.26x faster on 32,256,14,14 float32 (6.4 MB) and
// 1.33x on 250,64,11,11 (7.7 MB), and 0.90-1.06x on tensors of 0.8-3.9 MB.
constexpr int64_t kRowOrderBytes = int64_t(4) << 20;
template <typename scalar_t>
inline bool tiles_in_row_order(const Geometry& g) {
  return tensor_bytes<scalar_t>(g) >= kRowOrderBytes;
}

// Rows an interleaved reduction's column loops walk down one channel block before
// the next block, for tensors that fit in the cache (larger ones walk rows in memory
// order: row_walk_group_rows): the piece (`piece_rows`, whose moments are then
// merged) is walked in groups of about kInCacheReductionGroupBytes per input, each
// block down the group and then the next group, so that the group stays in L2 while
// the column loops keep their accumulators in registers down it. Module fwd+bwd steps
// (2 threads, in-process A/B, 11-15 rounds, a 2-vCPU Xeon guest with 2 MiB of L2 per
// core) against whole pieces (512 KiB of float): channels_last float32 (32,256,14,14)
// 1.08x, (16,512,7,7) 1.06x, (250,64,11,11) 1.02x; bfloat16 (32,256,14,14) 1.15x,
// (32,64,56,56) 1.05x, (16,512,7,7) 1.03x, (8,64,112,112) 1.02x, (64,96,28,28) 1.00x,
// (250,64,11,11) 0.98x. (Walks of the large tensors, whole rows or 1 KiB groups, lost
// there: 0.66x-0.89x on float32 (32,256,14,14), (250,64,11,11), (16,512,14,14).)
// Rows of a single block keep whole pieces: the column loops then read memory in order.
constexpr int64_t kInCacheReductionGroupBytes = int64_t(64) << 10;
template <typename scalar_t>
inline int64_t reduction_group_rows(const Geometry& g, int64_t piece_rows) {
  if (g.C <= Lanes<scalar_t>::kBlock) return piece_rows;
  return std::clamp<int64_t>(kInCacheReductionGroupBytes / (g.C * int64_t(sizeof(scalar_t))), 1, piece_rows);
}

// Rows per group when the interleaved reductions walk rows in memory order
// (rows_sum_and_squares, rows_backward_sums; for_each_row_panel), else 0 (the column
// loops in groups of reduction_group_rows). The float group sums of kMaxRowBlocks
// blocks fit in the vector registers, so rows of 2 to kMaxRowBlocks blocks are walked
// whole (one group: every row), wider ones a group of rows at a time, panel by panel
// (rows of a single block: the column loops already read memory in order):
//  - statistics of rows of 2 to kMaxRowBlocks blocks: from kRowOrderBytes on (tensors
//    past the two cores' L2). Against the column walk in kInCacheReductionGroupBytes
//    groups below kOutOfCacheBytes, in a loop of the op (2 threads, in-process A/B, 9
//    rounds, a 2-vCPU Xeon guest with 2 MiB of L2 per core): bfloat16 (32,64,56,56)
//    1.45x, (32,128,28,28) 1.46x, (32,80,40,40) 1.37x, (64,96,28,28) 1.25x; float32
//    (250,64,11,11) 1.10x, (32,128,28,28) 1.07x, (32,96,28,28) 1.04x, (16,64,56,56)
//    1.03x. Module steps: 0.99x-1.08x (the statistics are one pass of the step's eight).
//  - backward sums of rows of 2 to kMaxRowBlocks blocks: past kOutOfCacheBytes; half
//    and bfloat16 rows of 2 or 3 blocks from kRowOrderBytes on. Module steps (same A/B,
//    9-11 rounds): bfloat16 (64,96,28,28) 1.12x-1.16x, (32,80,40,40) 1.11x; but there
//    rows of 4 lost (op loop (32,112,28,28) 0.83x, (64,128,28,28) 0.96x), and float32
//    rows of 3 ((32,96,28,28) 0.97x). Rows of 2 lost on that Xeon too (bfloat16
//    (32,64,56,56) op loop 0.74x) but win on the Zen 4 host (1 MiB L2 per core, 32 MiB
//    L3): bfloat16 channels_last backward op, 2 threads, alternating processes, 4-5
//    rounds, three runs: (32,64,56,56) 1.27x, 1.39x, 1.48x, (8,64,112,112) 1.29x, 1.21x,
//    1.68x (a variant of the same build that left those rows as they were: 0.97x, 0.96x).
//  - wider rows, both reductions: past kOutOfCacheBytes, in groups of about
//    kPanelGroupBytes per input. Before, the column loops walked them in groups of
//    about 1 KiB per input (a row or less: each block of each row loaded and stored
//    its double sums), at a third to a half of a copy's rate. Ops, 2 threads, the
//    2-vCPU Xeon guest with a 480 MiB L3: channels_last float32 (32,256,80,80)
//    statistics 13.6 -> 24.7 GB/s, backward sums 11.6 -> 22.7; bfloat16 (16,512,56,56)
//    9.8 -> 34.1 and 7.4 -> 21.9. Groups of 4-64 KiB all gained about as much; 32 KiB
//    was at least as fast as 16 KiB on (32,256,28,28) and (32,512,28,28) float32.
constexpr int64_t kMaxRowBlocks = 4;
constexpr int64_t kPanelGroupBytes = int64_t(32) << 10;
enum class RowReduction { Statistics, BackwardSums };
template <typename scalar_t>
inline int64_t row_walk_group_rows(const Geometry& g, RowReduction reduction) {
  const int64_t blocks = (g.C + Lanes<scalar_t>::kBlock - 1) / Lanes<scalar_t>::kBlock;
  const int64_t bytes = tensor_bytes<scalar_t>(g);
  const bool past_cache = larger_than_cache<scalar_t>(g);
  if (blocks < 2) return 0;
  if (blocks > kMaxRowBlocks) {
    return past_cache ? std::max<int64_t>(1, kPanelGroupBytes / (g.C * int64_t(sizeof(scalar_t)))) : 0;
  }
  const bool whole_rows = reduction == RowReduction::Statistics
                              ? bytes >= kRowOrderBytes
                              : past_cache || (Lanes<scalar_t>::kReduced && blocks <= 3 && bytes >= kRowOrderBytes);
  return whole_rows ? g.count() : 0;
}

// Rows per float group of the interleaved backward sums (rows_backward_sums,
// column_backward_sums), whose sums are added into the double accumulators once per
// group: kBackwardGroupRows (4) where a channel sums fewer than kLongRowSums values,
// else kLongBackwardGroupRows (16). With many rows fastbn's float rounding over 16 rows
// stays far below torch's own error: against float64 (max |error| / max |float64|),
// channels_last float32 (17,64,64,64), dy with mean 0: grad_bias 6.1e-8 (4 rows),
// 9.3e-8 (16 rows), torch 4.2e-6; grad_weight 5.5e-8, 6.9e-8, torch 5.6e-6. The row
// walk added its float sums into the double arrays in memory every 4 rows, which took
// about a quarter of its time. Module steps (2 threads, the 2-vCPU Xeon guest), 4 -> 16
// rows, row walk: float32 (32,64,56,56) 4953 -> 3952 µs, (16,64,224,224) 50237 ->
// 45291; bfloat16 (16,64,224,224) 40131 -> 28807. Column loops (double sums in
// registers), two runs: float32 (32,128,28,28) 2188 -> 2021 and 2307 -> 2034; bfloat16
// (8,64,112,112) 2328 -> 2197 and 2364 -> 2209; others within the noise (about 5%).
constexpr int64_t kLongRowSums = 4096;
constexpr int64_t kLongBackwardGroupRows = 16;
inline int64_t backward_group_rows(const Geometry& g) {
  return g.count() >= kLongRowSums ? kLongBackwardGroupRows : kBackwardGroupRows;
}

// Calls f(std::integral_constant<int, blocks>{}) for blocks in [1, kMaxRowBlocks].
template <typename F>
inline void with_row_blocks(int64_t blocks, const F& f) {
  static_assert(kMaxRowBlocks == 4, "one case per block count");
  switch (blocks) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    default: return f(std::integral_constant<int, 4>{});
  }
}

// Calls f(first_row, rows, c0, width, blocks) over the rows [begin, end): groups of
// group_rows rows (row_walk_group_rows), each split into panels of up to
// kMaxRowBlocks channel blocks (channels c0 to c0 + width, in `blocks` blocks, an
// std::integral_constant).
template <typename scalar_t, typename F>
inline void for_each_row_panel(int64_t begin, int64_t end, int64_t C, int64_t group_rows, const F& f) {
  constexpr int64_t kBlock = Lanes<scalar_t>::kBlock, kPanel = kMaxRowBlocks * kBlock;
  for_each_row_group(begin, end, group_rows, [&](int64_t r, int64_t n) {
    for (int64_t c0 = 0; c0 < C; c0 += kPanel) {
      const int64_t width = std::min(kPanel, C - c0);
      with_row_blocks((width + kBlock - 1) / kBlock, [&](auto blocks) { f(r, n, c0, width, blocks); });
    }
  });
}

// Outputs from streaming_bytes() on (output_streaming.h: an eighth of the L3, within
// 4-16 MiB) are written with streaming stores, in either layout: past what the L3 keeps
// of a layer's output until the next layer reads it. There a normal store would first
// read every destination line from memory (a third of the traffic of a read + write
// pass), and the next layer reads y from memory anyway. Smaller outputs are stored
// normally, so that whoever reads them next finds them in cache. Measured with
// `python -m bench.blocks`: training fwd+bwd of blocks whose next op reads y (BN then
// torch.relu, relu(BN + residual), BN, relu and a 1x1 conv), a ring of 4 inputs, 2
// threads, alternating processes. On a 2-vCPU Xeon guest (2 MiB L2 per core, L3 480
// MiB: threshold 16 MiB) streamed 4-13 MB tensors ran 1.02x-1.27x slower in both
// layouts (float32 (32,256,14,14) BN+relu 1.25x NCHW, 1.23x channels_last;
// (250,64,11,11) 1.19x / 1.27x; (32,128,28,28) 1.11x / 1.11x), 0.8-4 MB ones too (NCHW
// BN+relu 1.20x-1.52x); from about 20 MB streaming won (float32 (32,64,56,56) BN+relu
// 0.84x NCHW, (32,128,56,56) 0.79x). On a 2-vCPU Zen 4 guest (1 MiB L2 per core, L3 32
// MiB: threshold 4 MiB) streaming from 4 MiB made the float32 channels_last blocks of
// 6-13 MB faster against torch (bench/NOTES.md, twenty-second and twenty-third sessions).

// Whether the planar elementwise passes walk a range of runs as one span
// (flat_forward, flat_backward in vec_elementwise.h) rather than run by run: runs of
// a block or more. Module steps (float32 NCHW, 2 threads, in-process A/B, 9 rounds,
// both streaming from 8 MiB, the threshold of the time): (32,128,28,28)
// 1.15x, (250,32,26,26) 1.08x, (64,96,28,28) 1.07x, (32,256,14,14) 1.04x; 0.99x-1.00x
// on (32,64,56,56), (8,64,112,112), (16,512,7,7). bfloat16 (alternating processes, old
// build / new, 8 and 10 rounds, with its spans streamed from 4 MiB): (64,256,14,14)
// 1.25x / 1.35x, (16,512,7,7) 1.11x / 1.15x, (250,64,11,11) 1.10x / 1.10x,
// (250,32,26,26) 1.09x, (32,256,14,14) 0.94x / 1.09x, (32,64,56,56) 0.95x / 1.02x,
// (8,64,112,112) 0.96x / 1.01x (single rounds spread 0.7x-2.8x); half not measured.
template <typename scalar_t>
inline bool flat_planar_walk(const Geometry& g) {
  return g.S >= Lanes<scalar_t>::kBlock;
}

// Whether an output of g's size is written with streaming stores; for rows
// (interleaved) they also need every row to start 64-byte aligned.
template <typename scalar_t>
inline bool stream_output(const Geometry& g, const scalar_t* out) {
  if (tensor_bytes<scalar_t>(g) < streaming_bytes()) return false;
  return g.layout == Layout::Planar ||
         (reinterpret_cast<uintptr_t>(out) % 64 == 0 && (g.C * int64_t(sizeof(scalar_t))) % 64 == 0);
}

}  // namespace fastbn::cpu::CPU_CAPABILITY
