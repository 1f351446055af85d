// Fused CPU time loop of one GRU or Elman RNN (tanh / relu) direction with layer or recurrent batch
// normalization of the two gate terms.
//
// The Python side (recnorm/kernels/fused_cpu_gru_rnn.py) wraps `forward` and `backward` in an autograd
// Function; recnorm/kernels/reference.py is the oracle this file must agree with (outputs, final
// states, gradients, running statistics). The LSTM kernel (fused_lstm.cpp) is the model: same packed
// layout, same statistics rules; the vector helpers below are written after its own.
//
// Layout: packed rows. Step t owns rows [off[t], off[t] + bs[t]) of x, out and every saved (N, .)
// buffer; bs is non-increasing, so the rows valid at step t are the first bs[t] rows of step t - 1.
//
// Math (G = 3H for the GRU, H for the RNN; ^ marks a normalized term, g the norm gains):
//   a_i = g_ih * N_ih(W_ih x_t),  a_h = g_hh * N_hh(W_hh h_{t-1})
//   GRU: r = sigmoid(a_i,r + a_h,r + b_r), z = sigmoid(a_i,z + a_h,z + b_z),
//        n = tanh(a_i,n + b_in + r * (a_h,n + b_hn)),  h = n + z * (h_{t-1} - n)
//        (b_r, b_z = b_ih + b_hh of those blocks; b_in, b_hn kept apart, b_hn inside the reset product)
//   RNN: h = act(a_i + a_h + b), act = tanh or relu
// Modes:
//   1 (layer): N = layer norm of each row; the GRU normalizes the (r, z) block and the n block
//              separately (GroupedLayerNorm groups (2H, H)), the RNN the whole row.
//   2 (batch): per-step batch statistics over the valid rows (population statistics in eval mode and
//              for steps with fewer than 2 valid rows), running statistics updated as
//              RecurrentBatchNorm._update does.
// A feature (BN: a column over the batch; LN: a row group) whose values are all equal normalizes to
// exactly 0 and passes no gradient (recnorm.nn.stats.degenerate_features); stored as rstd = 0.
//
// Per step the forward does one GEMM (h_{t-1} W_hh^T) and one fused pass over the step's rows
// (statistics, normalization, gates, state update); the input projection runs as GEMMs over chunks of
// consecutive steps just before their steps. The backward (BPTT) does one fused pass and one GEMM per
// step (dh_{t-1} = dA_h W_hh, plus the GRU's direct z * dh term written by the pass), and the weight
// gradients as a few large GEMMs over chunks of consecutive steps. Saved for backward: the normalized
// terms (N, G) twice, the outputs, and the rstd of every row group (layer) or step and feature (batch).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

enum Mode : int64_t { kLayer = 1, kBatch = 2 };
enum Cell : int64_t { kGRU = 0, kTanh = 1, kRelu = 2 };

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

template <typename T>
inline Vec<T> fma(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) {
  return at::vec::fmadd(a, b, c);
}

// exp. float64 and non-AVX2 builds use SLEEF's exp (what torch.exp uses). float32 with AVX2 uses a
// shorter form within ~2 ulp over the range that matters here: clamp to [-87, 88] (NaN passes
// through), n = round(x / ln 2), r = x - n ln 2 (in two parts), e^r = 1 + r + r^2 Q(r) with a degree-4
// Q on [-ln2/2, ln2/2], times 2^n built in the exponent bits (the form fused_lstm.cpp uses).
template <typename T>
inline Vec<T> exp_(const Vec<T>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX2)
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

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  return (Vec<T>(T(1)) + exp_(x.neg())).reciprocal();
}

// tanh. float64 keeps SLEEF's tanh (what torch.tanh uses). float32 uses a cheaper form within ~3 ulp:
// an odd polynomial x + x^3 P(x^2) below |x| = 0.625, and 1 - 2 / (exp(2|x|) + 1) above, with the
// sign restored.
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) {
  return x.tanh();
}

template <>
inline Vec<float> tanh_<float>(const Vec<float>& x) {
  using V = Vec<float>;
  const V ax = x.abs();
  const V z = ax * ax;
  V p(-0.005705338139803117f);
  p = fma(p, z, V(0.02063939546500803f));
  p = fma(p, z, V(-0.05373980737091641f));
  p = fma(p, z, V(0.13331443271771376f));
  p = fma(p, z, V(-0.33333281980023094f));
  const V small = fma(ax * z, p, ax);
  const V big = V(1.0f) - V(2.0f) / (exp_(ax + ax) + V(1.0f));
  const V t = V::blendv(big, small, ax < V(0.625f));
  return V::blendv(t, t.neg(), x < V(0.0f));
}

// The RNN activation and its derivative expressed through its output h = act(pre).
template <typename T>
inline Vec<T> act(const Vec<T>& pre, bool relu) {
  return relu ? at::vec::maximum(pre, Vec<T>(T(0))) : tanh_(pre);
}

template <typename T>
inline Vec<T> act_grad(const Vec<T>& h, bool relu) {  // relu: 1 where h > 0 (torch's threshold_backward)
  if (relu) return Vec<T>::blendv(Vec<T>(T(0)), Vec<T>(T(1)), h > Vec<T>(T(0)));
  return Vec<T>(T(1)) - h * h;
}

// Threshold of recnorm.nn.stats.degenerate_features: var <= (16 eps |mean|)^2.
template <typename T>
constexpr T degenerate_tol() {
  return T(16) * std::numeric_limits<T>::epsilon();
}

// Mean and biased variance of x[0:n], shifted two-pass: exact (var = 0) for a constant row.
template <typename T>
inline void row_moments(const T* x, int64_t n, T& mean, T& var) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> x0(x[0]);
  Vec<T> s0(T(0)), s1(T(0));
  int64_t j = 0;
  for (; j + 2 * VS <= n; j += 2 * VS) {
    s0 += Vec<T>::loadu(x + j) - x0;
    s1 += Vec<T>::loadu(x + j + VS) - x0;
  }
  for (; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    s0 += lanes(ld(x + j, c) - x0, c);
  }
  mean = x[0] + hsum(s0 + s1) / T(n);
  const Vec<T> m(mean);
  Vec<T> q0(T(0)), q1(T(0));
  j = 0;
  for (; j + 2 * VS <= n; j += 2 * VS) {
    const Vec<T> d0 = Vec<T>::loadu(x + j) - m, d1 = Vec<T>::loadu(x + j + VS) - m;
    q0 = fma(d0, d0, q0);
    q1 = fma(d1, d1, q1);
  }
  for (; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    const Vec<T> d = lanes(ld(x + j, c) - m, c);
    q0 = fma(d, d, q0);
  }
  var = hsum(q0 + q1) / T(n);
}

