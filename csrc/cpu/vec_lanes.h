// Lanes of at::vec::Vectorized: how the CPU kernels load and store a block of values of
// any dtype (two vectors of the accumulation type), with masked tails and streaming stores.
// Part of the CPU kernels' vector loops (vec_kernels.h lists them all); compiled once per ISA.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <array>
#include <cstring>
#include <vector>

#include "bn_math.h"

#ifndef CPU_CAPABILITY
#error "compiled once per ISA with CPU_CAPABILITY set: include only from csrc/cpu/per_isa/ (see setup.py)"
#endif

namespace fastbn::cpu::CPU_CAPABILITY {

// Fully unrolls the loops over a block's reduction vectors, so that arrays of
// accumulators live in registers (not unrolled, GCC keeps them on the stack and
// every add waits for a store to forward).
#if defined(__clang__)
#define FASTBN_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define FASTBN_UNROLL _Pragma("GCC unroll 8")
#else
#define FASTBN_UNROLL
#endif

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512_BF16)
// The lanes of v that hold a subnormal (exponent bits zero, mantissa not), told by its
// bits: vfpclassps would do it in one instruction but sees no subnormal while MXCSR.DAZ
// is set, and those would then be written as zero where c10 writes them.
C10_ALWAYS_INLINE __mmask16 subnormal_lanes(const __m512& v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __mmask16 zero_exponent = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_test_epi32_mask(zero_exponent, bits, _mm512_set1_epi32(0x007fffff));
}

// 32 floats (lo's first) as bfloat16, rounded to nearest even by one instruction
// (vcvtne2ps2bf16) where at::vec's conversion takes about ten integer operations, most
// of the instructions of a bfloat16 output pass (perf: bench/NOTES.md, twenty-fourth
// session). The instruction reads subnormal inputs as zero, c10::BFloat16 keeps them: a
// block holding one returns false (the caller rounds it with integer operations, bits
// for bits as c10). A NaN stays a NaN (quiet, its sign kept; at::vec writes 0xffff).
C10_ALWAYS_INLINE bool bfloat16_by_instruction(const __m512& lo, const __m512& hi, __m512i& out) {
  if (C10_UNLIKELY((subnormal_lanes(lo) | subnormal_lanes(hi)) != 0)) return false;
  out = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  return true;
}
#endif

template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  // Whether the planar statistics sum float groups about a float shift
  // (span_sum_and_squares): every dtype that accumulates in float, float32 too.
  static constexpr bool kFloatStatistics = std::is_same_v<acc_t, float>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kBlock = 2 * kVec;  // scalar_t values per block

  static C10_ALWAYS_INLINE void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      at::vec::load_to_float<scalar_t>(p, lo, hi);
    } else {
      lo = Vec::loadu(p);
      hi = Vec::loadu(p + kVec);
    }
  }
  // Loads the first `count` < kBlock values; the other lanes are zero.
  static C10_ALWAYS_INLINE void load_partial(const scalar_t* p, int64_t count, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      auto packed = Vectorized<scalar_t>::loadu(p, count);
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(packed);
    } else {
      lo = Vec::loadu(p, std::min<int64_t>(count, kVec));
      hi = count > kVec ? Vec::loadu(p + kVec, count - kVec) : Vec(acc_t(0));
    }
  }
  // A block back in scalar_t (reduced types only), lo's values first.
  static C10_ALWAYS_INLINE Vectorized<scalar_t> narrow(const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      __m512i packed;
      if (bfloat16_by_instruction(lo, hi, packed)) return Vectorized<scalar_t>(packed);
    }
#endif
    return at::vec::convert_from_float<scalar_t>(lo, hi);
  }
  static C10_ALWAYS_INLINE void store(scalar_t* p, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      narrow(lo, hi).store(p);
    } else {
      lo.store(p);
      hi.store(p + kVec);
    }
  }
  // store() bypassing the caches (a streaming store: no read of the destination
  // line first, none of the cache evicted). p must be aligned to the vector size
  // (stream_head gives the values to store normally first); end the loop with
  // stream_fence(). Without AVX2/AVX-512 a plain store.
  static C10_ALWAYS_INLINE void store_stream(scalar_t* p, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (kReduced) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(narrow(lo, hi)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm512_stream_ps(p, lo);
      _mm512_stream_ps(p + kVec, hi);
    } else {
      _mm512_stream_pd(p, lo);
      _mm512_stream_pd(p + kVec, hi);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (kReduced) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(at::vec::convert_from_float<scalar_t>(lo, hi)));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_stream_ps(p, lo);
      _mm256_stream_ps(p + kVec, hi);
    } else {
      _mm256_stream_pd(p, lo);
      _mm256_stream_pd(p + kVec, hi);
    }
