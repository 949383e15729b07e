// Runs fastbn's CUDA operators, compiled from csrc/cuda/batch_norm_cuda.cu itself,
// on the cuemu emulator under AddressSanitizer and UndefinedBehaviorSanitizer, and
// checks every output against a float64 reference. Out-of-bounds reads and writes,
// unguarded tails, divergent barriers and missing barriers (under some schedule)
// make it fail; a sanitizer report aborts it.
//
// Built and run by scripts/test-cuda-sanitized.sh (tests/cuemu/build.py builds it
// with FASTBN_INT32_INDEX_LIMIT lowered, so tensors of more than 4096 values take
// the int64-index kernels). The emulator's schedule and SM count come from the
// environment (CUEMU_SCHEDULE, CUEMU_SM_COUNT).
#include "cuda/batch_norm_cuda.cu"

#include <ATen/ATen.h>

#include <cstdio>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using fastbn::CudaImpl;

int failures = 0, checks = 0;

// The largest error relative to the reference's largest value (at least 1), per dtype
// of the result (the same tolerances as tests/conftest.py's EMULATED_TOLERANCE).
double tolerance(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-10;
    case at::kFloat: return 1e-5;
    case at::kHalf: return 2 * 0.0009765625;
    default: return 2 * 0.0078125;
  }
}

void expect_close(const Tensor& got, const Tensor& want, const std::string& what) {
  ++checks;
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const double err = (got.to(at::kDouble) - want).abs().max().item<double>() / scale;
  if (!(err <= tolerance(got.scalar_type())) || got.sizes() != want.sizes()) {
    ++failures;
    printf("FAIL %s: relative error %.3g (tolerance %.3g)\n", what.c_str(), err, tolerance(got.scalar_type()));
  }
}

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::vector<int64_t> channel_shape(const Tensor& x) {
  std::vector<int64_t> shape(size_t(x.dim()), 1);
  shape[1] = x.size(1);
  return shape;
}

// The fused activation of the checks: ELU with alpha 1, whose derivative is
// continuous, so float32 and float64 results agree even where they disagree on z's sign.
Tensor elu_grad(const Tensor& z) { return at::where(z > 0, at::ones_like(z), at::exp(z)); }

struct Reference {
  Tensor y, mean, var, dx, grad_weight, grad_bias, grad_residual;
};

// act(bn(x) + residual) in training mode and its backward, in float64.
Reference reference(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& residual, bool with_elu,
                    const Tensor& dy, double eps) {
  const Tensor xd = x.to(at::kDouble), dyd = dy.to(at::kDouble);
  const auto dims = reduce_dims(x), shape = channel_shape(x);
  Reference r;
  r.mean = xd.mean(dims);
  r.var = xd.var(dims, /*unbiased=*/false);
  const Tensor invstd = at::rsqrt(r.var + eps).view(shape);
  const Tensor xhat = (xd - r.mean.view(shape)) * invstd;
  Tensor z = xhat * w.to(at::kDouble).view(shape) + b.to(at::kDouble).view(shape);
  if (residual.defined()) z = z + residual.to(at::kDouble);
  r.y = with_elu ? at::elu(z) : z;
  const Tensor g = with_elu ? dyd * elu_grad(z) : dyd;
  r.grad_residual = g;
  r.grad_bias = g.sum(dims);
  r.grad_weight = (g * xhat).sum(dims);
  const double count = double(x.numel() / x.size(1));
  r.dx = w.to(at::kDouble).view(shape) * invstd *
         (g - r.grad_bias.view(shape) / count - xhat * r.grad_weight.view(shape) / count);
  return r;
}

Tensor random(at::IntArrayRef shape, at::ScalarType dtype, bool channels_last, double mean) {
  Tensor t = (at::randn(shape, at::kDouble) * 2 + mean).to(dtype);
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t;
}

