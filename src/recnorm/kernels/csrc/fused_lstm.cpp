// Fused CPU time loop of one LSTM direction with layer or recurrent batch normalization.
//
// The Python side (recnorm/kernels/fused.py) registers `forward` and `backward` as the torch.library
// operators recnorm::fused_lstm and recnorm::fused_lstm_backward; recnorm/kernels/reference.py is the
// oracle this file must agree with (outputs, final states, gradients, batch moments).
//
// Layout: packed rows. Step t owns rows [off[t], off[t] + bs[t]) of x, out and every saved (N, .)
// buffer; bs is non-increasing, so the rows valid at step t are the first bs[t] rows of step t - 1.
//
// Per step the forward does one GEMM (h_{t-1} W_hh^T; MKL, or oneDNN with a prepacked weight where the
// Python side finds it faster) and one fused pass over the step's rows: statistics and normalization
// of the input term (projected by a GEMM over a chunk of steps just before, or in the pass for narrow
// inputs) and of the recurrent term, gates, cell update, cell normalization and output. LN and mode
// none run row-parallel; BN runs column-parallel (every hidden unit is independent), except in eval
// without autograd, where the population statistics fold into per-step coefficients (row-parallel).
// The backward (BPTT) recomputes the activations from the saved normalized terms, does one fused pass
// and one GEMM (dh_{t-1} = dG_hh W_hh) per step, and the weight gradients as a few large GEMMs over
// chunks of consecutive steps. Large buffers come from a small caching pool (see BufferPool).
//
// The loop is fused_loop.h's skeleton; LstmForward and LstmBackward below implement its phases, with the
// statistic family a template argument (chosen once, at the entry point), so the passes of one family
// compile without the others' branches. The passes depend on the family's axis (family.h); its
// statistics come from the family's header (family_none.h, family_row.h, family_batch.h).
//
// Statistic families (all three sites use the same one; `center` per site picks LN/BN or RMS):
//   none (Axis::kNone):   pre = W_ih x + W_hh h + b
//   row (Axis::kRow):     pre = g_ih * N(W_ih x) + g_hh * N(W_hh h) + b, h = o * tanh(g_c * N(c) + beta_c),
//                         N the layer norm (centred) or RMSNorm of each row
//   step (Axis::kBatch):  the same with per-step batch statistics over the valid rows (population
//                         statistics in eval mode and for steps with fewer than 2 valid rows); the batch
//                         moments go to the `moments` output, and the Python side updates the running
//                         statistics from them.
// In both normalized modes a feature (BN: a column over the batch; LN: a row) whose values are all
// equal normalizes to exactly 0 and passes no gradient (recnorm.nn.stats.degenerate_features); this
// is stored as rstd = 0.

#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdlib>
#include <ctime>
#include <map>
#include <mutex>
#include <vector>

#include "fused_common.h"  // vector helpers, exp/sigmoid/tanh, Shape, GEMMs
#include "fused_loop.h"    // the time loop, and the statistic families with their dispatch (families.h)
#include "running_stats.h"  // the running-statistics update of recurrent batch norm

namespace {

// Development timers (built only with -DRECNORM_FUSED_TIMING).
#ifdef RECNORM_FUSED_TIMING
double g_timers[8] = {0};
inline double timer_now() {  // thread CPU time: robust to other load when run with one thread
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
#define TIC(i) const double tic_##i = timer_now()
#define TOC(i) g_timers[i] += timer_now() - tic_##i
#else
#define TIC(i) (void)0
#define TOC(i) (void)0
#endif

// sigmoid and tanh with the fast reciprocal (fused_common.h).
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) { return sigmoid_v<true>(x); }
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) { return tanh_v<true>(x); }

// ------------------------------------------------------------------------------------------------
// Buffer pool. The large per-call buffers ((N, 4H) and (N, H) tensors) would otherwise come fresh from
// the OS on every call (glibc serves big blocks with mmap), and first-touch page faults cost about as
// much as the pass that fills them. Freed buffers are kept here, up to `capacity` bytes, for the next
// call, as PyTorch's CUDA caching allocator does. set_pool_capacity(0) disables and empties it. Only
// buffers internal to the kernel are pooled; tensors handed back to the caller (outputs, states,
// gradients) are ordinary torch allocations.
// ------------------------------------------------------------------------------------------------

class BufferPool {
 public:
  void* get(size_t bytes, size_t& got) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        void* p = it->second;
        got = it->first;
        cached_ -= got;
        free_.erase(it);
        return p;
      }
    }
    got = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, got);
    TORCH_CHECK(p != nullptr, "fused LSTM: out of memory allocating ", got, " bytes");
    return p;
  }
  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= capacity_) {
        free_.emplace(bytes, p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }
  void set_capacity(size_t bytes) {
    std::multimap<size_t, void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      capacity_ = bytes;
      while (cached_ > capacity_ && !free_.empty()) {
        auto it = std::prev(free_.end());
        cached_ -= it->first;
        drop.emplace(it->first, it->second);
        free_.erase(it);
      }
    }
    for (auto& kv : drop) std::free(kv.second);
  }
  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
  size_t capacity_ = size_t(1) << 30;
};

BufferPool& pool() {
  static BufferPool* p = new BufferPool();  // never destroyed: tensors may be freed at interpreter exit
  return *p;
}

// An uninitialized tensor whose memory comes from (and returns to) the pool.
Tensor pool_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t bytes = std::max<size_t>(1, size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype())));
  if (bytes < (size_t(1) << 20)) return at::empty(sizes, opts);  // small: the default allocator does fine
  size_t got = 0;
  void* ptr = pool().get(bytes, got);
  return at::from_blob(ptr, sizes, [got](void* q) { pool().put(q, got); }, opts);
}

void set_pool_capacity(int64_t bytes) { pool().set_capacity(size_t(std::max<int64_t>(0, bytes))); }
int64_t pool_cached() { return int64_t(pool().cached()); }

// ------------------------------------------------------------------------------------------------
// Variants: a joint gate norm, a carried normalized cell, zoneout (recnorm/kernels/contract.py)
// ------------------------------------------------------------------------------------------------

// What the variants change, read by forward and backward:
//   joint: one norm (the "ih" site's gain, centring and eps) over W_ih x + W_hh h; the kernels add the
//          recurrent term into the input term's row before its statistics and give the recurrent
//          term rstd 0, so it contributes nothing, and backward sends the joint term's gradient to both
//          GEMMs (row family only);
//   carry: the cell norm's output, not c~, is the state carried to the next step (row family only);
//   zone_h, zone_c: zoneout keep indicators d ((N, H) uint8 bytes in training, or (1, H) holding the
//          rate in eval; fused_common.h's ZoneRows):
//          s_t = s~_t + d_t (s_{t-1} - s~_t), applied after each step's pass. The carried cell differs
//          from c~ when carry or zone_c: it then lives in a buffer of its own (CS, the second half of C).
struct Variant {
  bool joint = false, carry = false;
  ZoneRows zh, zc;  // keep indicators of h and c
  bool cell_state() const { return carry || bool(zc); }  // whether the carried cell differs from c~

  Variant(bool joint_, bool carry_, const c10::optional<Tensor>& zone_h, const c10::optional<Tensor>& zone_c, const Tensor& x,
          int64_t H)
      : joint(joint_), carry(carry_), zh(zone_h, x, H, "fused LSTM"), zc(zone_c, x, H, "fused LSTM") {}
  template <typename T>
  ZoneRow<T> zone_h(int64_t row) const { return zh.at<T>(row); }
  template <typename T>
  ZoneRow<T> zone_c(int64_t row) const { return zc.at<T>(row); }
};

// The optional per-feature vectors of forward and backward, absent ones read as their identity: the bias
// and the cell norm's shift as 0, the gains as 1. Not copyable (the pointers may point into it).
template <typename T>
struct LstmVectors {
  std::vector<T> zeros_g, ones_g, zeros_h, ones_h;
  const T *b, *gih, *ghh, *gc, *betac;
  LstmVectors(int64_t G, int64_t H, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& g_ih,
              const c10::optional<Tensor>& g_hh, const c10::optional<Tensor>& g_c, const c10::optional<Tensor>& beta_c)
      : zeros_g(G, T(0)),
        ones_g(G, T(1)),
        zeros_h(H, T(0)),
        ones_h(H, T(1)),
        b(ptr_or<T>(bias, zeros_g.data())),
        gih(ptr_or<T>(g_ih, ones_g.data())),
        ghh(ptr_or<T>(g_hh, ones_g.data())),
        gc(ptr_or<T>(g_c, ones_h.data())),
        betac(ptr_or<T>(beta_c, zeros_h.data())) {}
  LstmVectors(const LstmVectors&) = delete;
  LstmVectors& operator=(const LstmVectors&) = delete;
};