template <typename T>
inline T ln_rstd(T mean, T var, T eps) {
  const T tol = degenerate_tol<T>() * mean;
  if (var <= tol * tol) return T(0);
  return T(1) / std::sqrt(var + eps);
}

// torch's lerp with a scalar weight (ATen/native/Lerp.h).
template <typename T>
inline Vec<T> lerp(const Vec<T>& self, const Vec<T>& end, T w) {
  if (std::abs(w) < T(0.5)) return fma(Vec<T>(w), end - self, self);
  return end - (end - self) * Vec<T>(T(1) - w);
}

// ------------------------------------------------------------------------------------------------
// Recurrent batch norm: one site's running statistics and the decision for one step.
// ------------------------------------------------------------------------------------------------

template <typename T>
struct BNSite {
  T* rm = nullptr;  // (S, F)
  T* rv = nullptr;  // (S, F)
  int64_t* nbt = nullptr;  // (S,)
  int64_t S = 1;
  int64_t F = 0;
  double momentum = 0.1;
  bool cumulative = false;
  T eps = T(1e-5);
  int64_t last = -1;  // last slot with num_batches_tracked > 0 (kept up to date while the loop runs)

  void init(const Tensor& rm_, const Tensor& rv_, const Tensor& nbt_, double mom, double eps_) {
    rm = rm_.data_ptr<T>();
    rv = rv_.data_ptr<T>();
    nbt = nbt_.data_ptr<int64_t>();
    S = rm_.size(0);
    F = rm_.size(1);
    cumulative = mom < 0;
    momentum = mom;
    eps = T(eps_);
    last = -1;
    for (int64_t s = 0; s < S; ++s)
      if (nbt[s] > 0) last = s;
  }
};

template <typename T>
struct BNStep {
  bool batch = false;  // batch statistics (and a running-statistics update) vs population statistics
  T* rm = nullptr;     // slot row of the running mean (read for population, updated for batch)
  T* rv = nullptr;
  T factor = 0;        // lerp weight of the update
  T unbias = 1;        // n / (n - 1)
  T eps = 0;
};

template <typename T>
inline BNStep<T> bn_begin_step(BNSite<T>& site, int64_t step, bool batch, int64_t n) {
  BNStep<T> s;
  s.batch = batch;
  s.eps = site.eps;
  int64_t slot;
  if (batch) {
    slot = std::min(step, site.S - 1);
    site.nbt[slot] += 1;
    site.last = std::max(site.last, slot);
    const double factor = site.cumulative ? 1.0 / double(site.nbt[slot]) : site.momentum;
    s.factor = T(factor);
    s.unbias = T(double(n) / double(n - 1));
  } else {
    const int64_t last = site.last >= 0 ? site.last : site.S - 1;
    slot = std::min(step, last);
  }
  s.rm = site.rm + slot * site.F;
  s.rv = site.rv + slot * site.F;
  return s;
}

// Statistics of `cnt` adjacent columns (starting at column `col` of the site) over n rows of X (row
// stride `stride`): batch statistics (updating the running statistics) or the slot's population
// statistics. Writes the mean and rstd (0 for a degenerate column) of those columns.
template <typename T>
inline void bn_columns(const T* X, int64_t stride, int64_t n, int64_t cnt, int64_t col, const BNStep<T>& s, T* mean_out,
                       T* rstd_out) {
  Vec<T> mean, rstd;
  if (s.batch) {
    const Vec<T> x0 = ld(X, cnt);
    Vec<T> acc(T(0));
    for (int64_t b = 1; b < n; ++b) acc += ld(X + b * stride, cnt) - x0;
    mean = x0 + acc / Vec<T>(T(n));
    Vec<T> q(T(0));
    for (int64_t b = 0; b < n; ++b) {
      const Vec<T> d = ld(X + b * stride, cnt) - mean;
      q = fma(d, d, q);
    }
    const Vec<T> var = q / Vec<T>(T(n));
    const Vec<T> tol = mean * Vec<T>(degenerate_tol<T>());
    const Vec<T> degenerate = var <= tol * tol;
    rstd = Vec<T>::blendv((var + Vec<T>(s.eps)).rsqrt(), Vec<T>(T(0)), degenerate);
    const Vec<T> rm = ld(s.rm + col, cnt), rv = ld(s.rv + col, cnt);
    st(s.rm + col, lerp(rm, mean, s.factor), cnt);
    st(s.rv + col, lerp(rv, var * Vec<T>(s.unbias), s.factor), cnt);
  } else {
    mean = ld(s.rm + col, cnt);
    rstd = (ld(s.rv + col, cnt) + Vec<T>(s.eps)).rsqrt();
  }
  st(mean_out, mean, cnt);
  st(rstd_out, rstd, cnt);
}

// Input projection of one row: y[0:G) = sum_k x[k] W_ih^T[k, 0:G)  (wt is W_ih^T, (I, G)).
template <typename T>
inline void project_row(const T* xr, const T* wt, int64_t I, int64_t G, T* y) {
  constexpr int64_t VS = Vec<T>::size();
  for (int64_t j = 0; j < G; j += VS) {
    const int64_t n = std::min(VS, G - j);
    Vec<T> acc(T(0));
    for (int64_t k = 0; k < I; ++k) acc = fma(Vec<T>(xr[k]), ld(wt + k * G + j, n), acc);
    st(y + j, acc, n);
  }
}

// The same for columns [q, q + n) only.
template <typename T>
inline void project_cols(const T* xr, const T* wt, int64_t I, int64_t G, int64_t q, int64_t n, T* y) {
  Vec<T> acc(T(0));
  for (int64_t k = 0; k < I; ++k) acc = fma(Vec<T>(xr[k]), ld(wt + k * G + q, n), acc);
  st(y + q, acc, n);
}

// ------------------------------------------------------------------------------------------------
// Problem description shared by forward and backward.
// ------------------------------------------------------------------------------------------------

struct Shape {
  int64_t T = 0, B0 = 0, N = 0, H = 0, G = 0, I = 0, K = 1;  // K gate blocks of H
  std::vector<int64_t> bs, off;  // off has T + 1 entries

  Shape(const std::vector<int64_t>& batch_sizes, int64_t hidden, int64_t input, int64_t blocks) : bs(batch_sizes) {
    T = int64_t(bs.size());
    TORCH_CHECK(T > 0, "fused GRU/RNN: empty sequence");
    B0 = bs[0];
    off.resize(T + 1);
    off[0] = 0;
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(bs[t] > 0 && (t == 0 || bs[t] <= bs[t - 1]), "fused GRU/RNN: batch_sizes must be positive and non-increasing");
      off[t + 1] = off[t] + bs[t];
    }
    N = off[T];
    H = hidden;
    K = blocks;
    G = blocks * hidden;
    I = input;
  }
  int64_t next_bs(int64_t t) const { return t + 1 < T ? bs[t + 1] : 0; }
};

