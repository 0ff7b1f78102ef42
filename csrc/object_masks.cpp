// Object masks on the CPU: per map, min-max normalise, 256-bin histogram, Otsu threshold (bit-exact with
// skimage.filters.threshold_otsu(nbins=256) on the normalised map, see ospo_fast/ops/object_masks.py), scale it,
// and threshold. OpenMP over maps. Union and smoothing are done by the caller in torch.
//
// torch.ops.ospo_fast_C.object_masks_otsu(Tensor maps (N, P) float32, float otsu_scale)
//   -> (Tensor normalised (N, P) float32, Tensor thresholds (N,) float32, Tensor masks (N, P) bool)
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

constexpr int kBins = 256;

// One map: writes the normalised values, the mask, and returns the scaled threshold (NaN for a map with a
// NaN or infinite value: the caller reports it).
float otsu_one(const float* x, int64_t p, float otsu_scale, float* norm, bool* mask) {
  float lo = x[0], hi = x[0];
  bool finite = true;
  for (int64_t i = 0; i < p; ++i) {
    finite = finite && std::isfinite(x[i]);
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
  }
  if (!finite) {
    for (int64_t i = 0; i < p; ++i) {
      norm[i] = std::numeric_limits<float>::quiet_NaN();
      mask[i] = false;
    }
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float span = hi - lo;
  if (!(span > 0.0f)) {  // constant map: zeros, threshold 0, empty mask
    for (int64_t i = 0; i < p; ++i) {
      norm[i] = 0.0f;
      mask[i] = false;
    }
    return 0.0f;
  }
  int64_t counts[kBins] = {0};
  for (int64_t i = 0; i < p; ++i) {
    const float v = (x[i] - lo) / span;  // same float32 ops as the reference
    norm[i] = v;
    int64_t bin = static_cast<int64_t>(std::floor(v * static_cast<float>(kBins)));
    counts[bin < kBins ? bin : kBins - 1] += 1;
  }
  // Exact class weights / sums; float64 variance with skimage's operation order; first maximum wins.
  int64_t w1 = 0;
  double s1 = 0.0;
  double total_s = 0.0;
  for (int b = 0; b < kBins; ++b) total_s += static_cast<double>(counts[b]) * ((2.0 * b + 1.0) / (2.0 * kBins));
  double best = -1.0;
  int best_idx = 0;
  for (int b = 0; b < kBins - 1; ++b) {
    w1 += counts[b];
    s1 += static_cast<double>(counts[b]) * ((2.0 * b + 1.0) / (2.0 * kBins));
    const int64_t w2 = p - w1;
    const double m1 = s1 / static_cast<double>(w1 > 0 ? w1 : 1);
    const double m2 = (total_s - s1) / static_cast<double>(w2 > 0 ? w2 : 1);
    const double d = m1 - m2;
    const double var = static_cast<double>(w1 * w2) * (d * d);
    if (var > best) {
      best = var;
      best_idx = b;
    }
  }
  const float center = static_cast<float>((2.0 * best_idx + 1.0) / (2.0 * kBins));
  const float threshold = center * otsu_scale;
  for (int64_t i = 0; i < p; ++i) mask[i] = norm[i] > threshold;
  return threshold;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> object_masks_otsu(const at::Tensor& maps, double otsu_scale) {
  TORCH_CHECK(maps.dim() == 2, "object_masks_otsu: maps must be (N, P), got ", maps.sizes());
  TORCH_CHECK(maps.device().is_cpu(), "object_masks_otsu: CPU tensors only, got ", maps.device());
  TORCH_CHECK(maps.size(1) > 0, "object_masks_otsu: maps have no cells");
  const at::Tensor x = maps.to(at::kFloat).contiguous();
  const int64_t n = x.size(0), p = x.size(1);
  at::Tensor norm = at::empty({n, p}, x.options());
  at::Tensor thresholds = at::empty({n}, x.options());
  at::Tensor masks = at::empty({n, p}, x.options().dtype(at::kBool));
  const float* xp = x.data_ptr<float>();
  float* np_ = norm.data_ptr<float>();
  float* tp = thresholds.data_ptr<float>();
  bool* mp = masks.data_ptr<bool>();
  const float scale = static_cast<float>(otsu_scale);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    tp[i] = otsu_one(xp + i * p, p, scale, np_ + i * p, mp + i * p);
  }
  return {norm, thresholds, masks};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast_C, m) {
  m.def("object_masks_otsu(Tensor maps, float otsu_scale) -> (Tensor, Tensor, Tensor)");
  m.impl("object_masks_otsu", torch::kCPU, &object_masks_otsu);
}