#else
    store(p, lo, hi);
#endif
  }
  static C10_ALWAYS_INLINE void store_partial(scalar_t* p, int64_t count, const Vec& lo, const Vec& hi) {
    if constexpr (kReduced) {
      narrow(lo, hi).store(p, count);
    } else {
      lo.store(p, std::min<int64_t>(count, kVec));
      if (count > kVec) hi.store(p + kVec, count - kVec);
    }
  }
};

// The order of a block's values in its two vectors. Memory: values 0 .. kVec - 1 in the
// first vector, the rest in the second. Any: whatever order is cheapest, for loops whose
// lanes do not depend on their position (every value of a planar run shares its channel's
// coefficients; a sum ignores order), which must load every operand of a block and store
// its results in the same order. bfloat16 blocks then come as their even- and odd-indexed
// values (EvenOddBFloat16: one load and two bit operations instead of two widening
// shuffles, and back without the pack and permute), partial blocks too (padding lanes
// load as 0 wherever they land). AnyWholeBlocks: the same for whole blocks, memory order
// for partial ones, for loops that mask a partial block's padding lanes (keep_first
// assumes memory order).
enum class Order { Memory, AnyWholeBlocks, Any };

template <typename scalar_t>
struct EvenOddBFloat16 {
  static constexpr bool kAvailable = false;
};

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <>
struct EvenOddBFloat16<c10::BFloat16> {
  static constexpr bool kAvailable = true;
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  using Bits = __m512i;
  static C10_ALWAYS_INLINE Bits load_bits(const void* p) { return _mm512_loadu_si512(p); }
  static C10_ALWAYS_INLINE Bits all(int32_t v) { return _mm512_set1_epi32(v); }
  static C10_ALWAYS_INLINE Bits shift_left(Bits v) { return _mm512_slli_epi32(v, 16); }
  static C10_ALWAYS_INLINE Bits shift_right(Bits v) { return _mm512_srli_epi32(v, 16); }
  static C10_ALWAYS_INLINE Bits bit_and(Bits a, Bits b) { return _mm512_and_si512(a, b); }
  static C10_ALWAYS_INLINE Bits bit_or(Bits a, Bits b) { return _mm512_or_si512(a, b); }
  static C10_ALWAYS_INLINE Bits add(Bits a, Bits b) { return _mm512_add_epi32(a, b); }
  static C10_ALWAYS_INLINE Bits bits(const Vec& v) { return _mm512_castps_si512(v); }
  static C10_ALWAYS_INLINE Vec as_float(Bits v) { return _mm512_castsi512_ps(v); }
  static C10_ALWAYS_INLINE Bits nan_lanes(const Vec& v) {
    return _mm512_movm_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q));
  }
  static C10_ALWAYS_INLINE void store_bits(void* p, Bits v) { _mm512_storeu_si512(p, v); }
  static C10_ALWAYS_INLINE void stream_bits(void* p, Bits v) { _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v); }
  // the first count of the 32 16-bit values (masked: nothing read or written past them)
  static C10_ALWAYS_INLINE __mmask32 first(int64_t count) { return __mmask32((uint64_t(1) << count) - 1); }
  static C10_ALWAYS_INLINE Bits load_bits_partial(const void* p, int64_t count) {
    return _mm512_maskz_loadu_epi16(first(count), p);
  }
  static C10_ALWAYS_INLINE void store_bits_partial(void* p, int64_t count, Bits v) {
    _mm512_mask_storeu_epi16(p, first(count), v);
  }