// The operator's arguments, as forward and backward pass them on to their kernel classes.
struct LstmArgs {
  const Tensor &x, &h0, &c0, &w_ih, &w_hh;
  const c10::optional<Tensor> &bias, &g_ih, &g_hh, &g_c, &beta_c;
  const c10::optional<Tensor>& w_hh_packed;
  const std::vector<int64_t>& center;
  bool training;  // batch statistics (the operator's batch_stats)
};

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// One forward call, with the statistic family F (families.h) fixed at compile time (the phases: fused_loop.h).
template <typename T, class F>
class LstmForward {
 public:
  static_assert(family_check<F, T>());
  static constexpr bool kPlain = F::kAxis == Axis::kNone;  // no norm: pre = W_ih x + W_hh h + b
  static constexpr bool kRow = F::kAxis == Axis::kRow;     // row statistics (layer norm, RMSNorm): row-parallel
  static constexpr bool kStep = F::kAxis == Axis::kBatch;  // per-step batch statistics: column-parallel (or folded)
  static constexpr int64_t VS = Vec<T>::size();

  LstmForward(const LstmArgs& a, const Shape& shape, const std::vector<double>& eps, bool save_, int64_t step_offset_,
              const std::vector<c10::optional<Tensor>>& pop, int64_t inproj_max, int64_t inproj_rows_,
              const c10::optional<Tensor>& w_ih_packed_, const Variant& var_)
      : x(a.x), h0(a.h0), w_hh_packed(a.w_hh_packed), w_ih_packed(w_ih_packed_), sh(shape), var(var_),
        H(sh.H), G(sh.G), N(sh.N), B0(sh.B0), Tn(sh.T), I(sh.I), opts(x.options()),
        v(G, H, a.bias, a.g_ih, a.g_hh, a.g_c, a.beta_c), b(v.b), gih(v.gih), ghh(v.ghh), gc(v.gc), betac(v.betac),
        eps_ih(T(eps[0])), eps_hh(T(eps[1])), eps_c(T(eps[2])),
        cen_ih(a.center[0] != 0), cen_hh(a.center[1] != 0), cen_c(a.center[2] != 0),
        var_joint(var.joint), var_carry(var.carry), training(a.training), save(save_), step_offset(step_offset_),
        inproj_rows(inproj_rows_), hoisted(I > inproj_max), dnn_in(hoisted && use_packed(w_ih_packed)),
        folded(kStep && !training && !save) {
    TORCH_CHECK(!(var_joint || var_carry) || kRow, "fused LSTM: a joint gate norm and a carried cell need row statistics, not ",
                F::kName);
    // Batch moments of the steps that use batch statistics: (2, T, 2G + H) means and variances of the
    // input term, the recurrent term and the cell, per step (rows of other steps stay 0).
    moments = kStep && training ? at::zeros({2, Tn, 2 * G + H}, opts) : at::empty({0}, opts);
    if constexpr (kStep) {
      for (auto& p : pop) TORCH_CHECK(has(p) && p->is_contiguous(), "fused LSTM: batch statistics need population statistics");
      const int64_t W = 2 * G + H;
      T* mp = training ? moments.data_ptr<T>() : nullptr;
      const int64_t col[3] = {0, G, 2 * G};
      for (int s = 0; s < 3; ++s)
        bn[s].init(*pop[3 * s], *pop[3 * s + 1], *pop[3 * s + 2], a.center[s] != 0, eps[s], mp ? mp + col[s] : nullptr,
                   mp ? mp + Tn * W + col[s] : nullptr, W);
    }
    allocate(a);
  }

  // Step t's row pointers, and the input projection of the chunk of steps that starts at t.
  void project(int64_t t) {
    Bt = sh.bs[t], o0 = sh.off[t];
    step_no = t + step_offset;
    if (hoisted && t >= proj_end) {
      const int64_t t2 = sh.proj_chunk_end(t, inproj_rows);
      const int64_t rows = sh.off[t2] - o0;
      TIC(0);
      gx_chunk = step_gemm<T>(x.narrow(0, o0, rows), WT, MklPacked(), w_ih_packed, dnn_in ? Tensor() : XI.narrow(0, save ? o0 : 0, rows));
      TOC(0);
      chunk_o0 = o0;
      proj_end = t2;
    }
    // Input term: read (raw) from xi, normalized term (or activations, mode none) kept in xi_dst.
    xi = hoisted ? gx_chunk.data_ptr<T>() + (o0 - chunk_o0) * G : (save ? xi_all + o0 * G : xi_all);
    xi_dst = save ? xi_all + o0 * G : xi;
    xh_dst = save ? xh_all + o0 * G : xh_all;  // where the (normalized) recurrent term is kept
    cs = save ? cs_all + o0 * H : cs_all + (t % 2) * B0 * H;  // the carried cell
    cc = cc_all ? cc_all + (t % 2) * B0 * H : cs;  // c~ (the carried cell itself unless it differs)
    cp = t == 0 ? c0_p : (save ? cs_all + sh.off[t - 1] * H : cs_all + ((t - 1) % 2) * B0 * H);
    hout = out_p + o0 * H;
    xrows = x_p + o0 * I;
  }

  // Recurrent GEMM for the rows valid at t (raw term read from xh, normalized term written to xh_dst).
  void recurrent(int64_t t) {
    Tensor hprev = t == 0 ? h0.narrow(0, 0, Bt) : out.narrow(0, sh.off[t - 1], Bt);
    TIC(1);
    gh = step_gemm<T>(hprev, w_hh_t, w_hh_mkl, w_hh_packed, save ? XH.narrow(0, o0, Bt) : XH.narrow(0, 0, Bt));
    TOC(1);
    xh = gh.data_ptr<T>();
  }

  void step(int64_t t) {
    TIC(2);
    if constexpr (kStep) {
      if (folded) {
        fold(t);
        with_tail(H % VS != 0, [&](auto tail) { rows<decltype(tail)::value>(); });
      } else {
        with_tail(H % VS != 0, [&](auto tail) { columns<decltype(tail)::value>(t); });
      }
    } else {
      with_tail(H % VS != 0, [&](auto tail) { rows<decltype(tail)::value>(); });
    }
    TOC(2);
  }