// Training forward and backward (and with a residual and ELU, the fused backward)
// with the implementation forced, against float64.
void train_case(at::IntArrayRef shape, at::ScalarType dtype, bool channels_last, CudaImpl impl, bool fused) {
  const std::string what = std::string(c10::toString(dtype)) + " " + c10::str(shape) +
                           (channels_last ? " channels_last" : " contiguous") +
                           (impl == CudaImpl::OnChip ? " on-chip" : " general") + (fused ? " +residual+elu" : "");
  const auto acc = fastbn::accumulate_dtype(dtype);
  const Tensor x = random(shape, dtype, channels_last, 3.0);
  const Tensor dy = random(shape, dtype, channels_last, 0.0);
  const Tensor residual = fused ? random(shape, dtype, channels_last, 0.0) : Tensor();
  const Tensor w = at::randn({shape[1]}, acc) + 1, b = at::randn({shape[1]}, acc);
  const double eps = 1e-5;
  const int act = fused ? int(fastbn::Activation::ELU) : 0;
  const Reference ref = reference(x, w, b, residual, fused, dy, eps);
  fastbn::set_cuda_impl_override(impl);
  auto [y, mean, var] = fastbn::cuda::batch_norm_train_cuda(x, w, b, eps, act, 1.0, residual.defined() ? std::optional<Tensor>(residual) : std::nullopt);
  expect_close(y, ref.y, what + " output");
  expect_close(mean, ref.mean, what + " mean");
  expect_close(var, ref.var, what + " var");
  if (fused) {
    auto [dx, grad_residual, gw, gb] =
        fastbn::cuda::batch_norm_add_act_backward_cuda(dy, x, residual, w, b, mean, var, eps, true, act, 1.0);
    expect_close(dx, ref.dx, what + " grad_input");
    expect_close(grad_residual, ref.grad_residual, what + " grad_residual");
    expect_close(gw, ref.grad_weight, what + " grad_weight");
    expect_close(gb, ref.grad_bias, what + " grad_bias");
  } else {
    auto [dx, gw, gb] =
        fastbn::cuda::batch_norm_backward_cuda(dy, x, w, b, mean, var, eps, true, 0, 0.0, fastbn::kEveryOutput);
    expect_close(dx, ref.dx, what + " grad_input");
    expect_close(gw, ref.grad_weight, what + " grad_weight");
    expect_close(gb, ref.grad_bias, what + " grad_bias");
  }
  fastbn::set_cuda_impl_override(CudaImpl::Auto);
}

// Evaluation forward and backward, SyncBatchNorm's phases and the running-stats
// update (general kernels only).
void other_ops_case(at::IntArrayRef shape, bool channels_last) {
  const std::string what = c10::str(shape) + (channels_last ? " channels_last" : " contiguous");
  const Tensor x = random(shape, at::kFloat, channels_last, 3.0);
  const Tensor dy = random(shape, at::kFloat, channels_last, 0.0);
  const Tensor w = at::randn({shape[1]}) + 1, b = at::randn({shape[1]});
  const Tensor rm = at::randn({shape[1]}), rv = at::rand({shape[1]}) + 0.5;
  const double eps = 1e-5;
  const auto shape_c = channel_shape(x);
  const Tensor xd = x.to(at::kDouble);
  const Tensor scale = (w.to(at::kDouble) * at::rsqrt(rv.to(at::kDouble) + eps)).view(shape_c);
  const Tensor eval_ref = (xd - rm.to(at::kDouble).view(shape_c)) * scale + b.to(at::kDouble).view(shape_c);
  expect_close(fastbn::cuda::batch_norm_eval_cuda(x, w, b, rm, rv, eps, 0, 0.0, std::nullopt), eval_ref,
               what + " eval output");
  auto [dx_eval, gw_eval, gb_eval] =
      fastbn::cuda::batch_norm_backward_cuda(dy, x, w, b, rm, rv, eps, false, 0, 0.0, fastbn::kEveryOutput);
  expect_close(dx_eval, dy.to(at::kDouble) * scale, what + " eval grad_input");

  const Reference ref = reference(x, w, b, Tensor(), false, dy, eps);
  auto [mean, var] = fastbn::cuda::batch_norm_stats_cuda(x);
  expect_close(mean, ref.mean, what + " stats mean");
  expect_close(var, ref.var, what + " stats var");
  auto [sum_dy, sum_dy_xmu] = fastbn::cuda::batch_norm_backward_reduce_cuda(dy, x, w, b, mean, var, eps, 0, 0.0);
  expect_close(sum_dy, ref.grad_bias, what + " backward_reduce sum_dy");
  expect_close(sum_dy_xmu, ref.grad_weight * at::sqrt(ref.var + eps), what + " backward_reduce sum_dy_xmu");
  const int64_t count = x.numel() / x.size(1);
  expect_close(fastbn::cuda::batch_norm_backward_elemt_cuda(dy, x, w, b, mean, var, sum_dy, sum_dy_xmu, eps, count,
                                                            0, 0.0),
               ref.dx, what + " backward_elemt");

  Tensor running_mean = rm.clone(), running_var = rv.clone();
  fastbn::cuda::update_running_stats_cuda(running_mean, running_var, mean, var, 0.1, count);
  expect_close(running_mean, 0.9 * rm.to(at::kDouble) + 0.1 * ref.mean, what + " running_mean");
  expect_close(running_var, 0.9 * rv.to(at::kDouble) + 0.1 * ref.var * count / (count - 1), what + " running_var");

  // In-place ABN's recovery from the output (identity activation: y = z).
  const Tensor y = std::get<0>(fastbn::cuda::batch_norm_train_cuda(x, w, b, eps, 0, 0.0, std::nullopt));
  auto [grad, centered] = fastbn::cuda::batch_norm_invert_output_cuda(dy, y, w, b, var, eps, 0, 0.0);
  expect_close(grad, dy.to(at::kDouble), what + " invert_output grad");
  expect_close(centered, xd - ref.mean.view(shape_c), what + " invert_output centered");
}

}  // namespace

