// What the fused CPU kernels (fused_lstm.cpp, fused_gru_rnn.cpp) share: the vector helpers and the
// float32 exp / sigmoid / tanh approximations, the in-pass input projection, the packed-row Shape with
// its GEMM chunks, zoneout rows, and torch's oneDNN linear. The time loop they share is fused_loop.h;
// the statistic families' statistics are in family_*.h (families.h lists them).
//
// Header-only, and all of it in an unnamed namespace: each extension is one translation unit built into
// a shared object of its own, so each gets its own copy (the function-local static of dnn_linear_op()
// included) and no symbol of one can stand in for the other's when both are loaded.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows per step, from an optional int64 tensor of batch sizes (packed) or a full batch of B rows.
inline std::vector<int64_t> batch_sizes_of(const c10::optional<Tensor>& bs, int64_t N, int64_t B, const char* what) {
  if (bs.has_value() && bs->defined()) {
    TORCH_CHECK(bs->dim() == 1 && bs->scalar_type() == at::kLong && bs->device().is_cpu(), what,
                ": batch_sizes must be a 1-D int64 CPU tensor");
    const Tensor c = bs->contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    return std::vector<int64_t>(p, p + c.numel());
  }
  TORCH_CHECK(B > 0 && N % B == 0, what, ": ", N, " rows do not make full steps of ", B);
  return std::vector<int64_t>(N / B, B);
}

// ------------------------------------------------------------------------------------------------
// Vector helpers. Every loop walks a row segment in steps of Vec::size() with a possibly shorter
// tail (count n): loads zero-fill and stores write only the first n lanes.
// ------------------------------------------------------------------------------------------------

template <typename T>
inline Vec<T> ld(const T* p, int64_t n) {
  return n >= Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void st(T* p, const Vec<T>& v, int64_t n) {
  if (n >= Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// The column passes (batch statistics) walk a step's rows G or H values apart: a stride the hardware
// prefetchers do not follow across pages, so every row's first touch waits on memory. They ask for row
// b + kAhead while working on row b; the LSTM's row passes ask for row b + 1. A prefetch is a hint: it
// changes no value.
constexpr int64_t kAhead = 4;

template <typename T>
inline void prefetch(const T* p) {
  __builtin_prefetch(p, 0, 3);
}

template <typename T>
inline void prefetch_write(T* p) {
  __builtin_prefetch(p, 1, 3);
}

template <typename T>
inline Vec<T> lanes(const Vec<T>& v, int64_t n) {  // zero the lanes >= n
  return n >= Vec<T>::size() ? v : Vec<T>::set(Vec<T>(T(0)), v, n);
}

template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T a[Vec<T>::size()];
  v.store(a);
  T s = 0;
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += a[i];
  return s;
}

// The AVX-512 build (Intel CPUs, fused.AVX512_MAKERS) sums a vector's 16 lanes as a tree of four halvings
// rather than lane by lane: a chain of 4 additions instead of 16 (each row statistic of a layer norm ends
// in one). It rounds differently from the lane-by-lane sum, as the AVX-512 build already does from the
// AVX2 one (a run replays on the build it was made with).
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline float hsum<float>(const Vec<float>& v) {
  const __m512 x = v;
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}
#endif

template <typename T>
inline Vec<T> fma(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) {
  return at::vec::fmadd(a, b, c);
}

// exp. float64 and non-AVX2 builds use SLEEF's exp (what torch.exp uses). float32 with AVX2 uses a
// shorter form within ~2 ulp over the range that matters here: clamp to [-87, 88] (NaN passes
// through), n = round(x / ln 2), r = x - n ln 2 (in two parts), e^r = 1 + r + r^2 Q(r) with a degree-4
// Q fitted for these kernels on [-ln2/2, ln2/2], times 2^n built in the exponent bits.
template <typename T>
inline Vec<T> exp_(const Vec<T>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(RECNORM_SLEEF_EXP)
template <>
inline Vec<float> exp_<float>(const Vec<float>& xv) {
  __m256 x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), __m256(xv)));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(0.001381457777162311f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.00836870078675251f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.041668387197908774f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.16666520765564605f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.4999999345495444f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(r, r), p, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return Vec<float>(_mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// The same exp with AVX-512 vectors (the build of recnorm.kernels.fused.build_flags on Intel CPUs with
// AVX-512): the same operations in the same order, lane by lane.
#if defined(CPU_CAPABILITY_AVX512) && !defined(RECNORM_SLEEF_EXP)
template <>
inline Vec<float> exp_<float>(const Vec<float>& xv) {
  __m512 x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), __m512(xv)));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(0.001381457777162311f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.00836870078675251f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.041668387197908774f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16666520765564605f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.4999999345495444f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(r, r), p, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return Vec<float>(_mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}
#endif

// 1 / d. float32 with AVX2 or AVX-512: the hardware estimate refined by one Newton step (within ~2 ulp); a
// quotient's divider is the slowest unit in these passes.
template <typename T>
inline Vec<T> recip_(const Vec<T>& d) {
  return d.reciprocal();
}

#if defined(CPU_CAPABILITY_AVX2)
template <>
inline Vec<float> recip_<float>(const Vec<float>& dv) {
  const __m256 d = dv;
  const __m256 r = _mm256_rcp_ps(d);
  return Vec<float>(_mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, _mm256_set1_ps(2.0f))));
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vec<float> recip_<float>(const Vec<float>& dv) {  // a 14-bit estimate and one Newton step
  const __m512 d = dv;
  const __m512 r = _mm512_rcp14_ps(d);
  return Vec<float>(_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f))));
}
#endif