  void finish(int64_t t) {
    if (var.zh || var.zc) {  // zoneout: mix the step's new states with the previous ones
      const T* hp = t == 0 ? h0_p : out_p + sh.off[t - 1] * H;
      at::parallel_for(0, Bt, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t bb = b0; bb < b1; ++bb) {
          if (var.zh) zone_row(hout + bb * H, hout + bb * H, hp + bb * H, var.zone_h<T>(o0 + bb), H);
          if (var.zc) zone_row(cs + bb * H, (var.carry ? cs : cc) + bb * H, cp + bb * H, var.zone_c<T>(o0 + bb), H);
        }
      });
    }
    // Sequences whose last step is t: rows [bs[t+1], bs[t]).
    const int64_t nb = sh.next_bs(t);
    if (nb < Bt) {
      std::copy(hout + nb * H, hout + Bt * H, hn_p + nb * H);
      std::copy(cs + nb * H, cs + Bt * H, cn_p + nb * H);
    }
  }

  std::vector<Tensor> outputs() {
    // Outputs of a registered operator must not alias each other: a fresh empty tensor for each unused one.
    auto none = [&]() { return at::empty({0}, opts); };
    if (!save) return {out, hn, cn, none(), none(), none(), none(), none(), moments};
    if constexpr (kPlain) XH = none();
    return {out, hn, cn, XI, XH, C, stats_g.defined() ? stats_g : none(), stats_h.defined() ? stats_h : none(), moments};
  }

 private:
  // The call's buffers.
  void allocate(const LstmArgs& a) {
    // Input projection W_ih x: GEMMs over chunks of consecutive steps (about inproj_rows rows each),
    // each just before its steps run, so that the pass finds its rows in cache; or, for a narrow input
    // (I <= inproj_max, where a GEMM with a tiny inner dimension is slow), computed row by row inside
    // the step pass from x and W_ih^T.
    int64_t xi_rows = save ? N : B0;
    if (hoisted && !save) xi_rows = sh.proj_chunk_max(inproj_rows);
    if (dnn_in && !save) xi_rows = 0;  // oneDNN returns each chunk's projection in a tensor of its own
    XI = pool_empty({xi_rows, G}, opts);
    // W_ih^T (I, G): the hoisted GEMMs' operand (none with oneDNN's packing), or the rows the pass reads.
    if (!hoisted) WT = transposed<T>(a.w_ih);
    else if (!dnn_in) WT = plain_operand<T>(a.w_ih, sh.T);
    wt = hoisted ? nullptr : WT.data_ptr<T>();
    x_p = x.data_ptr<T>();
    XH = pool_empty({save ? N : B0, G}, opts);  // recurrent term (normalized in place when saved)
    // The carried cells of every step (or of the last two); where they differ from c~ (carry, zone_c), then
    // c~ of the last two steps: backward recomputes c~ = f * c_{t-1} + i * g from the gates, so C keeps one
    // (N, H) cell buffer, as torch.nn does.
    const int64_t c_rows = save ? N : 2 * B0;
    C = pool_empty({c_rows + (var.cell_state() ? 2 * B0 : 0), H}, opts);
    out = at::empty({N, H}, opts);  // returned to the caller: an ordinary (resizable) tensor, not pooled
    hn = at::empty({B0, H}, opts), cn = at::empty({B0, H}, opts);
    O = at::empty({B0, H}, opts);  // output gate of the current step
    // Saved statistics: LN (4, N): rstd_ih, rstd_hh, mean_c, rstd_c per row; BN: (2, T, G) rstd_ih, rstd_hh
    // and (2, T, H) mean_c, rstd_c per step and feature.
    if constexpr (kRow) {
      stats_g = pool_empty({4, save ? N : B0}, opts);
    } else if constexpr (kStep) {
      stats_g = pool_empty({2, save ? Tn : 1, G}, opts);
      stats_h = pool_empty({2, save ? Tn : 1, H}, opts);
      means = at::empty({2, G}, opts);  // this step's batch means of the two gate terms
    }
    xi_all = XI.data_ptr<T>();
    xh_all = XH.data_ptr<T>();
    c_all = C.data_ptr<T>();
    cs_all = c_all;  // the carried cells (c~ itself unless carry or zone_c)
    cc_all = var.cell_state() ? c_all + c_rows * H : nullptr;  // c~ of the last two steps, where it differs
    h0_p = h0.data_ptr<T>();
    out_p = out.data_ptr<T>();
    o_p = O.data_ptr<T>();
    hn_p = hn.data_ptr<T>();
    cn_p = cn.data_ptr<T>();
    c0_p = a.c0.data_ptr<T>();
    w_hh_mkl = step_pack<T>(a.w_hh, true, sh, w_hh_packed, pool_empty);  // W_hh^T packed by MKL, or
    if (!w_hh_mkl) w_hh_t = plain_operand<T>(a.w_hh, sh.T);  // (H, G): a plain GEMM operand (or its view)
    fold_.resize(folded ? 3 * G + 2 * H : 0);
  }

  // Batch norm in eval without autograd: every step uses population statistics, so each norm is an
  // affine map per feature, folded into per-step coefficients; the pass is then row-parallel.
  void fold(int64_t t) {
    const auto s_ih = F::begin_step(bn[0], t, step_no, false);
    const auto s_hh = F::begin_step(bn[1], t, step_no, false);
    const auto s_c = F::begin_step(bn[2], t, step_no, false);
    // The same slots as the previous step's (one slot shared over time, or steps past the last slot): the
    // same coefficients.
    if (s_ih.rm == fold_slots_[0] && s_hh.rm == fold_slots_[1] && s_c.rm == fold_slots_[2]) return;
    fold_slots_[0] = s_ih.rm, fold_slots_[1] = s_hh.rm, fold_slots_[2] = s_c.rm;
    T* f = fold_.data();
    // VS features at a time, with the values the scalar loop gave (which the compiler had contracted to
    // shift = fma(-a, mean, b)): 2G + H scalar square roots and divisions a step (1152 at H = 128) become
    // (2G + H) / VS vector ones.
    for (int64_t q = 0; q < G; q += VS) {
      const int64_t n = std::min(VS, G - q);
      const Vec<T> rmi = ld(s_ih.rm + q, n), rmh = ld(s_hh.rm + q, n);
      const Vec<T> ai = ld(gih + q, n) * F::population_rstd(rmi, ld(s_ih.rv + q, n), s_ih.eps);
      const Vec<T> ah = ld(ghh + q, n) * F::population_rstd(rmh, ld(s_hh.rv + q, n), s_hh.eps);
      st(f + q, ai, n);
      st(f + G + q, ah, n);
      const Vec<T> si = cen_ih ? fma(ai.neg(), rmi, ld(b + q, n)) : ld(b + q, n);
      st(f + 2 * G + q, cen_hh ? fma(ah.neg(), rmh, si) : si, n);
    }
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = std::min(VS, H - j);
      const Vec<T> rmc = ld(s_c.rm + j, n);
      const Vec<T> ac = ld(gc + j, n) * F::population_rstd(rmc, ld(s_c.rv + j, n), s_c.eps);
      st(f + 3 * G + j, ac, n);
      st(f + 3 * G + H + j, cen_c ? fma(ac.neg(), rmc, ld(betac + j, n)) : ld(betac + j, n), n);
    }
  }

  // Row-parallel pass (no norm, row statistics, folded batch norm): each row's gates, cell and output.
  template <bool kTail>
  void rows() {
    T* rs = nullptr;
    if constexpr (kRow) rs = stats_g.data_ptr<T>();
    const int64_t rstride = save ? N : B0;  // stats row stride
    const int64_t rbase = save ? o0 : 0;
    const T* fa_i = fold_.data();  // the folded coefficients (folded batch norm)
    const T *fa_h = fa_i + G, *fb = fa_i + 2 * G, *fa_c = fa_i + 3 * G, *fb_c = fa_i + 3 * G + H;
    at::parallel_for(0, Bt, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t bb = b0; bb < b1; ++bb) {
        T* xir = xi + bb * G;
        T* xiw = xi_dst + bb * G;
        const T* xhr = xh + bb * G;
        T* xhw = xh_dst + bb * G;
        const T* cpr = cp + bb * H;
        T* ccr = cc + bb * H;
        T* orow = o_p + bb * H;
        T* hr = hout + bb * H;
        if (!hoisted) project_row(xrows + bb * I, wt, I, G, xir);
        T mi = 0, ri = 0, mh = 0, rh = 0;
        if constexpr (kRow) {
          if (var_joint) {  // one norm of the sum; the recurrent term then counts 0
            add_row(xir, xhr, G);
            F::group(xir, G, cen_ih, eps_ih, mi, ri);
          } else {
            group_pair<F>(xir, xhr, G, cen_ih, cen_hh, eps_ih, eps_hh, mi, ri, mh, rh);
          }
          rs[0 * rstride + rbase + bb] = ri;
          rs[1 * rstride + rbase + bb] = rh;
        }
        const Vec<T> vmi(mi), vri(ri), vmh(mh), vrh(rh);
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = kTail ? std::min(VS, H - j) : VS;
          if (bb + 1 < b1) {  // the next row's terms, for its statistics' first touch
            for (int k = 0; k < 4; ++k) {
              prefetch(xir + G + k * H + j);
              prefetch(xhr + G + k * H + j);
            }
          }
          Vec<T> pre[4];
          for (int k = 0; k < 4; ++k) {
            const int64_t q = k * H + j;
            if constexpr (kRow) {
              const Vec<T> a = (ld(xir + q, n) - vmi) * vri, h = (ld(xhr + q, n) - vmh) * vrh;
              if (save) {  // keep the normalized terms for backward
                st(xiw + q, a, n);
                st(xhw + q, h, n);
              }
              pre[k] = fma(ld(gih + q, n), a, fma(ld(ghh + q, n), h, ld(b + q, n)));
            } else if constexpr (kStep) {
              pre[k] = fma(ld(fa_i + q, n), ld(xir + q, n), fma(ld(fa_h + q, n), ld(xhr + q, n), ld(fb + q, n)));
            } else {
              pre[k] = ld(xir + q, n) + ld(xhr + q, n) + ld(b + q, n);
            }
          }
          const Vec<T> i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanh_(pre[2]), o = sigmoid(pre[3]);
          const Vec<T> c = fma(f, ld(cpr + j, n), i * g);
          st(ccr + j, c, n);

          if constexpr (kRow) {
            st(orow + j, o, n);
          } else if constexpr (kStep) {
            st(hr + j, o * tanh_(fma(ld(fa_c + j, n), c, ld(fb_c + j, n))), n);
          } else {
            st(hr + j, o * tanh_(c), n);
          }
          if constexpr (kPlain) {
            if (save) {  // keep the activations for backward in place of W_ih x
              st(xiw + j, i, n);
              st(xiw + H + j, f, n);
              st(xiw + 2 * H + j, g, n);
              st(xiw + 3 * H + j, o, n);
            }
          }
        }
        if constexpr (kRow) cell_norm_row<kTail>(bb, rs, rstride, rbase);
      }
    });
  }

  // Row statistics: the cell norm of row bb and its output h = o * tanh(g_c * N(c) + beta_c).
  template <bool kTail>
  void cell_norm_row(int64_t bb, T* rs, int64_t rstride, int64_t rbase) {
    const T* ccr = cc + bb * H;
    T* csr = cs + bb * H;
    const T* orow = o_p + bb * H;
    T* hr = hout + bb * H;
    T mean, rstd;
    F::group(ccr, H, cen_c, eps_c, mean, rstd);
    rs[2 * rstride + rbase + bb] = mean;
    rs[3 * rstride + rbase + bb] = rstd;
    const Vec<T> m(mean), r(rstd);
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = kTail ? std::min(VS, H - j) : VS;
      const Vec<T> cn_ = fma(ld(gc + j, n), (ld(ccr + j, n) - m) * r, ld(betac + j, n));
      st(hr + j, ld(orow + j, n) * tanh_(cn_), n);
      if (var_carry) st(csr + j, cn_, n);
    }
  }

  // Batch statistics: every hidden unit j is independent of the others (column-parallel).
  template <bool kTail>
  void columns(int64_t t) {
    const bool batch = F::batch_step(training, Bt);
    const auto s_ih = F::begin_step(bn[0], t, step_no, batch);
    const auto s_hh = F::begin_step(bn[1], t, step_no, batch);
    const auto s_c = F::begin_step(bn[2], t, step_no, batch);
    const int64_t ts = save ? t : 0;
    T* r_ih = stats_g.data_ptr<T>() + (0 * (save ? Tn : 1) + ts) * G;
    T* r_hh = stats_g.data_ptr<T>() + (1 * (save ? Tn : 1) + ts) * G;
    T* m_c = stats_h.data_ptr<T>() + (0 * (save ? Tn : 1) + ts) * H;
    T* r_c = stats_h.data_ptr<T>() + (1 * (save ? Tn : 1) + ts) * H;
    T* m_ih = means.data_ptr<T>();
    T* m_hh = m_ih + G;
    const int64_t nchunks = (H + VS - 1) / VS;
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t kc = k0; kc < k1; ++kc) {
        const int64_t j = kc * VS;
        const int64_t n = kTail ? std::min(VS, H - j) : VS;
        if (!hoisted) project_gate_cols<4>(xrows, wt, I, G, H, j, n, Bt, xi);
        for (int k = 0; k < 4; ++k) {
          const int64_t q = k * H + j;
          F::columns(xi + q, G, Bt, n, q, s_ih, m_ih + q, r_ih + q);
          F::columns(xh + q, G, Bt, n, q, s_hh, m_hh + q, r_hh + q);
        }
        Vec<T> vg[4], vh[4], vb[4], mi[4], ri[4], mh[4], rh[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t q = k * H + j;
          vg[k] = ld(gih + q, n);
          vh[k] = ld(ghh + q, n);
          vb[k] = ld(b + q, n);
          mi[k] = ld(m_ih + q, n);
          ri[k] = ld(r_ih + q, n);
          mh[k] = ld(m_hh + q, n);
          rh[k] = ld(r_hh + q, n);
        }
        for (int64_t bb = 0; bb < Bt; ++bb) {
          const T* xir = xi + bb * G + j;
          T* xiw = xi_dst + bb * G + j;
          const T* xhr = xh + bb * G + j;
          T* xhw = xh_dst + bb * G + j;
          Vec<T> pre[4];
          for (int k = 0; k < 4; ++k) {
            const Vec<T> a = (ld(xir + k * H, n) - mi[k]) * ri[k], h = (ld(xhr + k * H, n) - mh[k]) * rh[k];
            if (save) {  // keep the normalized terms for backward
              st(xiw + k * H, a, n);
              st(xhw + k * H, h, n);
            }
            pre[k] = fma(vg[k], a, fma(vh[k], h, vb[k]));
          }
          const Vec<T> i = sigmoid(pre[0]), f = sigmoid(pre[1]), g = tanh_(pre[2]), o = sigmoid(pre[3]);
          st(cc + bb * H + j, fma(f, ld(cp + bb * H + j, n), i * g), n);
          st(o_p + bb * H + j, o, n);
        }
        F::columns(cc + j, H, Bt, n, j, s_c, m_c + j, r_c + j);
        const Vec<T> m = ld(m_c + j, n), r = ld(r_c + j, n), gcv = ld(gc + j, n), bcv = ld(betac + j, n);
        for (int64_t bb = 0; bb < Bt; ++bb) {
          const Vec<T> cn_ = fma(gcv, (ld(cc + bb * H + j, n) - m) * r, bcv);
          st(hout + bb * H + j, ld(o_p + bb * H + j, n) * tanh_(cn_), n);
        }
      }
    });
  }

  const Tensor &x, &h0;
  const c10::optional<Tensor>&w_hh_packed, &w_ih_packed;
  const Shape& sh;
  const Variant& var;
  const int64_t H, G, N, B0, Tn, I;
  const at::TensorOptions opts;
  const LstmVectors<T> v;
  const T *b, *gih, *ghh, *gc, *betac;
  const T eps_ih, eps_hh, eps_c;
  const bool cen_ih, cen_hh, cen_c, var_joint, var_carry, training, save;
  const int64_t step_offset, inproj_rows;
  const bool hoisted, dnn_in;  // input projection by GEMM (oneDNN's, dnn_in), not in the pass
  const bool folded;           // batch norm with population statistics only: the folded row pass
  typename SiteOf<F, T>::type bn[3];  // the three sites' population statistics (batch axis)
  Tensor moments, XI, gx_chunk, WT, XH, C, out, hn, cn, O, stats_g, stats_h, means, w_hh_t, gh;
  MklPacked w_hh_mkl;
  int64_t chunk_o0 = 0, proj_end = 0;  // the current projection chunk's first row; steps [.., proj_end) are projected
  const T *wt = nullptr, *x_p = nullptr, *h0_p = nullptr, *c0_p = nullptr;
  T *xi_all = nullptr, *xh_all = nullptr, *c_all = nullptr, *cs_all = nullptr, *cc_all = nullptr;
  T *out_p = nullptr, *o_p = nullptr, *hn_p = nullptr, *cn_p = nullptr;
  std::vector<T> fold_;  // the folded coefficients: a_ih (G), a_hh (G), shift (G), a_c (H), shift_c (H)
  const T* fold_slots_[3] = {nullptr, nullptr, nullptr};  // the population slots fold_ was computed from
  // Step t: rows, input term (raw, and where its normalized form goes), recurrent term, cells, output.
  int64_t Bt = 0, o0 = 0, step_no = 0;
  T *xi = nullptr, *xi_dst = nullptr, *xh_dst = nullptr, *xh = nullptr, *cs = nullptr, *cc = nullptr, *hout = nullptr;
  const T *cp = nullptr, *xrows = nullptr;
};

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// What forward saved for backward, and the gradients backward receives.
struct LstmSaved {
  const c10::optional<Tensor> &d_out, &d_hn, &d_cn;  // gradients of out, h_n, c_n (absent: zero)
  const Tensor &out, &XI;
  const c10::optional<Tensor>& XH;
  const Tensor& C;
  const c10::optional<Tensor> &stats_g, &stats_h;
};

