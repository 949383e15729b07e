// Vectorized inner loops of the CPU batch norm, built on at::vec::Vectorized.
//
// Two shapes of loop:
//  - span_*:   one channel's contiguous run of values (planar layout, NCHW);
//  - column_*: a block of interleaved channels down many rows (channels_last,
//              (N, C)), with the per-channel state in registers.
// Elementwise passes compute in the accumulation type acc_t (float for
// half/bfloat16/float, double for double), loading blocks of two vectors
// (exactly one Vectorized<half/bfloat16>). Reductions accumulate in red_t =
// double for every input dtype, as torch's CPU kernels do for float
// (at::acc_type<float, false>): sums over many values stay correctly rounded.
//
// The loops live in four headers, by concern, each including the one before:
//  - vec_lanes.h:       loading and storing blocks of values (masked tails, streaming stores);
//  - vec_activations.h: the fused activations on vectors, per-channel coefficients as vectors/arrays;
//  - vec_reductions.h:  per-channel sums (statistics, backward sums), span_* and column_*;
//  - vec_elementwise.h: the forward and backward applied over spans and row tiles.
#pragma once

#include "cpu/vec_elementwise.h"