template <typename T>
inline const T* ptr_or(const c10::optional<Tensor>& t, const T* fallback) {
  return (t.has_value() && t->defined()) ? t->data_ptr<T>() : fallback;
}

inline bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline int64_t max_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// torch's oneDNN linear with a prepacked weight (mkldnn::_linear_pointwise): y = x W^T. The Python
// side decides when to use it and prepacks W with mkldnn::_reorder_linear_weight; absent -> MKL.
using DnnLinearFn = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                           c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);

const std::optional<c10::TypedOperatorHandle<DnnLinearFn>>& dnn_linear_op() {
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

bool dnn_linear_available() { return dnn_linear_op().has_value(); }

inline bool use_packed(const c10::optional<Tensor>& packed) { return packed.has_value() && packed->defined(); }

inline Tensor dnn_linear(const Tensor& x, const Tensor& packed) {
  return dnn_linear_op()->call(x, packed, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename T>
std::vector<Tensor> forward_impl(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                 const c10::optional<Tensor>& bias, const c10::optional<Tensor>& b_hn_t,
                                 const c10::optional<Tensor>& g_ih_t, const c10::optional<Tensor>& g_hh_t, const Shape& sh,
                                 int64_t cell, int64_t mode, const std::vector<double>& eps, bool training, bool save,
                                 int64_t step_offset, const std::vector<c10::optional<Tensor>>& bn_buffers,
                                 const std::vector<double>& momentum, int64_t inproj_max, int64_t inproj_rows,
                                 const c10::optional<Tensor>& w_hh_packed) {
  constexpr int64_t VS = Vec<T>::size();
  const int64_t H = sh.H, G = sh.G, N = sh.N, B0 = sh.B0, Tn = sh.T, K = sh.K;
  const bool gru = cell == kGRU, relu = cell == kRelu;
  const int64_t S = gru ? 2 * H : G;  // first layer-norm group: the GRU's (r, z) block, or the whole row
  auto opts = x.options();

  std::vector<T> zeros_g(G, T(0)), ones_g(G, T(1));
  const T* b = ptr_or<T>(bias, zeros_g.data());
  const T* bhn = ptr_or<T>(b_hn_t, zeros_g.data());
  const T* gih = ptr_or<T>(g_ih_t, ones_g.data());
  const T* ghh = ptr_or<T>(g_hh_t, ones_g.data());
  const T eps_ih = T(eps[0]), eps_hh = T(eps[1]);

  BNSite<T> bn[2];
  if (mode == kBatch) {
    for (int s = 0; s < 2; ++s) bn[s].init(*bn_buffers[3 * s], *bn_buffers[3 * s + 1], *bn_buffers[3 * s + 2], momentum[s], eps[s]);
  }

  // Input projection W_ih x: GEMMs over chunks of consecutive steps (about inproj_rows rows each),
  // each just before its steps run, so that the pass finds its rows in cache; or, for a narrow input
  // (I <= inproj_max, where a GEMM with a tiny inner dimension is slow), computed row by row inside
  // the step pass from x and W_ih^T.
  const int64_t I = sh.I;
  const bool hoisted = I > inproj_max;
  int64_t xi_rows = save ? N : B0;
  if (hoisted && !save) {
    xi_rows = 0;
    for (int64_t t = 0; t < Tn;) {
      int64_t t2 = t + 1;
      while (t2 < Tn && sh.off[t2 + 1] - sh.off[t] <= inproj_rows) ++t2;
      xi_rows = std::max(xi_rows, sh.off[t2] - sh.off[t]);
      t = t2;
    }
  }
  Tensor XI = at::empty({xi_rows, G}, opts);  // input term (normalized in place when saved)
  const Tensor WT = w_ih.t().contiguous();  // (I, G)
  const T* wt = WT.data_ptr<T>();
  const T* x_p = x.data_ptr<T>();
  int64_t proj_end = 0, proj_base = 0;  // steps [.., proj_end) are projected; XI row 0 is packed row proj_base
  Tensor XH = at::empty({save ? N : B0, G}, opts);  // recurrent term (normalized in place when saved)
  Tensor out = at::empty({N, H}, opts);
  Tensor hn = at::empty({B0, H}, opts);
  // Saved statistics. Layer: (4, rows) rstd of the ih groups a, b and the hh groups a, b per row
  // (group b is the GRU's n block). Batch: (2, steps, G) rstd_ih, rstd_hh per step and feature.
  Tensor stats, means;
  if (mode == kLayer) {
    stats = at::empty({4, save ? N : B0}, opts);
  } else {
    stats = at::empty({2, save ? Tn : 1, G}, opts);
    means = at::empty({2, G}, opts);  // this step's means of the two gate terms
  }

  T* xi_all = XI.data_ptr<T>();
  T* xh_all = XH.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  T* hn_p = hn.data_ptr<T>();
  const T* h0_p = h0.data_ptr<T>();
  const Tensor w_hh_t = w_hh.t().contiguous();  // (H, G): a plain (not transposed) GEMM operand

  for (int64_t t = 0; t < Tn; ++t) {
    const int64_t Bt = sh.bs[t], o0 = sh.off[t];
    const int64_t step = t + step_offset;
    if (hoisted && t >= proj_end) {
      int64_t t2 = t + 1;
      while (t2 < Tn && sh.off[t2 + 1] - o0 <= inproj_rows) ++t2;
      const int64_t rows = sh.off[t2] - o0;
      proj_base = save ? 0 : o0;
      Tensor dst = XI.narrow(0, o0 - proj_base, rows);
      at::mm_out(dst, x.narrow(0, o0, rows), WT);
      proj_end = t2;
    }
    T* xi = hoisted ? xi_all + (o0 - proj_base) * G : (save ? xi_all + o0 * G : xi_all);
    T* xh_dst = save ? xh_all + o0 * G : xh_all;  // where the (normalized) recurrent term is kept
    const T* hp = t == 0 ? h0_p : out_p + sh.off[t - 1] * H;
    T* hout = out_p + o0 * H;
    const T* xrows = x_p + o0 * I;

    // Recurrent GEMM for the rows valid at t (raw term read from xh, normalized term written to xh_dst).
    const T* xh;
    Tensor gh;
    {
      Tensor hprev = t == 0 ? h0.narrow(0, 0, Bt) : out.narrow(0, sh.off[t - 1], Bt);
      Tensor dst = save ? XH.narrow(0, o0, Bt) : XH.narrow(0, 0, Bt);
      if (use_packed(w_hh_packed)) {
        gh = dnn_linear(hprev, *w_hh_packed);
      } else {
        at::mm_out(dst, hprev, w_hh_t);
        gh = dst;
      }
      xh = gh.data_ptr<T>();
    }

    if (mode == kLayer) {
      T* rs = stats.data_ptr<T>();
      const int64_t rstride = save ? N : B0;
      const int64_t rbase = save ? o0 : 0;
      at::parallel_for(0, Bt, 8, [&](int64_t b0, int64_t b1) {
        for (int64_t bb = b0; bb < b1; ++bb) {
          T* xir = xi + bb * G;
          const T* xhr = xh + bb * G;
          T* xhw = xh_dst + bb * G;
          const T* hpr = hp + bb * H;
          T* hr = hout + bb * H;
          if (!hoisted) project_row(xrows + bb * I, wt, I, G, xir);
          T mia, ria, mib = 0, rib = 0, mha, rha, mhb = 0, rhb = 0, var;
          row_moments(xir, S, mia, var);
          ria = ln_rstd(mia, var, eps_ih);
          row_moments(xhr, S, mha, var);
          rha = ln_rstd(mha, var, eps_hh);
          if (gru) {
            row_moments(xir + S, H, mib, var);
            rib = ln_rstd(mib, var, eps_ih);
            row_moments(xhr + S, H, mhb, var);
            rhb = ln_rstd(mhb, var, eps_hh);
          }
          rs[0 * rstride + rbase + bb] = ria;
          rs[1 * rstride + rbase + bb] = rib;
          rs[2 * rstride + rbase + bb] = rha;
          rs[3 * rstride + rbase + bb] = rhb;
          const Vec<T> vmia(mia), vria(ria), vmib(mib), vrib(rib), vmha(mha), vrha(rha), vmhb(mhb), vrhb(rhb);
          for (int64_t j = 0; j < H; j += VS) {
            const int64_t n = std::min(VS, H - j);
            if (gru) {
              Vec<T> a[3], h[3];
              for (int k = 0; k < 3; ++k) {
                const int64_t q = k * H + j;
                a[k] = k < 2 ? (ld(xir + q, n) - vmia) * vria : (ld(xir + q, n) - vmib) * vrib;
                h[k] = k < 2 ? (ld(xhr + q, n) - vmha) * vrha : (ld(xhr + q, n) - vmhb) * vrhb;
                if (save) {  // keep the normalized terms for backward
                  st(xir + q, a[k], n);
                  st(xhw + q, h[k], n);
                }
              }
              const Vec<T> r = sigmoid(fma(ld(gih + j, n), a[0], fma(ld(ghh + j, n), h[0], ld(b + j, n))));
              const Vec<T> z = sigmoid(fma(ld(gih + H + j, n), a[1], fma(ld(ghh + H + j, n), h[1], ld(b + H + j, n))));
              const Vec<T> hnf = fma(ld(ghh + 2 * H + j, n), h[2], ld(bhn + j, n));
              const Vec<T> nn = tanh_(fma(r, hnf, fma(ld(gih + 2 * H + j, n), a[2], ld(b + 2 * H + j, n))));
              st(hr + j, fma(z, ld(hpr + j, n) - nn, nn), n);
            } else {
              const Vec<T> a = (ld(xir + j, n) - vmia) * vria, h = (ld(xhr + j, n) - vmha) * vrha;
              if (save) {
                st(xir + j, a, n);
                st(xhw + j, h, n);
              }
              st(hr + j, act(fma(ld(gih + j, n), a, fma(ld(ghh + j, n), h, ld(b + j, n))), relu), n);
            }
          }
        }
      });
    } else {  // kBatch: every hidden unit j is independent of the others (column-parallel)
      const bool batch = training && Bt >= 2;
      const BNStep<T> s_ih = bn_begin_step(bn[0], step, batch, Bt);
      const BNStep<T> s_hh = bn_begin_step(bn[1], step, batch, Bt);
      const int64_t ts = save ? t : 0;
      T* r_ih = stats.data_ptr<T>() + (0 * (save ? Tn : 1) + ts) * G;
      T* r_hh = stats.data_ptr<T>() + (1 * (save ? Tn : 1) + ts) * G;
      T* m_ih = means.data_ptr<T>();
      T* m_hh = m_ih + G;
      const int64_t nchunks = (H + VS - 1) / VS;
      at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t kc = k0; kc < k1; ++kc) {
          const int64_t j = kc * VS;
          const int64_t n = std::min(VS, H - j);
          if (!hoisted) {
            for (int64_t bb = 0; bb < Bt; ++bb)
              for (int64_t k = 0; k < K; ++k) project_cols(xrows + bb * I, wt, I, G, k * H + j, n, xi + bb * G);
          }
          for (int64_t k = 0; k < K; ++k) {
            const int64_t q = k * H + j;
            bn_columns(xi + q, G, Bt, n, q, s_ih, m_ih + q, r_ih + q);
            bn_columns(xh + q, G, Bt, n, q, s_hh, m_hh + q, r_hh + q);
          }
          Vec<T> vg[3], vh[3], vb[3], mi[3], ri[3], mh[3], rh[3];
          for (int64_t k = 0; k < K; ++k) {
            const int64_t q = k * H + j;
            vg[k] = ld(gih + q, n);
            vh[k] = ld(ghh + q, n);
            vb[k] = ld(b + q, n);
            mi[k] = ld(m_ih + q, n);
            ri[k] = ld(r_ih + q, n);
            mh[k] = ld(m_hh + q, n);
            rh[k] = ld(r_hh + q, n);
          }
          const Vec<T> vbhn = gru ? ld(bhn + j, n) : Vec<T>(T(0));
          for (int64_t bb = 0; bb < Bt; ++bb) {
            T* xir = xi + bb * G + j;
            const T* xhr = xh + bb * G + j;
            T* xhw = xh_dst + bb * G + j;
            Vec<T> a[3], h[3];
            for (int64_t k = 0; k < K; ++k) {
              a[k] = (ld(xir + k * H, n) - mi[k]) * ri[k];
              h[k] = (ld(xhr + k * H, n) - mh[k]) * rh[k];
              if (save) {  // keep the normalized terms for backward
                st(xir + k * H, a[k], n);
                st(xhw + k * H, h[k], n);
              }
            }
            if (gru) {
              const Vec<T> r = sigmoid(fma(vg[0], a[0], fma(vh[0], h[0], vb[0])));
              const Vec<T> z = sigmoid(fma(vg[1], a[1], fma(vh[1], h[1], vb[1])));
              const Vec<T> hnf = fma(vh[2], h[2], vbhn);
              const Vec<T> nn = tanh_(fma(r, hnf, fma(vg[2], a[2], vb[2])));
              st(hout + bb * H + j, fma(z, ld(hp + bb * H + j, n) - nn, nn), n);
            } else {
              st(hout + bb * H + j, act(fma(vg[0], a[0], fma(vh[0], h[0], vb[0])), relu), n);
            }
          }
        }
      });
    }

    // Sequences whose last step is t: rows [bs[t+1], bs[t]).
    const int64_t nb = sh.next_bs(t);
    if (nb < Bt) std::copy(hout + nb * H, hout + Bt * H, hn_p + nb * H);
  }

  if (!save) return {out, hn};
  return {out, hn, XI, XH, stats};
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

template <typename T>
std::vector<Tensor> backward_impl(const c10::optional<Tensor>& d_out_t, const c10::optional<Tensor>& d_hn_t, const Tensor& x,
                                  const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias,
                                  const c10::optional<Tensor>& b_hn_t, const c10::optional<Tensor>& g_ih_t,
                                  const c10::optional<Tensor>& g_hh_t, const Tensor& out, const Tensor& XI, const Tensor& XH,
                                  const Tensor& stats, const Shape& sh, int64_t cell, int64_t mode, bool training, bool need_dx,
                                  int64_t chunk_rows, const c10::optional<Tensor>& w_hh_packed) {
  constexpr int64_t VS = Vec<T>::size();
  const int64_t H = sh.H, G = sh.G, N = sh.N, B0 = sh.B0, Tn = sh.T;
  const bool gru = cell == kGRU, relu = cell == kRelu;
  const int64_t S = gru ? 2 * H : G;
  auto opts = x.options();

  std::vector<T> zeros_g(G, T(0)), ones_g(G, T(1));
  const T* b = ptr_or<T>(bias, zeros_g.data());
  const T* bhn = ptr_or<T>(b_hn_t, zeros_g.data());
  const T* gih = ptr_or<T>(g_ih_t, ones_g.data());
  const T* ghh = ptr_or<T>(g_hh_t, ones_g.data());
  const T* d_out = ptr_or<T>(d_out_t, static_cast<const T*>(nullptr));

  // dh_rec rows [0, bs[t]) hold dL/dh_t while step t runs; afterwards (GEMM) dL/dh_{t-1}.
  Tensor dh_rec = has(d_hn_t) ? d_hn_t->clone() : at::zeros({B0, H}, opts);
  T* dhr_p = dh_rec.data_ptr<T>();

  const T* xi_all = XI.data_ptr<T>();
  const T* xh_all = XH.data_ptr<T>();
  const T* out_p = out.data_ptr<T>();
  const T* h0_p = h0.data_ptr<T>();
  const T* st_p = stats.data_ptr<T>();

  // Parameter-gradient accumulators: per thread for layer mode (row-parallel), shared (column-exclusive)
  // for batch mode. Layout per slot: db (G), dg_ih (G), dg_hh (G), d(a_h) sums (G; the GRU's n block
  // is db_hn).
  const int64_t nthreads = max_threads();
  const int64_t PW = 4 * G;
  const int64_t nslots = mode == kBatch ? 1 : nthreads;
  std::vector<T> partial(nslots * PW, T(0));

  // Chunks of consecutive steps for the weight-gradient GEMMs.
  const int64_t rmax = std::max<int64_t>(chunk_rows, B0);
  std::vector<std::pair<int64_t, int64_t>> chunks;
  for (int64_t t1 = Tn - 1; t1 >= 0;) {
    int64_t t0 = t1;
    while (t0 > 0 && sh.off[t1 + 1] - sh.off[t0 - 1] <= rmax) --t0;
    chunks.emplace_back(t0, t1);
    t1 = t0 - 1;
  }
  int64_t cap = 0;
  for (auto& c : chunks) cap = std::max(cap, sh.off[c.second + 1] - sh.off[c.first]);
  Tensor DGH = at::empty({cap, G}, opts);  // dL/d(W_hh h_{t-1}) of the chunk's rows
  Tensor DGI = at::empty({cap, G}, opts);  // dL/d(W_ih x_t)
  Tensor Hprev = at::empty({cap, H}, opts);
  T* dgh_p = DGH.data_ptr<T>();
  T* dgi_p = DGI.data_ptr<T>();

  Tensor dW_ih = at::zeros_like(w_ih);
  Tensor dW_hh = at::zeros_like(w_hh);
  Tensor dx = need_dx ? at::empty_like(x) : Tensor();

  for (const auto& chunk : chunks) {
    const int64_t t0 = chunk.first, t1 = chunk.second;
    const int64_t cbase = sh.off[t0];
    for (int64_t t = t1; t >= t0; --t) {
      const int64_t Bt = sh.bs[t], o0 = sh.off[t];
      const T* xi = xi_all + o0 * G;
      const T* xh = xh_all + o0 * G;
      const T* hc = out_p + o0 * H;
      const T* hp = t == 0 ? h0_p : out_p + sh.off[t - 1] * H;
      const T* dout = d_out ? d_out + o0 * H : nullptr;
      T* dgi = dgi_p + (o0 - cbase) * G;
      T* dgh = dgh_p + (o0 - cbase) * G;

      if (mode == kLayer) {
        at::parallel_for(0, Bt, 8, [&](int64_t b0, int64_t b1) {
          const int64_t tid = at::get_thread_num();
          T* pdb = partial.data() + tid * PW;
          T* pdgi = pdb + G;
          T* pdgh = pdgi + G;
          T* pdbh = pdgh + G;
          const Vec<T> one(T(1));
          // Rows go in groups: per row, the gate gradients dA_i, dA_h (before the gains; parked in the
          // DGI/DGH rows; the GRU's rz blocks of dA_h equal dA_i and are not written) and the row sums
          // of the layer-norm backward; then, column by column over the group, the parameter-gradient
          // sums and the layer-norm backward (-> DGI, DGH rows).
          constexpr int64_t RB = 8;
          T rsum[8 * RB], rstd[4 * RB];
          for (int64_t g0 = b0; g0 < b1; g0 += RB) {
            const int64_t g1 = std::min(b1, g0 + RB);
            for (int64_t bb = g0; bb < g1; ++bb) {
              const int64_t r = o0 + bb;
              const T* xir = xi + bb * G;
              const T* xhr = xh + bb * G;
              const T* doutr = dout ? dout + bb * H : nullptr;
              T* dhr = dhr_p + bb * H;
              T* dgir = dgi + bb * G;
              T* dghr = dgh + bb * G;
              Vec<T> sia1(T(0)), sia2(T(0)), sib1(T(0)), sib2(T(0)), sha1(T(0)), sha2(T(0)), shb1(T(0)), shb2(T(0));
              if (gru) {
                const T* hpr = hp + bb * H;
                for (int64_t j = 0; j < H; j += VS) {
                  const int64_t n = std::min(VS, H - j);
                  Vec<T> a[3], h[3], gi[3], gh[3];
                  for (int k = 0; k < 3; ++k) {
                    const int64_t q = k * H + j;
                    a[k] = ld(xir + q, n);
                    h[k] = ld(xhr + q, n);
                    gi[k] = ld(gih + q, n);
                    gh[k] = ld(ghh + q, n);
                  }
                  const Vec<T> rg = sigmoid(fma(gi[0], a[0], fma(gh[0], h[0], ld(b + j, n))));
                  const Vec<T> zg = sigmoid(fma(gi[1], a[1], fma(gh[1], h[1], ld(b + H + j, n))));
                  const Vec<T> hnf = fma(gh[2], h[2], ld(bhn + j, n));
                  const Vec<T> ng = tanh_(fma(rg, hnf, fma(gi[2], a[2], ld(b + 2 * H + j, n))));
                  Vec<T> dh = ld(dhr + j, n);
                  if (doutr) dh += ld(doutr + j, n);
                  st(dhr + j, dh * zg, n);  // direct path to h_{t-1}; the GEMM adds the rest
                  const Vec<T> du = lanes(dh * (one - zg) * (one - ng * ng), n);
                  const Vec<T> dpr = du * hnf * rg * (one - rg);
                  const Vec<T> dpz = lanes(dh * (ld(hpr + j, n) - ng) * zg * (one - zg), n);
                  const Vec<T> dahn = du * rg;
                  st(dgir + j, dpr, n);
                  st(dgir + H + j, dpz, n);
                  st(dgir + 2 * H + j, du, n);
                  st(dghr + 2 * H + j, dahn, n);
                  const Vec<T> yi0 = dpr * gi[0], yi1 = dpz * gi[1], yi2 = du * gi[2];
                  const Vec<T> yh0 = dpr * gh[0], yh1 = dpz * gh[1], yh2 = dahn * gh[2];
                  sia1 += yi0 + yi1;
                  sia2 = fma(yi0, a[0], fma(yi1, a[1], sia2));
                  sib1 += yi2;
                  sib2 = fma(yi2, a[2], sib2);
                  sha1 += yh0 + yh1;
                  sha2 = fma(yh0, h[0], fma(yh1, h[1], sha2));
                  shb1 += yh2;
                  shb2 = fma(yh2, h[2], shb2);
                }
              } else {
                const T* hcr = hc + bb * H;
                for (int64_t j = 0; j < H; j += VS) {
                  const int64_t n = std::min(VS, H - j);
                  Vec<T> dh = ld(dhr + j, n);
                  if (doutr) dh += ld(doutr + j, n);
                  const Vec<T> d = lanes(dh * act_grad(ld(hcr + j, n), relu), n);
                  st(dgir + j, d, n);
                  const Vec<T> yi = d * ld(gih + j, n), yh = d * ld(ghh + j, n);
                  sia1 += yi;
                  sia2 = fma(yi, ld(xir + j, n), sia2);
                  sha1 += yh;
                  sha2 = fma(yh, ld(xhr + j, n), sha2);
                }
              }
              const int64_t lr = bb - g0;
              const int64_t rstride = N;
              rsum[8 * lr + 0] = hsum(sia1) / T(S);
              rsum[8 * lr + 1] = hsum(sia2) / T(S);
              rsum[8 * lr + 2] = gru ? hsum(sib1) / T(H) : T(0);
              rsum[8 * lr + 3] = gru ? hsum(sib2) / T(H) : T(0);
              rsum[8 * lr + 4] = hsum(sha1) / T(S);
              rsum[8 * lr + 5] = hsum(sha2) / T(S);
              rsum[8 * lr + 6] = gru ? hsum(shb1) / T(H) : T(0);
              rsum[8 * lr + 7] = gru ? hsum(shb2) / T(H) : T(0);
              for (int k = 0; k < 4; ++k) rstd[4 * lr + k] = st_p[k * rstride + r];
            }
            // Column pass over the group: parameter-gradient sums (in registers across the group's
            // rows) and the backward of the two gate layer norms.
            for (int64_t k = 0; k < sh.K; ++k) {
              const int grp = (gru && k == 2) ? 1 : 0;  // layer-norm group of block k
              const bool own_dah = gru && k == 2;  // dA_h differs from dA_i (the n block)
              for (int64_t j = 0; j < H; j += VS) {
                const int64_t q = k * H + j;
                const int64_t n = std::min(VS, H - j);
                Vec<T> adb = ld(pdb + q, n), adgi = ld(pdgi + q, n), adgh = ld(pdgh + q, n), adbh = ld(pdbh + q, n);
                const Vec<T> vgi = ld(gih + q, n), vgh = ld(ghh + q, n);
                for (int64_t bb = g0; bb < g1; ++bb) {
                  const int64_t lr = bb - g0;
                  T* dgir = dgi + bb * G + q;
                  T* dghr = dgh + bb * G + q;
                  const Vec<T> di = ld(dgir, n), dh = own_dah ? ld(dghr, n) : di;
                  const Vec<T> vxi = ld(xi + bb * G + q, n), vxh = ld(xh + bb * G + q, n);
                  adb += di;
                  adgi = fma(di, vxi, adgi);
                  adgh = fma(dh, vxh, adgh);
                  if (own_dah) adbh += dh;
                  const T* rs = rsum + 8 * lr + 2 * grp;
                  st(dgir, Vec<T>(rstd[4 * lr + grp]) * (di * vgi - Vec<T>(rs[0]) - vxi * Vec<T>(rs[1])), n);
                  st(dghr, Vec<T>(rstd[4 * lr + 2 + grp]) * (dh * vgh - Vec<T>(rs[4]) - vxh * Vec<T>(rs[5])), n);
                }
                st(pdb + q, adb, n);
                st(pdgi + q, adgi, n);
                st(pdgh + q, adgh, n);
                if (own_dah) st(pdbh + q, adbh, n);
              }
            }
          }
        });
      } else {  // kBatch, column-parallel
        const bool batch = training && Bt >= 2;
        const T* r_ih = st_p + (0 * Tn + t) * G;
        const T* r_hh = st_p + (1 * Tn + t) * G;
        T* pdb = partial.data();
        T* pdgi = pdb + G;
        T* pdgh = pdgi + G;
        T* pdbh = pdgh + G;
        const T invn = T(1) / T(Bt);
        const int64_t nchunks = (H + VS - 1) / VS;
        at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
          const Vec<T> one(T(1));
          for (int64_t kc = k0; kc < k1; ++kc) {
            const int64_t j = kc * VS;
            const int64_t n = std::min(VS, H - j);
            Vec<T> vgi[3], vgh[3], vb[3];
            for (int64_t k = 0; k < sh.K; ++k) {
              vgi[k] = ld(gih + k * H + j, n);
              vgh[k] = ld(ghh + k * H + j, n);
              vb[k] = ld(b + k * H + j, n);
            }
            // P1: sums of dA_i; Pi, Ph: of dA_i * a_i, dA_h * a_h; Pbh: of the GRU's dA_h,n.
            Vec<T> P1[3], Pi[3], Ph[3], Pbh(T(0));
            for (int k = 0; k < 3; ++k) P1[k] = Pi[k] = Ph[k] = Vec<T>(T(0));
            if (gru) {
              const Vec<T> vbhn = ld(bhn + j, n);
              for (int64_t bb = 0; bb < Bt; ++bb) {  // pass A: gate gradients
                const T* xir = xi + bb * G + j;
                const T* xhr = xh + bb * G + j;
                Vec<T> a[3], h[3];
                for (int k = 0; k < 3; ++k) {
                  a[k] = ld(xir + k * H, n);
                  h[k] = ld(xhr + k * H, n);
                }
                const Vec<T> rg = sigmoid(fma(vgi[0], a[0], fma(vgh[0], h[0], vb[0])));
                const Vec<T> zg = sigmoid(fma(vgi[1], a[1], fma(vgh[1], h[1], vb[1])));
                const Vec<T> hnf = fma(vgh[2], h[2], vbhn);
                const Vec<T> ng = tanh_(fma(rg, hnf, fma(vgi[2], a[2], vb[2])));
                T* dhr = dhr_p + bb * H + j;
                Vec<T> dh = ld(dhr, n);
                if (dout) dh += ld(dout + bb * H + j, n);
                st(dhr, dh * zg, n);
                const Vec<T> du = lanes(dh * (one - zg) * (one - ng * ng), n);
                const Vec<T> dp[3] = {du * hnf * rg * (one - rg), lanes(dh * (ld(hp + bb * H + j, n) - ng) * zg * (one - zg), n), du};
                const Vec<T> dahn = du * rg;
                T* dgir = dgi + bb * G + j;
                for (int k = 0; k < 3; ++k) {
                  st(dgir + k * H, dp[k], n);
                  P1[k] += dp[k];
                  Pi[k] = fma(dp[k], a[k], Pi[k]);
                }
                st(dgh + bb * G + 2 * H + j, dahn, n);
                Ph[0] = fma(dp[0], h[0], Ph[0]);
                Ph[1] = fma(dp[1], h[1], Ph[1]);
                Ph[2] = fma(dahn, h[2], Ph[2]);
                Pbh += dahn;
              }
            } else {
              for (int64_t bb = 0; bb < Bt; ++bb) {  // pass A: gate gradients
                Vec<T> dh = ld(dhr_p + bb * H + j, n);
                if (dout) dh += ld(dout + bb * H + j, n);
                const Vec<T> d = lanes(dh * act_grad(ld(hc + bb * H + j, n), relu), n);
                st(dgi + bb * G + j, d, n);
                P1[0] += d;
                Pi[0] = fma(d, ld(xi + bb * G + j, n), Pi[0]);
                Ph[0] = fma(d, ld(xh + bb * G + j, n), Ph[0]);
              }
            }
            for (int64_t k = 0; k < sh.K; ++k) {
              const int64_t q = k * H + j;
              st(pdb + q, ld(pdb + q, n) + P1[k], n);
              st(pdgi + q, ld(pdgi + q, n) + Pi[k], n);
              st(pdgh + q, ld(pdgh + q, n) + Ph[k], n);
            }
            if (gru) st(pdbh + 2 * H + j, ld(pdbh + 2 * H + j, n) + Pbh, n);
            // Pass C: through the two gate batch norms (population statistics: a fixed scale).
            Vec<T> si[3], sgh[3], mi[3], mih[3], mh[3], mhh[3];
            for (int64_t k = 0; k < sh.K; ++k) {
              const int64_t q = k * H + j;
              si[k] = ld(r_ih + q, n) * vgi[k];
              sgh[k] = ld(r_hh + q, n) * vgh[k];
              mi[k] = P1[k] * Vec<T>(invn);
              mih[k] = Pi[k] * Vec<T>(invn);
              mh[k] = ((gru && k == 2) ? Pbh : P1[k]) * Vec<T>(invn);
              mhh[k] = Ph[k] * Vec<T>(invn);
            }
            for (int64_t bb = 0; bb < Bt; ++bb) {
              const T* xir = xi + bb * G + j;
              const T* xhr = xh + bb * G + j;
              T* dgir = dgi + bb * G + j;
              T* dghr = dgh + bb * G + j;
              for (int64_t k = 0; k < sh.K; ++k) {
                const Vec<T> di = ld(dgir + k * H, n);
                const Vec<T> dh = (gru && k == 2) ? ld(dghr + k * H, n) : di;
                if (batch) {
                  st(dgir + k * H, si[k] * (di - mi[k] - ld(xir + k * H, n) * mih[k]), n);
                  st(dghr + k * H, sgh[k] * (dh - mh[k] - ld(xhr + k * H, n) * mhh[k]), n);
                } else {
                  st(dgir + k * H, si[k] * di, n);
                  st(dghr + k * H, sgh[k] * dh, n);
                }
              }
            }
          }
        });
      }

      // dh_{t-1} for the rows valid at t: the GRU adds to the direct term the pass left there.
      Tensor dst = dh_rec.narrow(0, 0, Bt);
      Tensor dg = DGH.narrow(0, o0 - cbase, Bt);
      if (use_packed(w_hh_packed)) {
        Tensor res = dnn_linear(dg, *w_hh_packed);
        if (gru) {
          dst.add_(res);
        } else {
          dst.copy_(res);
        }
      } else if (gru) {
        dst.addmm_(dg, w_hh);
      } else {
        at::mm_out(dst, dg, w_hh);
      }
    }

    // Weight and input gradients of the chunk.
    const int64_t R = sh.off[t1 + 1] - cbase;
    bool contiguous = t0 > 0;
    for (int64_t t = t0; contiguous && t <= t1; ++t) contiguous = sh.bs[t] == sh.bs[t0 - 1];
    Tensor hpm;
    if (contiguous) {
      hpm = out.narrow(0, sh.off[t0 - 1], R);
    } else {
      for (int64_t t = t0; t <= t1; ++t) {
        Tensor src = t == 0 ? h0.narrow(0, 0, sh.bs[0]) : out.narrow(0, sh.off[t - 1], sh.bs[t]);
        Hprev.narrow(0, sh.off[t] - cbase, sh.bs[t]).copy_(src);
      }
      hpm = Hprev.narrow(0, 0, R);
    }
    dW_hh.addmm_(DGH.narrow(0, 0, R).t(), hpm);
    Tensor dgi_c = DGI.narrow(0, 0, R);
    dW_ih.addmm_(dgi_c.t(), x.narrow(0, cbase, R));
    if (need_dx) {
      Tensor dst = dx.narrow(0, cbase, R);
      at::mm_out(dst, dgi_c, w_ih);
    }
  }

  // Reduce the per-thread accumulators.
  std::vector<T> acc(PW, T(0));
  for (int64_t s = 0; s < nslots; ++s)
    for (int64_t q = 0; q < PW; ++q) acc[q] += partial[s * PW + q];
  auto vec_tensor = [&](int64_t start, int64_t len) {
    Tensor r = at::empty({len}, opts);
    std::copy(acc.begin() + start, acc.begin() + start + len, r.data_ptr<T>());
    return r;
  };
  Tensor db = vec_tensor(0, G);
  Tensor dg_ih = vec_tensor(G, G);
  Tensor dg_hh = vec_tensor(2 * G, G);
  Tensor db_hn = gru ? vec_tensor(3 * G + 2 * H, H) : Tensor();
  return {dx, dh_rec, dW_ih, dW_hh, db, db_hn, dg_ih, dg_hh};
}

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------