// One backward call, with the statistic family F (families.h) fixed at compile time (the phases: fused_loop.h).
template <typename T, class F>
class LstmBackward {
 public:
  static_assert(family_check<F, T>());
  static constexpr bool kPlain = F::kAxis == Axis::kNone;  // no norm: the saved input term holds the activations
  static constexpr bool kRow = F::kAxis == Axis::kRow;     // row statistics: row-parallel
  static constexpr bool kStep = F::kAxis == Axis::kBatch;  // per-step batch statistics: column-parallel
  static constexpr int64_t VS = Vec<T>::size();

  LstmBackward(const LstmArgs& a, const LstmSaved& s, const Shape& shape, bool need_dx, int64_t chunk_rows, const Variant& var_)
      : x(a.x), h0(a.h0), w_ih(a.w_ih), w_hh(a.w_hh), out(s.out), w_hh_packed(a.w_hh_packed), sh(shape), var(var_),
        H(sh.H), G(sh.G), N(sh.N), B0(sh.B0), Tn(sh.T), opts(x.options()),
        v(G, H, a.bias, a.g_ih, a.g_hh, a.g_c, a.beta_c), b(v.b), gih(v.gih), ghh(v.ghh), gc(v.gc), betac(v.betac),
        d_out(ptr_or<T>(s.d_out, static_cast<const T*>(nullptr))),
        // 1 for a centred norm, 0 for RMS: the backward's mean-of-gradient terms exist only when centred.
        cen_ih(T(a.center[0] != 0)), cen_hh(T(a.center[1] != 0)), cen_c(T(a.center[2] != 0)),
        training(a.training), var_carry(var.carry), recompute_c(var.cell_state()),
        nthreads(max_threads()), PW(3 * G + 2 * H), nslots(kStep ? 1 : nthreads), SW(G + 3 * H) {
    dh_rec = has(s.d_hn) ? s.d_hn->clone() : at::zeros({B0, H}, opts);
    dc_rec = has(s.d_cn) ? s.d_cn->clone() : at::zeros({B0, H}, opts);
    dhr_p = dh_rec.data_ptr<T>();
    dcr_p = dc_rec.data_ptr<T>();
    xi_all = s.XI.data_ptr<T>();
    xh_all = has(s.XH) ? s.XH->data_ptr<T>() : nullptr;
    c_all = s.C.data_ptr<T>();
    cs_all = c_all;  // the carried cells (see forward); recompute_c: c~ was not kept, f * c_{t-1} + i * g
    c0_p = a.c0.data_ptr<T>();
    sg = has(s.stats_g) ? s.stats_g->data_ptr<T>() : nullptr;
    sh_ = has(s.stats_h) ? s.stats_h->data_ptr<T>() : nullptr;
    // Parameter-gradient accumulators: per thread for the row-parallel modes, shared (column-exclusive)
    // for batch mode. Layout per slot: db (G), dg_ih (G), dg_hh (G), dg_c (H), dbeta_c (H).
    partial.assign(nslots * PW, T(0));
    // Per-thread row scratch (none/layer): acts (G), dO, dyc, chat (3H).
    if constexpr (!kStep) scratch.resize(nthreads * SW);
    // Batch mode scratch per step: acts (B0, G), dO/dyc/chat (3, B0, H).
    if constexpr (kStep) {
      bscratch = at::empty({B0 * (G + 3 * H)}, opts);
      bs_p = bscratch.data_ptr<T>();
    }
    // Chunks of consecutive steps for the weight-gradient GEMMs.
    int64_t cap = 0;
    chunks_ = sh.grad_chunks(chunk_rows, cap);
    DGH = pool_empty({cap, G}, opts);
    DGI = kPlain ? DGH : pool_empty({cap, G}, opts);
    Hprev = pool_empty({cap, H}, opts);
    dgh_p = DGH.data_ptr<T>();
    dgi_p = DGI.data_ptr<T>();
    dW = WeightGrads(w_ih, w_hh);
    dx = need_dx ? at::empty(x.sizes(), opts) : Tensor();  // may become x.grad: not pooled
    w_hh_mkl = step_pack<T>(w_hh, false, sh, w_hh_packed, pool_empty);  // dG W_hh's W_hh packed by MKL
  }