int main() {
  at::manual_seed(0);
  const char* schedule = getenv("CUEMU_SCHEDULE");
  printf("sanitizer harness: schedule %s, %d SMs, int32 indexing up to %lld values\n", schedule ? schedule : "inorder",
         cuemu::config().sm_count, (long long)(FASTBN_INT32_INDEX_LIMIT));
  // Shapes: channel tails (3, 37, 40 channels), odd spatial sizes, both sides of the
  // on-chip capacity (8192 values contiguous, 256 rows channels_last) and of the
  // lowered int32 index limit.
  const std::vector<std::vector<int64_t>> shapes4d = {{4, 3, 5, 5}, {2, 37, 9, 9}, {3, 64, 3, 7},
                                                      {4, 40, 8, 8}, {5, 40, 8, 8}, {64, 8, 8, 8}};
  for (bool channels_last : {false, true}) {
    for (const auto& shape : shapes4d) {
      for (CudaImpl impl : {CudaImpl::General, CudaImpl::OnChip}) {
        const Tensor probe = at::empty(shape).contiguous(channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous);
        if (impl == CudaImpl::OnChip && fastbn::cuda::onchip_items(fastbn::describe(probe)) == 0) continue;
        train_case(shape, at::kFloat, channels_last, impl, false);
        train_case(shape, at::kFloat, channels_last, impl, true);
      }
    }
    train_case({3, 37, 5, 7}, at::kDouble, channels_last, CudaImpl::General, true);
    train_case({3, 37, 5, 7}, at::kDouble, channels_last, CudaImpl::OnChip, true);
    train_case({6, 33, 7, 5}, at::kHalf, channels_last, CudaImpl::General, true);
    other_ops_case({3, 37, 5, 7}, channels_last);
    other_ops_case({4, 6, 31, 33}, channels_last);
  }
  for (int64_t length : {8191, 8192, 8193}) {  // (1, 2, L): the planar on-chip capacity
    train_case({1, 2, length}, at::kFloat, false, CudaImpl::General, false);
    if (length <= 8192) train_case({1, 2, length}, at::kFloat, false, CudaImpl::OnChip, true);
  }
  printf("%s: %d of %d checks failed\n", failures ? "SANITIZER HARNESS FAILED" : "sanitizer harness passed", failures,
         checks);
  return failures ? 1 : 0;
}