// sigmoid and tanh with the quotient they contain either from recip_ (kFastRecip) or an exact
// division. fused_lstm.cpp uses the first, fused_gru_rnn.cpp the second; each kernel names its choice
// once, so its results stay what they were.
template <bool kFastRecip, typename T>
inline Vec<T> sigmoid_v(const Vec<T>& x) {
  const Vec<T> d = Vec<T>(T(1)) + exp_(x.neg());
  if constexpr (kFastRecip) {
    return recip_(d);
  } else {
    return d.reciprocal();
  }
}

// tanh. float64 keeps SLEEF's tanh (what torch.tanh uses). float32 uses a cheaper form that stays
// within ~3 ulp: an odd polynomial x + x^3 P(x^2) below |x| = 0.625 (coefficients fitted for these
// kernels to minimize the relative error), and 1 - 2 / (exp(2|x|) + 1) above, with the sign restored.
template <bool kFastRecip, typename T>
inline Vec<T> tanh_v(const Vec<T>& x) {
  if constexpr (!std::is_same<T, float>::value) {
    return x.tanh();
  } else {
    using V = Vec<float>;
    const V ax = x.abs();
    const V z = ax * ax;
    V p(-0.005705338139803117f);
    p = fma(p, z, V(0.02063939546500803f));
    p = fma(p, z, V(-0.05373980737091641f));
    p = fma(p, z, V(0.13331443271771376f));
    p = fma(p, z, V(-0.33333281980023094f));
    const V small = fma(ax * z, p, ax);
    const V e1 = exp_(ax + ax) + V(1.0f);
    V big;
    if constexpr (kFastRecip) {
      big = V(1.0f) - V(2.0f) * recip_(e1);
    } else {
      big = V(1.0f) - V(2.0f) / e1;
    }
    const V t = V::blendv(big, small, ax < V(0.625f));
    return V::blendv(t, t.neg(), x < V(0.0f));
  }
}

// Input projection of one row: y[0:G) = sum_k x[k] W_ih^T[k, 0:G)  (wt is W_ih^T, (I, G)). Every output
// is summed in the order k = 0, 1, ..., I - 1 from 0 (so its rounding does not depend on the blocking);
// kBlock vectors at a time, whose independent FMA chains hide the FMA's latency.
template <typename T>
inline void project_row(const T* xr, const T* wt, int64_t I, int64_t G, T* y) {
  constexpr int64_t VS = Vec<T>::size();
  constexpr int64_t kBlock = 8;
  int64_t j = 0;
  for (; j + kBlock * VS <= G; j += kBlock * VS) {
    Vec<T> acc[kBlock];
    for (int64_t u = 0; u < kBlock; ++u) acc[u] = Vec<T>(T(0));
    for (int64_t k = 0; k < I; ++k) {
      const Vec<T> xk(xr[k]);
      const T* w = wt + k * G + j;
      for (int64_t u = 0; u < kBlock; ++u) acc[u] = fma(xk, Vec<T>::loadu(w + u * VS), acc[u]);
    }
    for (int64_t u = 0; u < kBlock; ++u) acc[u].store(y + j + u * VS);
  }
  for (; j < G; j += VS) {
    const int64_t n = std::min(VS, G - j);
    Vec<T> acc(T(0));
    for (int64_t k = 0; k < I; ++k) acc = fma(Vec<T>(xr[k]), ld(wt + k * G + j, n), acc);
    st(y + j, acc, n);
  }
}