  const std::vector<std::pair<int64_t, int64_t>>& chunks() const { return chunks_; }

  // The fused pass of step t: dL/dh_t, dL/dc_t -> dpre (DGI, DGH rows), dL/dc_{t-1}, parameter sums.
  void step(int64_t t, int64_t cbase) {
    Bt = sh.bs[t], o0 = sh.off[t];
    xi = xi_all + o0 * G;
    xh = xh_all ? xh_all + o0 * G : nullptr;
    cc = recompute_c ? nullptr : c_all + o0 * H;  // c~ where it was kept
    cp = t == 0 ? c0_p : cs_all + sh.off[t - 1] * H;
    dout = d_out ? d_out + o0 * H : nullptr;
    dgi = dgi_p + (o0 - cbase) * G;
    dgh = dgh_p + (o0 - cbase) * G;
    TIC(3);
    with_tail(H % VS != 0, [&](auto tail) {
      if constexpr (kStep) {
        columns<decltype(tail)::value>(t);
      } else {
        rows<decltype(tail)::value>();
      }
    });
    TOC(3);
  }

  // dh_{t-1} for the rows valid at t (with a joint gate norm, the recurrent term's gradient is the
  // joint term's, in DGI); with zoneout of h, added to the part the pass left there.
  void recurrent(int64_t t, int64_t cbase) {
    Tensor dst = dh_rec.narrow(0, 0, Bt);
    const Tensor& dg_rec = var.joint ? DGI : DGH;
    TIC(4);
    step_gemm_into<T>(dst, dg_rec.narrow(0, o0 - cbase, Bt), w_hh, w_hh_mkl, w_hh_packed, bool(var.zh));
    TOC(4);
  }

  void weight_grads(int64_t t0, int64_t t1) {
    TIC(5);
    chunk_weight_grads(sh, t0, t1, x, h0, out, w_ih, var.joint ? DGI : DGH, DGI, Hprev, dW, dx);
    TOC(5);
  }

  std::vector<Tensor> gradients() {
    // Reduce the per-thread accumulators.
    const std::vector<T> acc = reduce_slots(partial, nslots, PW);
    Tensor db = vec_tensor(acc, 0, G, opts);
    Tensor dg_ih, dg_hh, dg_c, dbeta_c;
    if constexpr (!kPlain) {
      dg_ih = vec_tensor(acc, G, G, opts);
      dg_hh = vec_tensor(acc, 2 * G, G, opts);
      dg_c = vec_tensor(acc, 3 * G, H, opts);
      dbeta_c = vec_tensor(acc, 3 * G + H, H, opts);
    }
    const auto [dW_ih, dW_hh] = dW.result<T>();
    return {dx, dh_rec, dc_rec, dW_ih, dW_hh, db, dg_ih, dg_hh, dg_c, dbeta_c};
  }

 private:
  // A thread's accumulators (db, dg_ih, dg_hh, dg_c, dbeta_c) and row scratch (acts, dO, dyc, chat).
  struct Slot {
    T *pdb, *pdgi, *pdgh, *pdgc, *pdbc, *sa, *sdo, *sdy, *sch;
  };

  // Row-parallel pass (no norm, row statistics). Rows go in groups: per row, the cell and gate gradients
  // (dpre, parked in the DGH row); then, column by column over the group, the parameter-gradient sums and
  // the two gate-norm backward steps (dpre -> DGI, DGH rows).
  template <bool kTail>
  void rows() {
    at::parallel_for(0, Bt, 8, [&](int64_t b0, int64_t b1) {
      const int64_t tid = at::get_thread_num();
      Slot s;
      s.pdb = partial.data() + tid * PW;
      s.pdgi = s.pdb + G;
      s.pdgh = s.pdgi + G;
      s.pdgc = s.pdgh + G;
      s.pdbc = s.pdgc + H;
      s.sa = scratch.data() + tid * SW;
      s.sdo = s.sa + G;
      s.sdy = s.sdo + H;
      s.sch = s.sdy + H;
      constexpr int64_t RB = 8;
      T rsum[4 * RB], rstd[2 * RB];
      for (int64_t g0 = b0; g0 < b1; g0 += RB) {
        const int64_t g1 = std::min(b1, g0 + RB);
        for (int64_t bb = g0; bb < g1; ++bb) {
          if constexpr (kPlain) {
            plain_row<kTail>(bb);
          } else {
            layer_row<kTail>(bb, bb - g0, s, rsum, rstd);
          }
        }
        group_columns<kTail>(g0, g1, s, rsum, rstd);
      }
    });
  }