int64_t check_common(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, int64_t cell, int64_t mode) {
  TORCH_CHECK(mode == kLayer || mode == kBatch, "fused GRU/RNN: unknown mode ", mode);
  TORCH_CHECK(cell == kGRU || cell == kTanh || cell == kRelu, "fused GRU/RNN: unknown cell ", cell);
  TORCH_CHECK(x.device().is_cpu(), "fused GRU/RNN: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fused GRU/RNN: float32 or float64 only");
  for (const Tensor* t : {&x, &h0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type(), "fused GRU/RNN: expected contiguous tensors of one dtype");
  }
  const int64_t K = cell == kGRU ? 3 : 1;
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(1) == x.size(1) && w_hh.size(0) == K * w_hh.size(1) &&
                  w_ih.size(0) == w_hh.size(0),
              "fused GRU/RNN: bad shapes");
  return K;
}

void check_vec(const c10::optional<Tensor>& t, const Tensor& x, int64_t len, const char* what) {
  if (!has(t)) return;
  TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->numel() == len, "fused GRU/RNN: bad ", what);
}

std::vector<Tensor> forward(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias,
                            const c10::optional<Tensor>& b_hn, const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh,
                            std::vector<int64_t> batch_sizes, int64_t cell, int64_t mode, std::vector<double> eps, bool training,
                            bool save, int64_t step_offset, std::vector<c10::optional<Tensor>> bn_buffers,
                            std::vector<double> momentum, int64_t inproj_max, int64_t inproj_rows,
                            const c10::optional<Tensor>& w_hh_packed) {
  const int64_t K = check_common(x, h0, w_ih, w_hh, cell, mode);
  Shape sh(batch_sizes, w_hh.size(1), x.size(1), K);
  TORCH_CHECK(x.size(0) == sh.N && h0.dim() == 2 && h0.size(0) == sh.B0 && h0.size(1) == sh.H, "fused GRU/RNN: rows do not match batch_sizes");
  TORCH_CHECK(eps.size() == 2 && momentum.size() == 2 && bn_buffers.size() == 6, "fused GRU/RNN: bad norm arguments");
  check_vec(bias, x, sh.G, "bias");
  check_vec(b_hn, x, sh.H, "b_hn");
  check_vec(g_ih, x, sh.G, "g_ih");
  check_vec(g_hh, x, sh.G, "g_hh");
  if (mode == kBatch) {
    for (int s = 0; s < 2; ++s) {
      const auto &rm = bn_buffers[3 * s], &rv = bn_buffers[3 * s + 1], &nbt = bn_buffers[3 * s + 2];
      TORCH_CHECK(has(rm) && has(rv) && has(nbt) && rm->is_contiguous() && rv->is_contiguous() && nbt->is_contiguous() &&
                      rm->scalar_type() == x.scalar_type() && rv->scalar_type() == x.scalar_type() && nbt->scalar_type() == at::kLong &&
                      rm->dim() == 2 && rm->size(1) == sh.G && rv->sizes() == rm->sizes() && nbt->numel() == rm->size(0),
                  "fused GRU/RNN: batch mode needs running statistics of shape (S, G)");
    }
  }
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_gru_rnn_forward", [&] {
    res = forward_impl<scalar_t>(x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, sh, cell, mode, eps, training, save, step_offset, bn_buffers,
                                 momentum, inproj_max, inproj_rows, w_hh_packed);
  });
  return res;
}