// The same for columns [j, j + n) of each of the K gate blocks (of width H) only, for the first `rows` rows
// of x (row stride I) into the rows of y (row stride G). Two rows at a time: their 2K chains are
// independent. Each output is summed as in project_row.
template <int64_t K, typename T>
inline void project_gate_cols(const T* x, const T* wt, int64_t I, int64_t G, int64_t H, int64_t j, int64_t n, int64_t rows, T* y) {
  int64_t bb = 0;
  for (; bb + 2 <= rows; bb += 2) {
    const T *x0 = x + bb * I, *x1 = x0 + I;
    Vec<T> a0[K], a1[K];
    for (int64_t g = 0; g < K; ++g) a0[g] = a1[g] = Vec<T>(T(0));
    for (int64_t k = 0; k < I; ++k) {
      const Vec<T> u0(x0[k]), u1(x1[k]);
      const T* w = wt + k * G + j;
      for (int64_t g = 0; g < K; ++g) {
        const Vec<T> wg = ld(w + g * H, n);
        a0[g] = fma(u0, wg, a0[g]);
        a1[g] = fma(u1, wg, a1[g]);
      }
    }
    for (int64_t g = 0; g < K; ++g) {
      st(y + bb * G + g * H + j, a0[g], n);
      st(y + (bb + 1) * G + g * H + j, a1[g], n);
    }
  }
  for (; bb < rows; ++bb) {
    const T* x0 = x + bb * I;
    Vec<T> a0[K];
    for (int64_t g = 0; g < K; ++g) a0[g] = Vec<T>(T(0));
    for (int64_t k = 0; k < I; ++k) {
      const Vec<T> u0(x0[k]);
      for (int64_t g = 0; g < K; ++g) a0[g] = fma(u0, ld(wt + k * G + g * H + j, n), a0[g]);
    }
    for (int64_t g = 0; g < K; ++g) st(y + bb * G + g * H + j, a0[g], n);
  }
}

// ------------------------------------------------------------------------------------------------
// Problem description shared by forward and backward, and the chunks of steps its GEMMs run over.
// ------------------------------------------------------------------------------------------------

struct Shape {
  int64_t T = 0, B0 = 0, N = 0, H = 0, G = 0, I = 0, K = 1;  // K gate blocks of H
  std::vector<int64_t> bs, off;  // off has T + 1 entries

  // `what` starts the error messages ("fused LSTM").
  Shape(const std::vector<int64_t>& batch_sizes, int64_t hidden, int64_t input, int64_t blocks, const char* what) : bs(batch_sizes) {
    T = int64_t(bs.size());
    TORCH_CHECK(T > 0, what, ": empty sequence");
    B0 = bs[0];
    off.resize(T + 1);
    off[0] = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(bs[t] > 0 && (t == 0 || bs[t] <= bs[t - 1]), what, ": batch_sizes must be positive and non-increasing");
      off[t + 1] = off[t] + bs[t];
    }
    N = off[T];
    H = hidden;
    K = blocks;
    G = blocks * hidden;
    I = input;
  }
  int64_t next_bs(int64_t t) const { return t + 1 < T ? bs[t + 1] : 0; }

  // End (exclusive) of the input-projection chunk that starts at step t: the following steps while the
  // chunk stays within `rows` rows (at least step t).
  int64_t proj_chunk_end(int64_t t, int64_t rows) const {
    int64_t t2 = t + 1;
    while (t2 < T && off[t2 + 1] - off[t] <= rows) ++t2;
    return t2;
  }

  // The most rows of one input-projection chunk.
  int64_t proj_chunk_max(int64_t rows) const {
    int64_t most = 0;
    for (int64_t t = 0; t < T;) {
      const int64_t t2 = proj_chunk_end(t, rows);
      most = std::max(most, off[t2] - off[t]);
      t = t2;
    }
    return most;
  }

  // Chunks [t0, t1] of consecutive steps for the backward's weight-gradient GEMMs, last steps first,
  // each of at most max(chunk_rows, B0) rows; `cap` gets the most rows of one.
  std::vector<std::pair<int64_t, int64_t>> grad_chunks(int64_t chunk_rows, int64_t& cap) const {
    const int64_t rmax = std::max<int64_t>(chunk_rows, B0);
    std::vector<std::pair<int64_t, int64_t>> chunks;
    for (int64_t t1 = T - 1; t1 >= 0;) {
      int64_t t0 = t1;
      while (t0 > 0 && off[t1 + 1] - off[t0 - 1] <= rmax) --t0;
      chunks.emplace_back(t0, t1);
      t1 = t0 - 1;
    }
    cap = 0;
    for (auto& c : chunks) cap = std::max(cap, off[c.second + 1] - off[c.first]);
    return chunks;
  }
};