  // No norm: the gate gradients of row bb from the saved activations.
  template <bool kTail>
  void plain_row(int64_t bb) {
    const int64_t r = o0 + bb;
    const T* xir = xi + bb * G;
    const T* ccr = cc ? cc + bb * H : nullptr;
    const T* cpr = cp + bb * H;
    const T* doutr = dout ? dout + bb * H : nullptr;
    T* dhr = dhr_p + bb * H;
    T* dcr = dcr_p + bb * H;
    T* dghr = dgh + bb * G;
    const ZoneRow<T> zhr = var.zone_h<T>(r);  // zoneout keep indicators of the row (or none)
    const ZoneRow<T> zcr = var.zone_c<T>(r);
    const Vec<T> one(T(1));
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = kTail ? std::min(VS, H - j) : VS;
      const Vec<T> i = ld(xir + j, n), f = ld(xir + H + j, n), g = ld(xir + 2 * H + j, n), o = ld(xir + 3 * H + j, n);
      const Vec<T> th = tanh_(ccr ? ld(ccr + j, n) : fma(f, ld(cpr + j, n), i * g));
      Vec<T> dh = ld(dhr + j, n);
      if (doutr) dh += ld(doutr + j, n);
      if (zhr) {  // zoneout of h: d h_{t-1} gets d * dh (added to the GEMM's part), h~ the rest
        const Vec<T> d = zhr(j, n);
        st(dhr + j, d * dh, n);
        dh = dh - d * dh;
      }
      const Vec<T> dcs = ld(dcr + j, n);  // dL/d(carried c_t)
      const Vec<T> dzc = zcr ? zcr(j, n) : Vec<T>(T(0));
      const Vec<T> dc = fma(dh * o, one - th * th, dcs - dzc * dcs);
      st(dcr + j, fma(dc, f, dzc * dcs), n);
      st(dghr + j, dc * g * i * (one - i), n);
      st(dghr + H + j, dc * ld(cpr + j, n) * f * (one - f), n);
      st(dghr + 2 * H + j, dc * i * (one - g * g), n);
      st(dghr + 3 * H + j, dh * th * o * (one - o), n);
    }
  }

  // Row statistics: the gate and cell gradients of row bb (the group's row lr), through the cell norm,
  // and the row sums of the two gate norms' backward (rsum, with the rows' rstd).
  template <bool kTail>
  void layer_row(int64_t bb, int64_t lr, const Slot& s, T* rsum, T* rstd) {
    const int64_t r = o0 + bb;
    const T* xir = xi + bb * G;
    const T* ccr = cc ? cc + bb * H : nullptr;
    const T* cpr = cp + bb * H;
    const T* doutr = dout ? dout + bb * H : nullptr;
    T* dhr = dhr_p + bb * H;
    T* dcr = dcr_p + bb * H;
    T* dghr = dgh + bb * G;
    const ZoneRow<T> zhr = var.zone_h<T>(r);  // zoneout keep indicators of the row (or none)
    const ZoneRow<T> zcr = var.zone_c<T>(r);
    const Vec<T> one(T(1));
    T *pdgc = s.pdgc, *pdbc = s.pdbc, *sa = s.sa, *sdo = s.sdo, *sdy = s.sdy, *sch = s.sch;
    const T mc = sg[2 * N + r], rc = sg[3 * N + r];
    const T* xhr = xh + bb * G;
    const Vec<T> vmc(mc), vrc(rc);
    Vec<T> s1(T(0)), s2(T(0));
    const T* sar = sa;  // gate activations of this row
    for (int64_t j = 0; j < H; j += VS) {  // pass A: gates, output and cell-norm terms
      const int64_t n = kTail ? std::min(VS, H - j) : VS;
      if (bb + 1 < Bt) {  // the next row's saved terms: at H >= 256 a row is a page, where hardware prefetch stops
        for (int k = 0; k < 4; ++k) {
          prefetch(xir + G + k * H + j);
          prefetch(xhr + G + k * H + j);
        }
      }
      // Recompute the activations from the saved normalized terms (cheaper than keeping them).
      Vec<T> a[4];
      for (int k = 0; k < 4; ++k) {
        const int64_t q = k * H + j;
        a[k] = fma(ld(gih + q, n), ld(xir + q, n), fma(ld(ghh + q, n), ld(xhr + q, n), ld(b + q, n)));
      }
      a[0] = sigmoid(a[0]);
      a[1] = sigmoid(a[1]);
      a[2] = tanh_(a[2]);
      a[3] = sigmoid(a[3]);
      for (int k = 0; k < 4; ++k) st(sa + k * H + j, a[k], n);
      const Vec<T> o_gate = a[3];
      const Vec<T> cv = ccr ? ld(ccr + j, n) : fma(a[1], ld(cpr + j, n), a[0] * a[2]);
      const Vec<T> chat = (cv - vmc) * vrc;
      const Vec<T> th = tanh_(fma(ld(gc + j, n), chat, ld(betac + j, n)));
      Vec<T> dh = ld(dhr + j, n);
      if (doutr) dh += ld(doutr + j, n);
      if (zhr) {  // zoneout of h (as in mode none)
        const Vec<T> d = zhr(j, n);
        st(dhr + j, d * dh, n);
        dh = dh - d * dh;
      }
      Vec<T> dcn = dh * o_gate * (one - th * th);
      if (var_carry) {  // the carried state is the cell norm's output: its gradient joins dcn
        const Vec<T> dcs = ld(dcr + j, n);
        dcn += zcr ? dcs - zcr(j, n) * dcs : dcs;
      }
      st(pdgc + j, fma(dcn, chat, ld(pdgc + j, n)), n);
      st(pdbc + j, ld(pdbc + j, n) + dcn, n);
      const Vec<T> dyc = dcn * ld(gc + j, n);
      s1 += lanes(dyc, n);
      s2 += lanes(dyc * chat, n);
      st(sdo + j, dh * th, n);
      st(sdy + j, dyc, n);
      st(sch + j, chat, n);
    }
    const Vec<T> m1(cen_c * hsum(s1) / T(H)), m2(hsum(s2) / T(H));
    Vec<T> si1(T(0)), si2(T(0)), sh1(T(0)), sh2(T(0));
    for (int64_t j = 0; j < H; j += VS) {  // pass B: cell and gate gradients
      const int64_t n = kTail ? std::min(VS, H - j) : VS;
      const Vec<T> dcs = ld(dcr + j, n);  // dL/d(carried c_t)
      const Vec<T> dzc = zcr ? zcr(j, n) : Vec<T>(T(0));
      const Vec<T> dc = fma(vrc, ld(sdy + j, n) - m1 - ld(sch + j, n) * m2, var_carry ? Vec<T>(T(0)) : dcs - dzc * dcs);
      const Vec<T> i = ld(sar + j, n), f = ld(sar + H + j, n), g = ld(sar + 2 * H + j, n), o = ld(sar + 3 * H + j, n);
      const Vec<T> dp[4] = {dc * g * i * (one - i), dc * ld(cpr + j, n) * f * (one - f), dc * i * (one - g * g),
                            ld(sdo + j, n) * o * (one - o)};
      st(dcr + j, fma(dc, f, dzc * dcs), n);
      for (int k = 0; k < 4; ++k) {
        const int64_t q = k * H + j;
        const Vec<T> dyi = lanes(dp[k] * ld(gih + q, n), n), dyh = lanes(dp[k] * ld(ghh + q, n), n);
        si1 += dyi;
        si2 = fma(dyi, ld(xir + q, n), si2);
        sh1 += dyh;
        sh2 = fma(dyh, ld(xhr + q, n), sh2);
        st(dghr + q, dp[k], n);
      }
    }
    rsum[4 * lr + 0] = cen_ih * hsum(si1) / T(G);
    rsum[4 * lr + 1] = hsum(si2) / T(G);
    rsum[4 * lr + 2] = cen_hh * hsum(sh1) / T(G);
    rsum[4 * lr + 3] = hsum(sh2) / T(G);
    rstd[2 * lr + 0] = sg[0 * N + r];
    rstd[2 * lr + 1] = sg[1 * N + r];
  }

  // Column pass over the group of rows [g0, g1): parameter-gradient sums (in registers across the group's
  // rows) and, with row statistics, the backward of the two gate layer norms.
  template <bool kTail>
  void group_columns(int64_t g0, int64_t g1, const Slot& s, const T* rsum, const T* rstd) {
    T *pdb = s.pdb, *pdgi = s.pdgi, *pdgh = s.pdgh;
    for (int64_t q = 0; q < G; q += VS) {
      const int64_t n = kTail ? std::min(VS, G - q) : VS;
      Vec<T> adb = ld(pdb + q, n);
      if constexpr (kPlain) {
        for (int64_t bb = g0; bb < g1; ++bb) adb += ld(dgh + bb * G + q, n);
        st(pdb + q, adb, n);
        continue;
      }
      Vec<T> adgi = ld(pdgi + q, n), adgh = ld(pdgh + q, n);
      const Vec<T> vgi = ld(gih + q, n), vgh = ld(ghh + q, n);
      for (int64_t bb = g0; bb < g1; ++bb) {
        const int64_t lr = bb - g0;
        T* dghr = dgh + bb * G + q;
        const Vec<T> dp = ld(dghr, n), vxi = ld(xi + bb * G + q, n), vxh = ld(xh + bb * G + q, n);
        adb += dp;
        adgi = fma(dp, vxi, adgi);
        adgh = fma(dp, vxh, adgh);
        st(dgi + bb * G + q, Vec<T>(rstd[2 * lr]) * (dp * vgi - Vec<T>(rsum[4 * lr]) - vxi * Vec<T>(rsum[4 * lr + 1])), n);
        st(dghr, Vec<T>(rstd[2 * lr + 1]) * (dp * vgh - Vec<T>(rsum[4 * lr + 2]) - vxh * Vec<T>(rsum[4 * lr + 3])), n);
      }
      st(pdb + q, adb, n);
      st(pdgi + q, adgi, n);
      st(pdgh + q, adgh, n);
    }
  }

  // Batch statistics, column-parallel: per chunk of VS hidden units, the cell gradients (passes A, B) and
  // the gate batch norms' backward (pass C).
  template <bool kTail>
  void columns(int64_t t) {
    const bool batch = F::batch_step(training, Bt);
    const T invn = T(1) / T(Bt);
    const int64_t nchunks = (H + VS - 1) / VS;
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t kc = k0; kc < k1; ++kc) {
        const int64_t j = kc * VS;
        const int64_t n = kTail ? std::min(VS, H - j) : VS;
        Vec<T> vgi[4], vgh[4], P1[4], Pi[4], Ph[4];
        column_cell<kTail>(t, j, n, batch, invn, vgi, vgh, P1, Pi, Ph);
        column_gate_norms(t, j, n, batch, invn, vgi, vgh, P1, Pi, Ph);
      }
    });
  }

  // Passes A and B over the step's rows for hidden units [j, j + n): activations, output and cell norm
  // (A), cell and gate gradients dpre (B, parked in the DGH rows) with their column sums P1, Pi, Ph.
  template <bool kTail>
  void column_cell(int64_t t, int64_t j, int64_t n, bool batch, T invn, Vec<T>* vgi, Vec<T>* vgh, Vec<T>* P1, Vec<T>* Pi,
                   Vec<T>* Ph) {
    const T* m_c = sh_ + (0 * Tn + t) * H;
    const T* r_c = sh_ + (1 * Tn + t) * H;
    T* pdb = partial.data();
    T *pdgi = pdb + G, *pdgh = pdgi + G, *pdgc = pdgh + G, *pdbc = pdgc + H;
    T* sa = bs_p;  // gate activations of the step's rows
    T *sdo = bs_p + B0 * G, *sdy = sdo + B0 * H, *sch = sdy + B0 * H;
    const Vec<T> one(T(1));
    Vec<T> vb[4];
    for (int k = 0; k < 4; ++k) {
      vgi[k] = ld(gih + k * H + j, n);
      vgh[k] = ld(ghh + k * H + j, n);
      vb[k] = ld(b + k * H + j, n);
    }
    const Vec<T> mc = ld(m_c + j, n), rc = ld(r_c + j, n), gcv = ld(gc + j, n), bcv = ld(betac + j, n);
    Vec<T> S1(T(0)), S2(T(0)), agc(T(0)), abc(T(0));
    for (int64_t bb = 0; bb < Bt; ++bb) {  // pass A
      const T* xir = xi + bb * G + j;
      const T* xhr = xh + bb * G + j;
      if (bb + kAhead < Bt) {  // the rows of passes A and B, kAhead rows on (first touch of this step)
        const int64_t rc = (bb + kAhead) * H + j;
        for (int k = 0; k < 4; ++k) {
          prefetch(xir + kAhead * G + k * H);
          prefetch(xhr + kAhead * G + k * H);
        }
        prefetch(cp + rc);
        if (cc) prefetch(cc + rc);
        prefetch(dhr_p + rc);
        if (dout) prefetch(dout + rc);
      }
      Vec<T> a[4];  // recompute the activations from the saved normalized terms
      for (int k = 0; k < 4; ++k) a[k] = fma(vgi[k], ld(xir + k * H, n), fma(vgh[k], ld(xhr + k * H, n), vb[k]));
      a[0] = sigmoid(a[0]);
      a[1] = sigmoid(a[1]);
      a[2] = tanh_(a[2]);
      a[3] = sigmoid(a[3]);
      for (int k = 0; k < 4; ++k) st(sa + bb * G + k * H + j, a[k], n);
      const Vec<T> o_gate = a[3];
      const Vec<T> cv = cc ? ld(cc + bb * H + j, n) : fma(a[1], ld(cp + bb * H + j, n), a[0] * a[2]);
      const Vec<T> chat = (cv - mc) * rc;
      const Vec<T> th = tanh_(fma(gcv, chat, bcv));
      Vec<T> dh = ld(dhr_p + bb * H + j, n);
      if (dout) dh += ld(dout + bb * H + j, n);
      if (var.zh) {  // zoneout of h (as in mode none)
        const Vec<T> d = var.zone_h<T>(o0 + bb)(j, n);
        st(dhr_p + bb * H + j, d * dh, n);
        dh = dh - d * dh;
      }
      const Vec<T> dcn = dh * o_gate * (one - th * th);
      agc = fma(dcn, chat, agc);
      abc += dcn;
      const Vec<T> dyc = dcn * gcv;
      S1 += dyc;
      S2 = fma(dyc, chat, S2);
      st(sdo + bb * H + j, dh * th, n);
      st(sdy + bb * H + j, dyc, n);
      st(sch + bb * H + j, chat, n);
    }
    st(pdgc + j, ld(pdgc + j, n) + agc, n);
    st(pdbc + j, ld(pdbc + j, n) + abc, n);
    const Vec<T> m1 = S1 * Vec<T>(cen_c * invn), m2 = S2 * Vec<T>(invn);
    for (int k = 0; k < 4; ++k) P1[k] = Pi[k] = Ph[k] = Vec<T>(T(0));
    for (int64_t bb = 0; bb < Bt; ++bb) {  // pass B
      if (bb + kAhead < Bt) {
        for (int k = 0; k < 4; ++k) prefetch_write(dgh + (bb + kAhead) * G + k * H + j);
      }
      const Vec<T> dyc = ld(sdy + bb * H + j, n);
      const Vec<T> dcn_norm = batch ? rc * (dyc - m1 - ld(sch + bb * H + j, n) * m2) : rc * dyc;
      const Vec<T> dcs = ld(dcr_p + bb * H + j, n);  // dL/d(carried c_t)
      const Vec<T> dzc = var.zc ? var.zone_c<T>(o0 + bb)(j, n) : Vec<T>(T(0));
      const Vec<T> dc = dcn_norm + (dcs - dzc * dcs);
      const T* sar = sa + bb * G + j;
      const Vec<T> i = ld(sar, n), f = ld(sar + H, n), g = ld(sar + 2 * H, n), o = ld(sar + 3 * H, n);
      const Vec<T> dp[4] = {dc * g * i * (one - i), dc * ld(cp + bb * H + j, n) * f * (one - f), dc * i * (one - g * g),
                            ld(sdo + bb * H + j, n) * o * (one - o)};
      st(dcr_p + bb * H + j, fma(dc, f, dzc * dcs), n);
      const T* xir = xi + bb * G + j;
      const T* xhr = xh + bb * G + j;
      T* dghr = dgh + bb * G + j;
      for (int k = 0; k < 4; ++k) {
        P1[k] += dp[k];
        Pi[k] = fma(dp[k], ld(xir + k * H, n), Pi[k]);
        Ph[k] = fma(dp[k], ld(xhr + k * H, n), Ph[k]);
        st(dghr + k * H, dp[k], n);
      }
    }
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      st(pdb + q, ld(pdb + q, n) + P1[k], n);
      st(pdgi + q, ld(pdgi + q, n) + Pi[k], n);
      st(pdgh + q, ld(pdgh + q, n) + Ph[k], n);
    }
  }

  // Pass C: dpre through the two gate batch norms of hidden units [j, j + n) (population statistics: a
  // fixed scale) -> the DGI and DGH rows.
  void column_gate_norms(int64_t t, int64_t j, int64_t n, bool batch, T invn, const Vec<T>* vgi, const Vec<T>* vgh,
                         const Vec<T>* P1, const Vec<T>* Pi, const Vec<T>* Ph) {
    const T* r_ih = sg + (0 * Tn + t) * G;
    const T* r_hh = sg + (1 * Tn + t) * G;
    Vec<T> ri[4], rh[4], mp[4], mpi[4], mph[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t q = k * H + j;
      ri[k] = ld(r_ih + q, n) * vgi[k];
      rh[k] = ld(r_hh + q, n) * vgh[k];
      mp[k] = P1[k] * Vec<T>(invn);
      mpi[k] = Pi[k] * Vec<T>(invn);
      mph[k] = Ph[k] * Vec<T>(invn);
    }
    for (int64_t bb = 0; bb < Bt; ++bb) {
      const T* xir = xi + bb * G + j;
      const T* xhr = xh + bb * G + j;
      T* dghr = dgh + bb * G + j;
      T* dgir = dgi + bb * G + j;
      if (bb + kAhead < Bt) {
        for (int k = 0; k < 4; ++k) prefetch_write(dgir + kAhead * G + k * H);
      }
      for (int k = 0; k < 4; ++k) {
        const Vec<T> dp = ld(dghr + k * H, n);
        if (batch) {
          st(dgir + k * H, ri[k] * (dp - Vec<T>(cen_ih) * mp[k] - ld(xir + k * H, n) * mpi[k]), n);
          st(dghr + k * H, rh[k] * (dp - Vec<T>(cen_hh) * mp[k] - ld(xhr + k * H, n) * mph[k]), n);
        } else {
          st(dgir + k * H, ri[k] * dp, n);
          st(dghr + k * H, rh[k] * dp, n);
        }
      }
    }
  }

  const Tensor &x, &h0, &w_ih, &w_hh, &out;
  const c10::optional<Tensor>& w_hh_packed;
  const Shape& sh;
  const Variant& var;
  const int64_t H, G, N, B0, Tn;
  const at::TensorOptions opts;
  const LstmVectors<T> v;
  const T *b, *gih, *ghh, *gc, *betac;
  const T* d_out;  // dL/d out (null: zero)
  const T cen_ih, cen_hh, cen_c;
  const bool training, var_carry, recompute_c;
  const int64_t nthreads, PW, nslots, SW;  // threads, accumulator slot width, slots, row scratch width
  Tensor dh_rec, dc_rec, bscratch, DGH, DGI, Hprev, dx;
  WeightGrads dW;
  MklPacked w_hh_mkl;
  T *dhr_p = nullptr, *dcr_p = nullptr, *bs_p = nullptr, *dgh_p = nullptr, *dgi_p = nullptr;
  const T *xi_all = nullptr, *xh_all = nullptr, *c_all = nullptr, *cs_all = nullptr, *c0_p = nullptr;
  const T *sg = nullptr, *sh_ = nullptr;  // saved statistics of the gate terms and of the cell
  std::vector<T> partial, scratch;
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  // Step t: rows, saved terms, cells, gradient rows.
  int64_t Bt = 0, o0 = 0;
  const T *xi = nullptr, *xh = nullptr, *cc = nullptr, *cp = nullptr, *dout = nullptr;
  T *dgi = nullptr, *dgh = nullptr;
};

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------

