// CPU kernels of the object-weighted SimPO loss (ospo_fast/ops/simpo_loss.py): per-token log-softmax-gather.
//
//   simpo_token_logprobs_fwd(logits (N, V), targets (N,) long) -> (logp (N,) f32, lse (N,) f32)
//       lse_t = log sum_v exp(z_tv),  logp_t = z_t[y_t] - lse_t
//   simpo_token_logprobs_bwd_out(grad (N,), logits (N, V), targets (N,), lse (N,), out (N, V)) -> ()
//       out_tv = grad_t * (1[v == y_t] - exp(z_tv - lse_t))   (d logp_t / d z_tv, times grad_t)
//       `out` may alias `logits` (each row is read before it is written, by one thread).
//   simpo_token_logprobs_bwd(grad, logits, targets, lse) -> out   (allocates `out`, same dtype as logits)
//
// Rows are split over OpenMP threads; arithmetic is float32 for float, bfloat16 and half logits. Within a row the
// loops are `omp simd` with a branch-free exp, so -O3 vectorises them without -ffast-math.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// exp(x) for x <= 0 (every argument here is z - max or z - lse), relative error ~1e-7 (Cephes' expf polynomial
// after x = n ln2 + r); inputs below -87 (including -inf) return exp(-87) ~ 1.6e-38 instead of 0.
inline float exp_nonpositive(float x) {
  x = std::min(std::max(x, -87.f), 0.f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest integer (1.5 * 2^23 trick), n in [-126, 0]
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two for precision
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu(), "simpo_token_logprobs: logits must be a CPU tensor, got ", logits.device(),
              "; use the triton or ref backend for other devices");
  TORCH_CHECK(logits.dim() == 2, "simpo_token_logprobs: logits must be 2-D (N, V), got ", logits.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0),
              "simpo_token_logprobs: targets must be (N,) with N = ", logits.size(0), ", got ", targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "simpo_token_logprobs: targets must be int64, got ",
              targets.scalar_type());
}

template <typename scalar_t>
void fwd_rows(const scalar_t* z, const int64_t* y, float* logp, float* lse, int64_t rows, int64_t vocab) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = z + r * vocab;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < vocab; ++v) m = std::max(m, static_cast<float>(row[v]));
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t v = 0; v < vocab; ++v) s += exp_nonpositive(static_cast<float>(row[v]) - m);
    const float l = m + std::log(s);
    lse[r] = l;
    logp[r] = static_cast<float>(row[y[r]]) - l;
  }
}

template <typename scalar_t>
void bwd_rows(const float* g, const scalar_t* z, const int64_t* y, const float* lse, scalar_t* out, int64_t rows,
              int64_t vocab) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = z + r * vocab;
    scalar_t* orow = out + r * vocab;
    const float gr = g[r], l = lse[r];
    const int64_t target = y[r];
#pragma omp simd
    for (int64_t v = 0; v < vocab; ++v) {
      const float p = exp_nonpositive(static_cast<float>(row[v]) - l);
      orow[v] = static_cast<scalar_t>(gr * ((v == target ? 1.f : 0.f) - p));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> simpo_token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& targets) {
  check_inputs(logits, targets);
  const auto z = logits.contiguous();
  const auto y = targets.contiguous();
  const int64_t rows = z.size(0), vocab = z.size(1);
  auto logp = at::empty({rows}, z.options().dtype(at::kFloat));
  auto lse = at::empty({rows}, z.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "simpo_token_logprobs_fwd", [&] {
    fwd_rows<scalar_t>(z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), logp.data_ptr<float>(),
                       lse.data_ptr<float>(), rows, vocab);
  });
  return {logp, lse};
}

void simpo_token_logprobs_bwd_out(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                  const at::Tensor& lse, at::Tensor out) {
  check_inputs(logits, targets);
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() && out.is_contiguous(),
              "simpo_token_logprobs_bwd_out: out must be contiguous with the logits' shape and dtype");
  TORCH_CHECK(grad.numel() == logits.size(0) && lse.numel() == logits.size(0),
              "simpo_token_logprobs_bwd: grad and lse must have N = ", logits.size(0), " entries");
  // `out` may alias `logits`: only take a contiguous copy when the logits are not contiguous already
  const auto z = logits.is_contiguous() ? logits : logits.contiguous();
  const auto g = grad.to(at::kFloat).contiguous();
  const auto l = lse.to(at::kFloat).contiguous();
  const auto y = targets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "simpo_token_logprobs_bwd", [&] {
    bwd_rows<scalar_t>(g.data_ptr<float>(), z.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), l.data_ptr<float>(),
                       out.data_ptr<scalar_t>(), z.size(0), z.size(1));
  });
}

at::Tensor simpo_token_logprobs_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
                                    const at::Tensor& lse) {
  auto out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  simpo_token_logprobs_bwd_out(grad, logits, targets, lse, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast_C, m) {
  m.def("simpo_token_logprobs_fwd(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  m.def("simpo_token_logprobs_bwd(Tensor grad, Tensor logits, Tensor targets, Tensor lse) -> Tensor");
  m.def("simpo_token_logprobs_bwd_out(Tensor grad, Tensor logits, Tensor targets, Tensor lse, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(ospo_fast_C, CPU, m) {
  m.impl("simpo_token_logprobs_fwd", &simpo_token_logprobs_fwd);
  m.impl("simpo_token_logprobs_bwd", &simpo_token_logprobs_bwd);
  m.impl("simpo_token_logprobs_bwd_out", &simpo_token_logprobs_bwd_out);
}