template <typename T>
inline const T* ptr_or(const c10::optional<Tensor>& t, const T* fallback) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : fallback;
}

inline bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// ------------------------------------------------------------------------------------------------
// Variants shared by the LSTM and GRU/RNN kernels: zoneout and a joint gate norm
// ------------------------------------------------------------------------------------------------

// One row of zoneout keep indicators: 0/1 bytes (training) or values of T (a rate in eval; indicators
// given as T). r(j, n) is the vector of lanes [j, j + n); absent (false): no zoneout.
template <typename T>
struct ZoneRow {
  const T* f = nullptr;
  const uint8_t* u = nullptr;
  explicit operator bool() const { return f != nullptr || u != nullptr; }
  Vec<T> operator()(int64_t j, int64_t n) const {
    if (f) return ld(f + j, n);
    alignas(64) T buf[Vec<T>::size()];
    for (int64_t k = 0; k < n; ++k) buf[k] = T(u[j + k]);
    return ld(buf, n);
  }
};

// Zoneout keep indicators of one state: (N, H) 0/1 bytes (uint8; training, a quarter of the memory the
// indicators would take in T, and kept for backward) or (N, H) values of the input's dtype, or one (1, H)
// row of the input's dtype holding the rate (eval); absent: no zoneout. at<T>(r) is packed row r's.
struct ZoneRows {
  const void* p = nullptr;
  int64_t stride = 0;
  bool bytes = false;
  ZoneRows() = default;
  ZoneRows(const c10::optional<Tensor>& z, const Tensor& x, int64_t H, const char* what) {
    if (!has(z)) return;
    bytes = z->scalar_type() == at::kByte;
    TORCH_CHECK(z->dim() == 2 && z->size(1) == H && (z->size(0) == 1 || z->size(0) == x.size(0)) && z->is_contiguous() &&
                    (bytes || z->scalar_type() == x.scalar_type()),
                what, ": zoneout indicators must be contiguous (N, H) tensors of uint8 or of the input's dtype, or a (1, H) row ",
                "of the input's dtype");
    p = z->data_ptr();
    stride = z->size(0) == 1 ? 0 : H;
  }
  explicit operator bool() const { return p != nullptr; }
  template <typename T>
  ZoneRow<T> at(int64_t r) const {
    ZoneRow<T> row;
    if (p == nullptr) return row;
    if (bytes) {
      row.u = static_cast<const uint8_t*>(p) + r * stride;
    } else {
      row.f = static_cast<const T*>(p) + r * stride;
    }
    return row;
  }
};

// dst[0:n) = src + d * (prev - src): zoneout of one state row (dst may be src).
template <typename T>
inline void zone_row(T* dst, const T* src, const T* prev, const ZoneRow<T>& d, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    const Vec<T> a = ld(src + j, c);
    st(dst + j, fma(d(j, c), ld(prev + j, c) - a, a), c);
  }
}

// The joint gate norm's sum: x[0:n) += y[0:n).
template <typename T>
inline void add_row(T* x, const T* y, int64_t n) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    st(x + j, ld(x + j, c) + ld(y + j, c), c);
  }
}

