// Object masks on the CPU: object_masks_from_scores (the fused op: captured scores -> per-object maps, Otsu masks,
// union and soft mask per image, OpenMP over images) and object_masks_otsu (maps given). Per map, min-max normalise, 256-bin histogram, Otsu threshold (bit-exact with
// skimage.filters.threshold_otsu(nbins=256) on the normalised map, see ospo_fast/ops/object_masks.py), scale it,
// and threshold. OpenMP over maps. Union and smoothing are done by the caller in torch.
//
// Normalisation, bins and the mask comparison are in float64, as the reference.
// torch.ops.ospo_fast_C.object_masks_otsu(Tensor maps (N, P) float32 or float64, float otsu_scale)
//   -> (Tensor normalised (N, P) float32, Tensor thresholds (N,) float32, Tensor masks (N, P) bool)
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

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

// ---- the fused op: captured scores -> maps, Otsu masks, union, soft mask (one call per batch) ----------------

// Reflect-101 index (cv2's BORDER_REFLECT_101) of i in [0, n), for |i| < 2n - 1.
inline int64_t reflect101(int64_t i, int64_t n) {
  i = i < 0 ? -i : i;
  return i >= n ? 2 * (n - 1) - i : i;
}

struct ScoreArgs {
  int64_t o, s, g1, g2, heads;
  float scale;
  const double* taps;
  int64_t kernel;
};

// One image: the per-object maps in float64 (sub-tokens added in ascending order, as the reference), Otsu masks,
// the union over valid objects, and the smoothed union min-max normalised (float64 taps and sums).
template <typename T>
void scores_one_image(const T* sums, const float* counts, const bool* token_valid, const bool* object_valid,
                      const ScoreArgs& a, float* norm, float* thr, bool* mask, bool* uni, float* soft) {
  const int64_t p = a.g1 * a.g2;
  std::vector<double> map(p);
  for (int64_t i = 0; i < p; ++i) uni[i] = false;
  for (int64_t o = 0; o < a.o; ++o) {
    const T* x = sums + o * a.s * p;
    const bool* tv = token_valid + o * a.s;
    int64_t nv = 0;
    for (int64_t s = 0; s < a.s; ++s) nv += tv[s] ? 1 : 0;
    const double per_cell = static_cast<double>(a.heads * nv);  // heads x real sub-tokens
    std::fill(map.begin(), map.end(), 0.0);
    for (int64_t s = 0; s < a.s; ++s) {  // per cell: sub-tokens added in ascending order, as the reference
      if (!tv[s]) continue;  // adding 0.0 for a padded sub-token leaves the sum as it is
      for (int64_t i = 0; i < p; ++i) map[i] += static_cast<double>(x[s * p + i]);
    }
    for (int64_t i = 0; i < p; ++i) {
      // 0 / 0 = NaN for a cell never captured (count 0): reported by the caller, naming image and object
      map[i] = object_valid[o] ? map[i] / (static_cast<double>(counts[i]) * per_cell) : 0.0;
    }
    thr[o] = otsu_one<double>(map.data(), p, a.scale, norm + o * p, mask + o * p);
    for (int64_t i = 0; i < p; ++i) uni[i] = uni[i] || mask[o * p + i];
  }
  // separable Gaussian, reflect-101 borders: along rows into `across`, then along columns
  const int64_t pad = a.kernel / 2;
  std::vector<double> across(p), smooth(p);
  for (int64_t r = 0; r < a.g1; ++r) {
    for (int64_t c = 0; c < a.g2; ++c) {
      double acc = 0.0;
      for (int64_t k = 0; k < a.kernel; ++k) acc += uni[r * a.g2 + reflect101(c + k - pad, a.g2)] ? a.taps[k] : 0.0;
      across[r * a.g2 + c] = acc;
    }
  }
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t r = 0; r < a.g1; ++r) {
    for (int64_t c = 0; c < a.g2; ++c) {
      double acc = 0.0;
      for (int64_t k = 0; k < a.kernel; ++k) acc += a.taps[k] * across[reflect101(r + k - pad, a.g1) * a.g2 + c];
      smooth[r * a.g2 + c] = acc;
      lo = acc < lo ? acc : lo;
      hi = acc > hi ? acc : hi;
    }
  }
  const double span = hi - lo;
  for (int64_t i = 0; i < p; ++i) soft[i] = span > 0.0 ? static_cast<float>((smooth[i] - lo) / span) : 0.0f;
}