#else
  using Bits = __m256i;
  static C10_ALWAYS_INLINE Bits load_bits(const void* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static C10_ALWAYS_INLINE Bits all(int32_t v) { return _mm256_set1_epi32(v); }
  static C10_ALWAYS_INLINE Bits shift_left(Bits v) { return _mm256_slli_epi32(v, 16); }
  static C10_ALWAYS_INLINE Bits shift_right(Bits v) { return _mm256_srli_epi32(v, 16); }
  static C10_ALWAYS_INLINE Bits bit_and(Bits a, Bits b) { return _mm256_and_si256(a, b); }
  static C10_ALWAYS_INLINE Bits bit_or(Bits a, Bits b) { return _mm256_or_si256(a, b); }
  static C10_ALWAYS_INLINE Bits add(Bits a, Bits b) { return _mm256_add_epi32(a, b); }
  static C10_ALWAYS_INLINE Bits bits(const Vec& v) { return _mm256_castps_si256(v); }
  static C10_ALWAYS_INLINE Vec as_float(Bits v) { return _mm256_castsi256_ps(v); }
  static C10_ALWAYS_INLINE Bits nan_lanes(const Vec& v) {
    return _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  static C10_ALWAYS_INLINE void store_bits(void* p, Bits v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static C10_ALWAYS_INLINE void stream_bits(void* p, Bits v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v); }
  // the first count of the 16 16-bit values, through a buffer (AVX2 has no 16-bit masked
  // loads and stores; at::vec's partial loadu and store copy through one too)
  static C10_ALWAYS_INLINE Bits load_bits_partial(const void* p, int64_t count) {
    __at_align__ uint16_t buffer[16] = {};
    std::memcpy(buffer, p, count * sizeof(uint16_t));
    return load_bits(buffer);
  }
  static C10_ALWAYS_INLINE void store_bits_partial(void* p, int64_t count, Bits v) {
    __at_align__ uint16_t buffer[16];
    store_bits(buffer, v);
    std::memcpy(p, buffer, count * sizeof(uint16_t));
  }
#endif
  static constexpr int32_t kHigh = int32_t(0xffff0000u);

  // A block as two float vectors: the values at even indices (the low halves of the
  // 32-bit words, shifted up) and at odd indices (the high halves, masked).
  static C10_ALWAYS_INLINE void load(const c10::BFloat16* p, Vec& even, Vec& odd) {
    const Bits v = load_bits(p);
    even = as_float(shift_left(v));
    odd = as_float(bit_and(v, all(kHigh)));
  }
  // The float rounded to bfloat16 in the high half of each word: round to nearest
  // even, a NaN to all ones (0xffff, as at::vec's conversion), bits for bits the same.
  static C10_ALWAYS_INLINE Bits rounded(const Vec& v) {
    const Bits b = bits(v);
    const Bits lsb = bit_and(shift_right(b), all(1));
    return bit_or(add(b, add(lsb, all(0x7fff))), nan_lanes(v));
  }
  static C10_ALWAYS_INLINE Bits pack(const Vec& even, const Vec& odd) {
#if defined(CPU_CAPABILITY_AVX512_BF16)
    Bits halves;  // the even-indexed values, then the odd ones: interleaved by one permute
    if (bfloat16_by_instruction(even, odd, halves)) return _mm512_permutexvar_epi16(interleave_halves(), halves);
#endif
    return bit_or(bit_and(rounded(odd), all(kHigh)), shift_right(rounded(even)));
  }
#if defined(CPU_CAPABILITY_AVX512_BF16)
  // Word i of the result takes word i / 2 (i even) or 16 + i / 2 (i odd).
  static C10_ALWAYS_INLINE Bits interleave_halves() {
    alignas(64) static constexpr uint16_t kIndex[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    return _mm512_load_si512(kIndex);
  }
#endif
  static C10_ALWAYS_INLINE void store(c10::BFloat16* p, const Vec& even, const Vec& odd) {
    store_bits(p, pack(even, odd));
  }
  static C10_ALWAYS_INLINE void store_stream(c10::BFloat16* p, const Vec& even, const Vec& odd) {
    stream_bits(p, pack(even, odd));
  }
  // The first count < kBlock values (the rest of the lanes 0), and back.
  static C10_ALWAYS_INLINE void load_partial(const c10::BFloat16* p, int64_t count, Vec& even, Vec& odd) {
    const Bits v = load_bits_partial(p, count);
    even = as_float(shift_left(v));
    odd = as_float(bit_and(v, all(kHigh)));
  }
  static C10_ALWAYS_INLINE void store_partial(c10::BFloat16* p, int64_t count, const Vec& even, const Vec& odd) {
    store_bits_partial(p, count, pack(even, odd));
  }
};
#endif

// Loads the first `count` <= kBlock values at p (the rest of the lanes 0), in order O.
template <Order O = Order::Memory, typename scalar_t, typename Vec>
C10_ALWAYS_INLINE void load_values(const scalar_t* p, int64_t count, Vec& lo, Vec& hi) {
  constexpr bool kEvenOdd = O != Order::Memory && EvenOddBFloat16<scalar_t>::kAvailable;
  if (count == Lanes<scalar_t>::kBlock) {
    if constexpr (kEvenOdd) {
      EvenOddBFloat16<scalar_t>::load(p, lo, hi);
    } else {
      Lanes<scalar_t>::load(p, lo, hi);
    }
  } else if constexpr (kEvenOdd && O == Order::Any) {
    EvenOddBFloat16<scalar_t>::load_partial(p, count, lo, hi);
  } else {
    Lanes<scalar_t>::load_partial(p, count, lo, hi);
  }
}

// Which value of its block each lane of lo and hi holds, as load_values<O> places a
// block: memory order (0 .. kVec - 1, then the rest), or for bfloat16 in Order::Any the
// even- and odd-indexed values. For loops that compare lanes with a position (a run's
// end within a block). Not for AnyWholeBlocks, whose order depends on the block's size.
template <Order O, typename scalar_t, typename Vec>
C10_ALWAYS_INLINE void lane_positions(Vec& lo, Vec& hi) {
  static_assert(O != Order::AnyWholeBlocks, "whole and partial blocks load in different orders there");
  using T = typename Vec::value_type;
  if constexpr (O == Order::Any && EvenOddBFloat16<scalar_t>::kAvailable) {
    lo = Vec::arange(T(0), T(2));
    hi = Vec::arange(T(1), T(2));
  } else {
    lo = Vec::arange(T(0), T(1));
    hi = Vec::arange(T(Lanes<scalar_t>::kVec), T(1));
  }
}

// Stores the first `count` <= kBlock values at p, loaded in order O; a whole block as a
// streaming store when `stream` (p then aligned, see stream_head).
template <Order O = Order::Memory, typename T, typename Vec>
C10_ALWAYS_INLINE void store_values(T* p, int64_t count, const Vec& lo, const Vec& hi, bool stream = false) {
  constexpr bool kEvenOdd = O != Order::Memory && EvenOddBFloat16<T>::kAvailable;
  if (count != Lanes<T>::kBlock) {
    if constexpr (kEvenOdd && O == Order::Any) {
      EvenOddBFloat16<T>::store_partial(p, count, lo, hi);
    } else {
      Lanes<T>::store_partial(p, count, lo, hi);
    }
  } else if constexpr (kEvenOdd) {
    if (stream) {
      EvenOddBFloat16<T>::store_stream(p, lo, hi);
    } else {
      EvenOddBFloat16<T>::store(p, lo, hi);
    }
  } else if (stream) {
    Lanes<T>::store_stream(p, lo, hi);
  } else {
    Lanes<T>::store(p, lo, hi);
  }
}

// How many values of a span of n at p to store normally so that the rest
// starts 64-byte aligned (ready for streaming stores); 0 when not streaming.
// Only called where p is aligned to its element size (see for_each_span_block).
template <typename T>
inline int64_t stream_head(const T* p, int64_t n, bool stream) {
  if (!stream) return 0;
  const auto misaligned = int64_t(reinterpret_cast<uintptr_t>(p) % 64);
  return std::min<int64_t>(n, misaligned == 0 ? 0 : (64 - misaligned) / int64_t(sizeof(T)));
}

// Orders this thread's streaming stores before whatever follows the pass.
inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) _mm_sfence();
#endif
}

inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

}  // namespace fastbn::cpu::CPU_CAPABILITY