// Per-thread scratch indexed by at::get_thread_num().
inline int64_t max_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// The sum of `nslots` per-thread accumulator slots of `width` values each.
template <typename T>
inline std::vector<T> reduce_slots(const std::vector<T>& partial, int64_t nslots, int64_t width) {
  std::vector<T> acc(width, T(0));
  for (int64_t s = 0; s < nslots; ++s)
    for (int64_t q = 0; q < width; ++q) acc[q] += partial[s * width + q];
  return acc;
}

// A fresh tensor holding acc[start, start + len).
template <typename T>
inline Tensor vec_tensor(const std::vector<T>& acc, int64_t start, int64_t len, const at::TensorOptions& opts) {
  Tensor r = at::empty({len}, opts);
  std::copy(acc.begin() + start, acc.begin() + start + len, r.data_ptr<T>());
  return r;
}

// ------------------------------------------------------------------------------------------------
// GEMMs
// ------------------------------------------------------------------------------------------------

// torch's oneDNN linear with a prepacked weight (mkldnn::_linear_pointwise, what torch.compile uses on
// CPU): y = x W^T. For some shapes (small batch, wide layers) it beats MKL's sgemm; the Python side
// decides and prepacks W with mkldnn::_reorder_linear_weight. Looked up once; absent -> MKL.
using DnnLinearFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                           c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

inline const std::optional<c10::TypedOperatorHandle<DnnLinearFn>>& dnn_linear_op() {
  static const std::optional<c10::TypedOperatorHandle<DnnLinearFn>> op = []() -> std::optional<c10::TypedOperatorHandle<DnnLinearFn>> {
    try {
      auto handle = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
      if (handle) return handle->typed<DnnLinearFn>();
    } catch (const std::exception&) {
    }
    return std::nullopt;
  }();
  return op;
}

inline bool dnn_linear_available() { return dnn_linear_op().has_value(); }

inline bool use_packed(const c10::optional<Tensor>& packed) { return packed.has_value() && packed->defined(); }

