// Object masks on the CPU: per map, min-max normalise, 256-bin histogram, Otsu threshold (bit-exact with
// skimage.filters.threshold_otsu(nbins=256) on the normalised map, see ospo_fast/ops/object_masks.py), scale it,
// and threshold. OpenMP over maps. Union and smoothing are done by the caller in torch.
//
// Normalisation, bins and the mask comparison are in float64, as the reference.
// torch.ops.ospo_fast_C.object_masks_otsu(Tensor maps (N, P) float32 or float64, float otsu_scale)
//   -> (Tensor normalised (N, P) float32, Tensor thresholds (N,) float32, Tensor masks (N, P) bool)
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

constexpr int kBins = 256;

// One map of float or double values: writes the normalised values (float32), the mask, and returns the scaled
// threshold (NaN for a map with a NaN or infinite value: the caller reports it). Normalisation is in double so
// that a finite float32 map whose range overflows float32 (e.g. -3e38..3e38) still normalises.
template <typename T>
float otsu_one(const T* x, int64_t p, float otsu_scale, float* norm, bool* mask) {
  double lo = static_cast<double>(x[0]), hi = lo;
  bool finite = true;
  for (int64_t i = 0; i < p; ++i) {
    const double v = static_cast<double>(x[i]);
    finite = finite && std::isfinite(v);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  if (!finite) {
    for (int64_t i = 0; i < p; ++i) {
      norm[i] = std::numeric_limits<float>::quiet_NaN();
      mask[i] = false;
    }
    return std::numeric_limits<float>::quiet_NaN();
  }
  const double span = hi - lo;  // finite: |x| <= FLT_MAX
  if (!(span > 0.0)) {  // constant map: zeros, threshold 0, empty mask
    for (int64_t i = 0; i < p; ++i) {
      norm[i] = 0.0f;
      mask[i] = false;
    }
    return 0.0f;
  }
  int64_t counts[kBins] = {0};
  for (int64_t i = 0; i < p; ++i) {
    const double v = (static_cast<double>(x[i]) - lo) / span;  // same float64 ops as the reference
    norm[i] = static_cast<float>(v);
    int64_t bin = static_cast<int64_t>(std::floor(v * static_cast<double>(kBins)));
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
  // Exact in double: a 9-bit centre times the float32 scale.
  const double threshold = ((2.0 * best_idx + 1.0) / (2.0 * kBins)) * static_cast<double>(otsu_scale);
  for (int64_t i = 0; i < p; ++i) mask[i] = (static_cast<double>(x[i]) - lo) / span > threshold;
  return static_cast<float>(threshold);
}

template <typename T>
void otsu_all(const at::Tensor& x, float scale, float* np_, float* tp, bool* mp) {
  const int64_t n = x.size(0), p = x.size(1);
  const T* xp = x.data_ptr<T>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    tp[i] = otsu_one<T>(xp + i * p, p, scale, np_ + i * p, mp + i * p);
  }
}

// maps: (N, P) float32 or float64 (other floating types are upcast to float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor> object_masks_otsu(const at::Tensor& maps, double otsu_scale) {
  TORCH_CHECK(maps.dim() == 2, "object_masks_otsu: maps must be (N, P), got ", maps.sizes());
  TORCH_CHECK(maps.device().is_cpu(), "object_masks_otsu: CPU tensors only, got ", maps.device());
  TORCH_CHECK(maps.size(1) > 0, "object_masks_otsu: maps have no cells");
  const bool is_double = maps.scalar_type() == at::kDouble;
  const at::Tensor x = (is_double ? maps : maps.to(at::kFloat)).contiguous();
  const int64_t n = x.size(0), p = x.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor norm = at::empty({n, p}, f32);
  at::Tensor thresholds = at::empty({n}, f32);
  at::Tensor masks = at::empty({n, p}, x.options().dtype(at::kBool));
  const float scale = static_cast<float>(otsu_scale);  // float32, as the Triton kernel receives it
  if (is_double) {
    otsu_all<double>(x, scale, norm.data_ptr<float>(), thresholds.data_ptr<float>(), masks.data_ptr<bool>());
  } else {
    otsu_all<float>(x, scale, norm.data_ptr<float>(), thresholds.data_ptr<float>(), masks.data_ptr<bool>());
  }
  return {norm, thresholds, masks};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast_C, m) {
  m.def("object_masks_otsu(Tensor maps, float otsu_scale) -> (Tensor, Tensor, Tensor)");
  m.impl("object_masks_otsu", torch::kCPU, &object_masks_otsu);
}