std::vector<Tensor> backward(const c10::optional<Tensor>& d_out, const c10::optional<Tensor>& d_hn, const Tensor& x, const Tensor& h0,
                             const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& b_hn,
                             const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh, const Tensor& out, const Tensor& XI,
                             const Tensor& XH, const Tensor& stats, std::vector<int64_t> batch_sizes, int64_t cell, int64_t mode,
                             bool training, bool need_dx, int64_t chunk_rows, const c10::optional<Tensor>& w_hh_packed) {
  const int64_t K = check_common(x, h0, w_ih, w_hh, cell, mode);
  Shape sh(batch_sizes, w_hh.size(1), x.size(1), K);
  for (const c10::optional<Tensor>* g : {&d_out, &d_hn}) {
    TORCH_CHECK(!has(*g) || ((*g)->is_contiguous() && (*g)->scalar_type() == x.scalar_type()), "fused GRU/RNN: bad gradient");
  }
  TORCH_CHECK(out.size(0) == sh.N && XI.size(0) == sh.N && XH.size(0) == sh.N, "fused GRU/RNN: saved tensors do not match batch_sizes");
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_gru_rnn_backward", [&] {
    res = backward_impl<scalar_t>(d_out, d_hn, x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, out, XI, XH, stats, sh, cell, mode, training,
                                  need_dx, chunk_rows, w_hh_packed);
  });
  return res;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recnorm fused CPU GRU / RNN time loop (forward and BPTT backward)";
  m.def("forward", &forward, "fused GRU/RNN direction forward");
  m.def("backward", &backward, "fused GRU/RNN direction backward");
  m.def("onednn_available", &dnn_linear_available, "whether mkldnn::_linear_pointwise can be called");
  m.attr("VERSION") = 1;
}