inline Tensor dnn_linear(const Tensor& x, const Tensor& packed) {
  return dnn_linear_op()->call(x, packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// Whether gemm_into clears its output first (below). Set per CPU maker when the extension loads
// (recnorm/kernels/fused.py, GEMM_PREFILL_MAKERS); on by default, as before the setting existed.
inline bool& gemm_prefill() {
  static bool on = true;
  return on;
}
inline void set_gemm_prefill(bool on) { gemm_prefill() = on; }

// out = a @ b, the same values as at::mm_out(out, a, b) either way (the product plus an exact 0). With the
// prefill, a fill by ATen's threads and beta = 1 skip the single-thread clearing pass that MKL's beta = 0
// path makes on some CPUs (mkl_blas_def_sgemm_mscale on the AMD EPYC host); where MKL makes none, the fill
// is an extra pass. The measurements behind the choice: fused.py, GEMM_PREFILL_MAKERS.
inline void gemm_into(Tensor& out, const Tensor& a, const Tensor& b) {
  if (gemm_prefill()) {
    out.zero_();
    at::addmm_out(out, out, a, b, 1, 1);
  } else {
    at::mm_out(out, a, b);
  }
}

// w^T as a contiguous tensor (a GEMM's plain operand), the same values as w.t().contiguous(): copied in
// 16 x 16 tiles, bands of rows of w spread over ATen's threads once there are at least kTransposeGrain
// elements per thread. ATen's transposing copy runs on one thread; each forward call transposes W_hh and
// W_ih, and at (H, G) = (128, 512) that copy took about half of the C++ forward of a one-step call.
constexpr int64_t kTransposeTile = 16;
constexpr int64_t kTransposeGrain = 32768;

template <typename T>
inline void transpose_band(const T* src, T* dst, int64_t R, int64_t C, int64_t r0, int64_t r1) {
  constexpr int64_t K = kTransposeTile;
  for (int64_t i = r0; i < r1; i += K) {
    const int64_t ie = std::min(i + K, r1);
    for (int64_t j = 0; j < C; j += K) {
      const int64_t je = std::min(j + K, C);
      if (ie - i == K && je - j == K) {  // a full tile: constant bounds, which the compiler unrolls
        for (int64_t b = 0; b < K; ++b)
          for (int64_t a = 0; a < K; ++a) dst[(j + b) * R + i + a] = src[(i + a) * C + j + b];
      } else {
        for (int64_t b = j; b < je; ++b)
          for (int64_t a = i; a < ie; ++a) dst[b * R + a] = src[a * C + b];
      }
    }
  }
}

// w: 2-D and contiguous, as the entry points' check_common requires of the weights.
template <typename T>
inline Tensor transposed(const Tensor& w) {
  const int64_t R = w.size(0), C = w.size(1);
  Tensor out = at::empty({C, R}, w.options());
  if (R == 0 || C == 0) return out;
  const T* src = w.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t bands = (R + kTransposeTile - 1) / kTransposeTile;
  const int64_t grain = std::max<int64_t>(1, kTransposeGrain / (kTransposeTile * C));
  at::parallel_for(0, bands, grain, [&](int64_t b0, int64_t b1) {
    transpose_band(src, dst, R, C, b0 * kTransposeTile, std::min(R, b1 * kTransposeTile));
  });
  return out;
}

// W^T as the plain operand of a call's GEMMs (x W^T): a contiguous copy (transposed<T>) where the call has
// several steps, whose products reuse it, else the transposed view, which at::mm reads in place as BLAS's
// transposed operand (as torch.nn's own op does). A one-step call (decoding step by step) spent more on the
// copy than on its products: W_hh's copy took 16 us of a 140 us LSTM call at (B, I, H) = (1, 28, 128).
template <typename T>
inline Tensor plain_operand(const Tensor& w, int64_t steps) {
  return steps < 2 ? w.t() : transposed<T>(w);
}

// MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute), which libtorch_cpu exports where torch is
// built with MKL: a weight that every step multiplies is packed once per call instead of by each step's
// sgemm. The declarations are weak: where the symbols are absent they are null and the GEMMs stay on
// at::mm. The arguments are MKL's LP64 interface (32-bit integers; its enums are ints); float32 only, as
// torch exports no dgemm_pack.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src, int ld,
                      float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda, const float* b,
                         int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151, kCblasBMatrix = 162;

inline bool mkl_pack_available() {
  return cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr;
}

// Whether the step GEMMs use MKL's packed weights (where available). Set per CPU maker when the extension
// loads (recnorm/kernels/fused.py, MKL_PACK_MAKERS); off by default.
inline bool& gemm_packed() {
  static bool on = false;
  return on;
}
inline void set_gemm_packed(bool on) { gemm_packed() = on; }

// A weight packed by MKL as the right operand of x W^T (transpose) or x W; empty (false) where the GEMM
// stays on at::mm: not float32, packing off or unavailable, or an empty or too large a matrix (and, by the
// kernels' choice, a call of one step, which has no second product to reuse the packing). On the Intel
// host the forward's products were at::mm's to the bit; the backward's, whose inner dimension is 4H or 3H,
// were too up to H = 128 and rounded differently from H = 256 (tests/kernels/test_host.py checks that
// both agree to float32 rounding).
struct MklPacked {
  Tensor buf;
  int n = 0, k = 0;
  explicit operator bool() const { return buf.defined(); }
};

// `alloc(sizes, options)` gives the packing's buffer (at::empty's signature): MKL asks for several MiB of
// which it writes about the weight's size, so the LSTM's kernels take it from their pool.
template <typename T, class Alloc>
inline MklPacked mkl_pack(const Tensor& w, bool transpose, int64_t m, Alloc alloc) {
  MklPacked p;
  if constexpr (std::is_same_v<T, float>) {
    const int64_t n = transpose ? w.size(0) : w.size(1), k = transpose ? w.size(1) : w.size(0);
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    if (!gemm_packed() || !mkl_pack_available() || n == 0 || k == 0 || m <= 0 || n > kMax || k > kMax || m > kMax) return p;
    p.n = int(n), p.k = int(k);
    const size_t bytes = cblas_sgemm_pack_get_size(kCblasBMatrix, int(m), p.n, p.k);
    p.buf = alloc({int64_t((bytes + sizeof(float) - 1) / sizeof(float))}, w.options());
    cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, transpose ? kCblasTrans : kCblasNoTrans, int(m), p.n, p.k, 1.0f,
                     w.data_ptr<float>(), int(w.size(1)), p.buf.data_ptr<float>());
  }
  return p;
}

// W_hh packed by MKL for a call's step products (x W_hh^T forward: transpose; dG W_hh backward), where they
// run on MKL rather than oneDNN (`dnn`: oneDNN's packing) and the call has a second step to reuse it.
template <typename T, class Alloc>
inline MklPacked step_pack(const Tensor& w_hh, bool transpose, const Shape& sh, const c10::optional<Tensor>& dnn, Alloc alloc) {
  if (use_packed(dnn) || sh.T < 2) return MklPacked();
  return mkl_pack<T>(w_hh, transpose, sh.B0, alloc);
}

template <typename T>
inline MklPacked step_pack(const Tensor& w_hh, bool transpose, const Shape& sh, const c10::optional<Tensor>& dnn) {
  return step_pack<T>(w_hh, transpose, sh, dnn, [](at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); });
}