void check_common(const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh) {
  TORCH_CHECK(x.device().is_cpu(), "fused LSTM: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fused LSTM: float32 or float64 only");
  for (const Tensor* t : {&x, &h0, &c0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type(), "fused LSTM: expected contiguous tensors of one dtype");
  }
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(1) == x.size(1) && w_hh.size(0) == 4 * w_hh.size(1),
              "fused LSTM: bad shapes");
}

// Sites: input term, recurrent term, cell. `stat` and `center` are the sites' descriptor fields
// (statistic family and centring), `pop` their population statistics (running mean, running variance,
// num_batches_tracked per site; read only). Returns out, h_n, c_n, what backward needs (the input term,
// the recurrent term, the cells, the row or column statistics; empty when `save` is false) and the batch
// moments of a training call with batch statistics, (2, T, 2G + H).
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
                            const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias,
                            const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh, const c10::optional<Tensor>& g_c,
                            const c10::optional<Tensor>& beta_c, std::vector<c10::optional<Tensor>> pop, std::vector<int64_t> stat,
                            std::vector<int64_t> center, std::vector<double> eps, bool batch_stats, bool save, int64_t step_offset,
                            int64_t inproj_max, int64_t inproj_rows, const c10::optional<Tensor>& w_hh_packed,
                            const c10::optional<Tensor>& w_ih_packed, bool joint, bool carry, const c10::optional<Tensor>& zone_h,
                            const c10::optional<Tensor>& zone_c) {
  check_common(x, h0, c0, w_ih, w_hh);
  const Variant var(joint, carry, zone_h, zone_c, x, w_hh.size(1));
  const int64_t code = family_of(stat, "fused LSTM");
  Shape sh(batch_sizes_of(batch_sizes, x.size(0), h0.size(0), "fused LSTM"), w_hh.size(1), x.size(1), 4, "fused LSTM");
  TORCH_CHECK(x.size(0) == sh.N && h0.size(0) == sh.B0 && c0.size(0) == sh.B0, "fused LSTM: rows do not match batch_sizes");
  TORCH_CHECK(stat.size() == 3 && center.size() == 3 && eps.size() == 3 && pop.size() == 9, "fused LSTM: bad norm arguments");
  const LstmArgs a{x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, w_hh_packed, center, batch_stats};
  std::vector<Tensor> res;
  TIC(6);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_lstm_forward", [&] {
    with_family(code, [&](auto family) {
      LstmForward<scalar_t, decltype(family)> k(a, sh, eps, save, step_offset, pop, inproj_max, inproj_rows, w_ih_packed, var);
      res = run_forward(k, sh);
    });
  });
  TOC(6);
  return res;
}