// sums (B, O, S, G1, G2) float32/float64: per sub-token sums over heads and recorded layers; counts (B, G1, G2)
// float32: layers recorded per cell; token_valid (B, O, S) bool; object_valid (B, O) bool; taps (K,) float64.
// Returns maps (B, O, G1, G2) float32 (min-max normalised), thresholds (B, O) float32 (NaN: non-finite map),
// masks (B, O, G1, G2) bool, union (B, G1, G2) bool, soft (B, G1, G2) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> object_masks_from_scores(
    const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& token_valid, const at::Tensor& object_valid,
    int64_t heads, double otsu_scale, const at::Tensor& taps) {
  TORCH_CHECK(sums.dim() == 5, "object_masks_from_scores: sums must be (B, O, S, G1, G2), got ", sums.sizes());
  TORCH_CHECK(sums.device().is_cpu(), "object_masks_from_scores: CPU tensors only, got ", sums.device());
  const int64_t b = sums.size(0), o = sums.size(1), s = sums.size(2), g1 = sums.size(3), g2 = sums.size(4);
  TORCH_CHECK(counts.sizes() == at::IntArrayRef({b, g1, g2}), "counts must be (B, G1, G2), got ", counts.sizes());
  TORCH_CHECK(token_valid.sizes() == at::IntArrayRef({b, o, s}), "token_valid must be (B, O, S), got ",
              token_valid.sizes());
  TORCH_CHECK(object_valid.sizes() == at::IntArrayRef({b, o}), "object_valid must be (B, O), got ",
              object_valid.sizes());
  TORCH_CHECK(g1 * g2 > 0, "object_masks_from_scores: the grid has no cells");
  const bool is_double = sums.scalar_type() == at::kDouble;
  const at::Tensor x = (is_double ? sums : sums.to(at::kFloat)).contiguous();
  const at::Tensor cnt = counts.to(at::kFloat).contiguous();
  const at::Tensor tv = token_valid.to(at::kBool).contiguous();
  const at::Tensor ov = object_valid.to(at::kBool).contiguous();
  const at::Tensor tp = taps.to(at::kDouble).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  const auto b8 = x.options().dtype(at::kBool);
  at::Tensor norm = at::empty({b, o, g1, g2}, f32), thr = at::empty({b, o}, f32);
  at::Tensor masks = at::empty({b, o, g1, g2}, b8), uni = at::empty({b, g1, g2}, b8);
  at::Tensor soft = at::empty({b, g1, g2}, f32);
  const ScoreArgs a{o, s, g1, g2, heads, static_cast<float>(otsu_scale), tp.data_ptr<double>(), tp.size(0)};
  const int64_t p = g1 * g2;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < b; ++i) {
    float* outs[3] = {norm.data_ptr<float>() + i * o * p, thr.data_ptr<float>() + i * o,
                      soft.data_ptr<float>() + i * p};
    bool* m = masks.data_ptr<bool>() + i * o * p;
    bool* u = uni.data_ptr<bool>() + i * p;
    const float* c = cnt.data_ptr<float>() + i * p;
    const bool* t = tv.data_ptr<bool>() + i * o * s;
    const bool* v = ov.data_ptr<bool>() + i * o;
    if (is_double) {
      scores_one_image<double>(x.data_ptr<double>() + i * o * s * p, c, t, v, a, outs[0], outs[1], m, u, outs[2]);
    } else {
      scores_one_image<float>(x.data_ptr<float>() + i * o * s * p, c, t, v, a, outs[0], outs[1], m, u, outs[2]);
    }
  }
  return {norm, thr, masks, uni, soft};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ospo_fast_C, m) {
  m.def("object_masks_otsu(Tensor maps, float otsu_scale) -> (Tensor, Tensor, Tensor)");
  m.impl("object_masks_otsu", torch::kCPU, &object_masks_otsu);
  m.def("object_masks_from_scores(Tensor sums, Tensor counts, Tensor token_valid, Tensor object_valid, int heads, "
        "float otsu_scale, Tensor taps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("object_masks_from_scores", torch::kCPU, &object_masks_from_scores);
}