// out = a @ op(W) (beta 0) or out += a @ op(W) (beta 1), W packed by mkl_pack; a and out: rows of
// unit stride (a row-major matrix or rows of one).
template <typename T>
inline void mkl_compute(const MklPacked& p, const Tensor& a, Tensor& out, float beta) {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t m = a.size(0);
    if (m == 0) return;
    TORCH_CHECK(a.size(1) == p.k && out.size(0) == m && out.size(1) == p.n && a.stride(1) == 1 && out.stride(1) == 1,
                "fused kernels: packed GEMM operands do not match");
    cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, int(m), p.n, p.k, a.data_ptr<float>(), int(a.stride(0)),
                        p.buf.data_ptr<float>(), p.n, beta, out.data_ptr<float>(), int(out.stride(0)));
  }
}

// x @ W^T with W given as MKL's packed weight, as wt = W^T (contiguous) or prepacked for oneDNN. Returns
// the tensor that holds the result: `out` itself, or a fresh tensor from oneDNN.
template <typename T>
inline Tensor step_gemm(const Tensor& x, const Tensor& wt, const MklPacked& mkl, const c10::optional<Tensor>& packed, Tensor out) {
  if (use_packed(packed)) return dnn_linear(x, *packed);
  if (mkl) {
    mkl_compute<T>(mkl, x, out, 0.0f);
  } else {
    gemm_into(out, x, wt);
  }
  return out;
}

// dst = x @ op(W), or dst += x @ op(W) (accumulate), with W as MKL's packing, oneDNN's (`dnn`) or plain
// (`w`, at::mm's operand): the backward's dL/dh_{t-1} from the step's gate gradients.
template <typename T>
inline void step_gemm_into(Tensor dst, const Tensor& x, const Tensor& w, const MklPacked& mkl, const c10::optional<Tensor>& dnn,
                           bool accumulate) {
  if (use_packed(dnn)) {
    const Tensor res = dnn_linear(x, *dnn);
    if (accumulate) {
      dst.add_(res);
    } else {
      dst.copy_(res);
    }
  } else if (mkl) {
    mkl_compute<T>(mkl, x, dst, accumulate ? 1.0f : 0.0f);
  } else if (accumulate) {
    dst.addmm_(x, w);
  } else {
    gemm_into(dst, x, w);
  }
}

// Whether the backward accumulates the weight gradients transposed, dW^T += x^T dG (an (I, G) and an (H, G)
// accumulator), instead of dW += dG^T x. Set per CPU maker when the extension loads (recnorm/kernels/fused.py,
// WGRAD_TRANSPOSED_MAKERS); off by default. The same sums in another GEMM layout: MKL rounds them
// differently, not worse. On the Intel host, with a chunk of 1024 rows, dG^T x took 419 us and x^T dG 142
// us at (G, I) = (512, 28), and 550 against 494 at (512, 128).
inline bool& wgrad_transposed() {
  static bool on = false;
  return on;
}
inline void set_wgrad_transposed(bool on) { wgrad_transposed() = on; }

// dL/dW_ih and dL/dW_hh, summed over the backward's chunks (chunk_weight_grads), in the layout
// wgrad_transposed() picks; result() gives them in the weights' own layout.
struct WeightGrads {
  Tensor ih, hh;  // (G, I) and (G, H), or (I, G) and (H, G) where transposed
  bool transposed = false;