std::vector<Tensor> backward(const c10::optional<Tensor>& d_out, const c10::optional<Tensor>& d_hn, const c10::optional<Tensor>& d_cn,
                             const Tensor& x, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& c0,
                             const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& bias,
                             const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh, const c10::optional<Tensor>& g_c,
                             const c10::optional<Tensor>& beta_c, const Tensor& out, const Tensor& XI, const c10::optional<Tensor>& XH,
                             const Tensor& C, const c10::optional<Tensor>& stats_g, const c10::optional<Tensor>& stats_h,
                             std::vector<int64_t> stat, std::vector<int64_t> center, bool batch_stats, bool need_dx,
                             int64_t chunk_rows, const c10::optional<Tensor>& w_hh_packed, bool joint, bool carry,
                             const c10::optional<Tensor>& zone_h, const c10::optional<Tensor>& zone_c) {
  check_common(x, h0, c0, w_ih, w_hh);
  const Variant var(joint, carry, zone_h, zone_c, x, w_hh.size(1));
  const int64_t code = family_of(stat, "fused LSTM");
  TORCH_CHECK(center.size() == 3, "fused LSTM: bad norm arguments");
  Shape sh(batch_sizes_of(batch_sizes, x.size(0), h0.size(0), "fused LSTM"), w_hh.size(1), x.size(1), 4, "fused LSTM");
  for (const c10::optional<Tensor>* g : {&d_out, &d_hn, &d_cn}) {
    TORCH_CHECK(!has(*g) || ((*g)->is_contiguous() && (*g)->scalar_type() == x.scalar_type()), "fused LSTM: bad gradient");
  }
  const LstmArgs a{x, h0, c0, w_ih, w_hh, bias, g_ih, g_hh, g_c, beta_c, w_hh_packed, center, batch_stats};
  const LstmSaved saved{d_out, d_hn, d_cn, out, XI, XH, C, stats_g, stats_h};
  std::vector<Tensor> res;
  TIC(7);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_lstm_backward", [&] {
    with_family(code, [&](auto family) {
      LstmBackward<scalar_t, decltype(family)> k(a, saved, sh, need_dx, chunk_rows, var);
      res = run_backward(k, sh);
    });
  });
  TOC(7);
  return res;
}

}  // namespace

#ifdef RECNORM_FUSED_TIMING
std::vector<double> timers() {
  std::vector<double> r(g_timers, g_timers + 8);
  std::fill(g_timers, g_timers + 8, 0.0);
  return r;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recnorm fused CPU LSTM time loop (forward and BPTT backward)";
  // The loops touch no Python object: let other Python threads run meanwhile.
  m.def("forward", &forward, "fused LSTM direction forward", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "fused LSTM direction backward", py::call_guard<py::gil_scoped_release>());
  m.def("running_stats_update", &running_stats_update, "recurrent batch norm: fold a call's batch moments into the running statistics");
  m.def("onednn_available", &dnn_linear_available, "whether mkldnn::_linear_pointwise can be called");
  def_gemm_settings(m);
  m.def("set_pool_capacity", &set_pool_capacity, "bytes of freed buffers kept for reuse (0: none)");
  m.def("pool_cached", &pool_cached, "bytes currently kept in the buffer pool");
  m.attr("VERSION") = 3;
#ifdef RECNORM_FUSED_TIMING
  m.def("timers", &timers, "development timers: fwd input GEMM, fwd step GEMM, fwd pass, bwd pass, bwd step GEMM, bwd chunk GEMMs, fwd, bwd (s)");
#endif
}