  WeightGrads() = default;
  WeightGrads(const Tensor& w_ih, const Tensor& w_hh) : transposed(wgrad_transposed()) {
    ih = transposed ? at::zeros({w_ih.size(1), w_ih.size(0)}, w_ih.options()) : at::zeros_like(w_ih);
    hh = transposed ? at::zeros({w_hh.size(1), w_hh.size(0)}, w_hh.options()) : at::zeros_like(w_hh);
  }

  // acc (ih or hh) += dG^T a, for the chunk's gate gradients dG (R, G) and its inputs a (R, I or H).
  void add(const Tensor& acc, const Tensor& dg, const Tensor& a) const {
    if (transposed) {
      acc.addmm_(a.t(), dg);
    } else {
      acc.addmm_(dg.t(), a);
    }
  }

  // Transposed back by transposed<T>() (on ATen's threads), not ATen's one-thread transposing copy: 121 us
  // for the (512, 128) dW_hh at (28, 128, 28, 128).
  template <typename T>
  std::pair<Tensor, Tensor> result() const {
    if (!transposed) return {ih, hh};
    return {::transposed<T>(ih), ::transposed<T>(hh)};
  }
};

// Weight and input gradients of the backward's chunk of steps [t0, t1], from dL/d(W_hh h_{t-1}) (DGH)
// and dL/d(W_ih x_t) (DGI) of its rows: dW_hh += DGH^T h_{t-1}, dW_ih += DGI^T x (into dW, in its layout)
// and, where dx is defined, dx = DGI W_ih. h_{t-1} is read in place from out (h0 for step 0) when every
// step of the chunk has as many rows as the step before it, else gathered into Hprev.
inline void chunk_weight_grads(const Shape& sh, int64_t t0, int64_t t1, const Tensor& x, const Tensor& h0, const Tensor& out,
                               const Tensor& w_ih, const Tensor& DGH, const Tensor& DGI, const Tensor& Hprev, WeightGrads& dW,
                               const Tensor& dx) {
  const int64_t cbase = sh.off[t0];
  const int64_t R = sh.off[t1 + 1] - cbase;
  bool contiguous = t0 > 0;
  for (int64_t t = t0; contiguous && t <= t1; ++t) contiguous = sh.bs[t] == sh.bs[t0 - 1];
  Tensor hp;
  if (contiguous) {
    hp = out.narrow(0, sh.off[t0 - 1], R);
  } else {
    for (int64_t t = t0; t <= t1; ++t) {
      Tensor src = t == 0 ? h0.narrow(0, 0, sh.bs[0]) : out.narrow(0, sh.off[t - 1], sh.bs[t]);
      Hprev.narrow(0, sh.off[t] - cbase, sh.bs[t]).copy_(src);
    }
    hp = Hprev.narrow(0, 0, R);
  }
  dW.add(dW.hh, DGH.narrow(0, 0, R), hp);
  Tensor dgi_c = DGI.narrow(0, 0, R);
  dW.add(dW.ih, dgi_c, x.narrow(0, cbase, R));
  if (dx.defined()) {
    Tensor dst = dx.narrow(0, cbase, R);
    gemm_into(dst, dgi_c, w_ih);
  }
}

// The GEMM settings every kernel extension exposes (set per CPU maker when it loads, recnorm/kernels/fused.py):
// `m` is the extension's pybind11 module.
template <class Module>
inline void def_gemm_settings(Module& m) {
  m.def("set_gemm_prefill", &set_gemm_prefill, "whether the GEMMs clear their output with ATen's threads first (beta = 1)");
  m.def("gemm_prefill", []() { return gemm_prefill(); }, "whether the GEMMs clear their output first (set_gemm_prefill)");
  m.def("set_gemm_packed", &set_gemm_packed, "whether the step GEMMs use MKL's packed weights (where torch exports them)");
  m.def("gemm_packed", []() { return gemm_packed() && mkl_pack_available(); }, "whether the step GEMMs use MKL's packed weights");
  m.def("set_wgrad_transposed", &set_wgrad_transposed, "whether the backward accumulates the weight gradients transposed (x^T dG)");
  m.def("wgrad_transposed", []() { return wgrad_transposed(); }, "whether the backward accumulates the weight gradients transposed");
  m.def("mkl_pack_available", &mkl_pack_available, "whether torch exports MKL's packed GEMM (cblas_sgemm_pack)");
}

}  // namespace
