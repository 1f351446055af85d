// Fused CPU time loop of one GRU or Elman RNN (tanh / relu) direction with layer or recurrent batch
// normalization of the two gate terms.
//
// The Python side (recnorm/kernels/fused.py) registers `forward` and `backward` as the torch.library
// operators recnorm::fused_gru_rnn and recnorm::fused_gru_rnn_backward; recnorm/kernels/reference.py is
// the oracle this file must agree with (outputs, final states, gradients, batch moments). The LSTM kernel
// (fused_lstm.cpp) is the model: same packed layout, same statistics rules; the helpers both use are in
// fused_common.h.
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
// Statistic families (both sites use the same one; `center` per site picks LN/BN or RMS), each in a header
// of its own (family_none.h, family_row.h, family_batch.h); the passes read the family's axis (family.h):
//   none:  N = identity (the row pass with mean 0 and rstd 1)
//   row:   N = layer norm (or RMSNorm) of each row; the GRU normalizes the (r, z) block and the n block
//          separately (groups (2H, H)), the RNN the whole row.
//   step:  per-step batch statistics over the valid rows (population statistics in eval mode and
//          for steps with fewer than 2 valid rows); the batch moments go to the `moments` output.
// A feature (BN: a column over the batch; LN: a row group) whose values are all equal normalizes to
// exactly 0 and passes no gradient (recnorm.kernels.stats.degenerate_features); stored as rstd = 0.
// Variants (recnorm/kernels/contract.py), read by forward and backward:
//   one_group[s]: the GRU's layer norm at site s (0 ih, 1 hh) takes one group over all 3H features
//          (haste's LayerNormGRU) instead of (2H, H); stored with group b's statistics equal to a's;
//   joint (RNN, row family): one norm (the ih site's gain, centring and eps) over W_ih x + W_hh h: the
//          recurrent term is added into the input term's row before its statistics and gets rstd 0, and
//          backward sends the joint term's gradient (DGI) to both GEMMs;
//   zone_h: zoneout keep indicators d ((N, H) uint8 bytes, or (1, H) holding the rate in eval): after each step's
//          pass h_t = h~_t + d_t (h_{t-1} - h~_t), the output and the next step's input. Backward
//          recomputes the RNN's h~ from the saved normalized terms and sends d * dh to h_{t-1} directly.
//
// Per step the forward does one GEMM (h_{t-1} W_hh^T) and one fused pass over the step's rows
// (statistics, normalization, gates, state update); the input projection runs as GEMMs over chunks of
// consecutive steps just before their steps. The backward (BPTT) does one fused pass and one GEMM per
// step (dh_{t-1} = dA_h W_hh, plus the GRU's direct z * dh term written by the pass), and the weight
// gradients as a few large GEMMs over chunks of consecutive steps. Saved for backward: the normalized
// terms (N, G) twice, the outputs, and the rstd of every row group (layer) or step and feature (batch);
// an Elman RNN with no norm, gains or zoneout saves its outputs and row statistics only (terms_unused).
//
// The loop is fused_loop.h's skeleton; GruRnnForward and GruRnnBackward below implement its phases, with
// the statistic family and the cell template arguments (chosen once, at the entry point).

#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "fused_common.h"  // vector helpers, exp/sigmoid/tanh, Shape, GEMMs
#include "fused_loop.h"    // the time loop, and the statistic families with their dispatch (families.h)
#include "running_stats.h"  // the running-statistics update of recurrent batch norm

namespace {

enum Cell : int64_t { kGRU = 0, kTanh = 1, kRelu = 2 };

// sigmoid and tanh with an exact division (fused_common.h).
template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) { return sigmoid_v<false>(x); }
template <typename T>
inline Vec<T> tanh_(const Vec<T>& x) { return tanh_v<false>(x); }

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

// The optional per-gate vectors of forward and backward, absent ones read as their identity: the
// biases b and b_hn as 0, the layer-norm gains as 1.
template <typename T>
struct GateVectors {
  std::vector<T> zeros, ones;
  const T *b, *bhn, *gih, *ghh;
  GateVectors(int64_t G, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& b_hn,
              const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh)
      : zeros(G, T(0)),
        ones(G, T(1)),
        b(ptr_or<T>(bias, zeros.data())),
        bhn(ptr_or<T>(b_hn, zeros.data())),
        gih(ptr_or<T>(g_ih, ones.data())),
        ghh(ptr_or<T>(g_hh, ones.data())) {}
};


// The cell as a type: f(CellTag<kGRU>{}) etc., asked once at the entry point (as the family, fused_loop.h).
template <Cell C>
using CellTag = std::integral_constant<Cell, C>;

template <typename F>
void with_cell(int64_t cell, F&& f) {
  switch (cell) {
    case kGRU:
      f(CellTag<kGRU>{});
      return;
    case kTanh:
      f(CellTag<kTanh>{});
      return;
    case kRelu:
      f(CellTag<kRelu>{});
      return;
  }
  TORCH_CHECK(false, "fused GRU/RNN: unknown cell ", cell);
}

// Batch statistics need each site's population statistics: running mean and variance (S, G), counts (S).
void check_population(const std::vector<c10::optional<Tensor>>& pop, const Tensor& x, int64_t G) {
  for (int s = 0; s < 2; ++s) {
    const auto &rm = pop[3 * s], &rv = pop[3 * s + 1], &nbt = pop[3 * s + 2];
    TORCH_CHECK(has(rm) && has(rv) && has(nbt) && rm->is_contiguous() && rv->is_contiguous() && nbt->is_contiguous() &&
                    rm->scalar_type() == x.scalar_type() && rv->scalar_type() == x.scalar_type() && nbt->scalar_type() == at::kLong &&
                    rm->dim() == 2 && rm->size(1) == G && rv->sizes() == rm->sizes() && nbt->numel() == rm->size(0),
                "fused GRU/RNN: batch statistics need population statistics of shape (S, G)");
  }
}

// The operator's arguments, as forward and backward pass them on to their kernel classes.
struct GruRnnArgs {
  const Tensor &x, &h0, &w_ih, &w_hh;
  const c10::optional<Tensor> &bias, &b_hn, &g_ih, &g_hh;
  const c10::optional<Tensor>& w_hh_packed;
  const std::vector<int64_t>& center;
  bool training;  // batch statistics (the operator's batch_stats)
  bool joint;
  const std::vector<int64_t>& one_group;
  const ZoneRows& zone;
};

// Whether backward can do without the two gate terms XI and XH: an Elman RNN with no norm, no gains, no
// zoneout and no joint norm, whose backward needs only its outputs (tanh' = 1 - h^2, relu' = [h > 0]).
// Such a call saves the row statistics alone (4, N), and XI and XH come back empty: T * B * H * 2 values
// less for a training step. The Python side's fake (recnorm/kernels/fused.py, _gru_rnn_terms_unused)
// follows the same rule.
template <class F, int64_t C>
bool terms_unused(const GruRnnArgs& a) {
  return C != 0 && F::kAxis == Axis::kNone && !a.joint && !a.zone && !has(a.g_ih) && !has(a.g_hh);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// One forward call, with the statistic family F (families.h) and the cell C fixed at compile time (the phases:
// fused_loop.h).
template <typename T, class F, Cell C>
class GruRnnForward {
 public:
  static_assert(family_check<F, T>());
  static constexpr bool kStep = F::kAxis == Axis::kBatch;  // per-step batch statistics: column-parallel
  static constexpr bool kGru = C == kGRU;
  static constexpr bool kRelu_ = C == kRelu;
  static constexpr int64_t VS = Vec<T>::size();

  GruRnnForward(const GruRnnArgs& a, const Shape& shape, const std::vector<double>& eps, bool save_, int64_t step_offset_,
                const std::vector<c10::optional<Tensor>>& pop, int64_t inproj_max, int64_t inproj_rows_)
      : x(a.x), h0(a.h0), w_hh_packed(a.w_hh_packed), zone(a.zone), sh(shape),
        H(sh.H), G(sh.G), N(sh.N), B0(sh.B0), Tn(sh.T), K(sh.K), I(sh.I),
        // First layer-norm group of each site: the GRU's (r, z) block, or the whole row (RNN; one-group GRU).
        one_ih(!kGru || a.one_group[0] != 0), one_hh(!kGru || a.one_group[1] != 0),
        S_ih(one_ih ? G : 2 * H), S_hh(one_hh ? G : 2 * H), opts(x.options()),
        gv(G, a.bias, a.b_hn, a.g_ih, a.g_hh), b(gv.b), bhn(gv.bhn), gih(gv.gih), ghh(gv.ghh),
        eps_ih(T(eps[0])), eps_hh(T(eps[1])), cen_ih(a.center[0] != 0), cen_hh(a.center[1] != 0), joint(a.joint),
        training(a.training), save(save_), keep(save_ && !terms_unused<F, C>(a)), step_offset(step_offset_),
        inproj_rows(inproj_rows_), hoisted(I > inproj_max) {
    // Batch moments of the steps that use batch statistics: (2, T, 2G) means and variances of the input
    // and the recurrent term per step (rows of other steps stay 0).
    moments = kStep && training ? at::zeros({2, Tn, 2 * G}, opts) : at::empty({0}, opts);
    if constexpr (kStep) {
      check_population(pop, x, G);
      const int64_t W = 2 * G;
      T* mp = training ? moments.data_ptr<T>() : nullptr;
      for (int s = 0; s < 2; ++s)
        bn[s].init(*pop[3 * s], *pop[3 * s + 1], *pop[3 * s + 2], a.center[s] != 0, eps[s], mp ? mp + s * G : nullptr,
                   mp ? mp + Tn * W + s * G : nullptr, W);
    }
    // Input projection W_ih x: GEMMs over chunks of consecutive steps (about inproj_rows rows each),
    // each just before its steps run, so that the pass finds its rows in cache; or, for a narrow input
    // (I <= inproj_max, where a GEMM with a tiny inner dimension is slow), computed row by row inside
    // the step pass from x and W_ih^T.
    int64_t xi_rows = keep ? N : B0;
    if (hoisted && !keep) xi_rows = sh.proj_chunk_max(inproj_rows);
    XI = at::empty({xi_rows, G}, opts);  // input term (normalized in place when kept)
    // W_ih^T (I, G): the hoisted GEMMs' operand, or the rows the pass reads.
    WT = hoisted ? plain_operand<T>(a.w_ih, sh.T) : transposed<T>(a.w_ih);
    wt = hoisted ? nullptr : WT.data_ptr<T>();
    x_p = x.data_ptr<T>();
    XH = at::empty({keep ? N : B0, G}, opts);  // recurrent term (normalized in place when kept)
    out = at::empty({N, H}, opts);
    hn = at::empty({B0, H}, opts);
    // Saved statistics. Layer: (4, rows) rstd of the ih groups a, b and the hh groups a, b per row
    // (group b is the GRU's n block). Batch: (2, steps, G) rstd_ih, rstd_hh per step and feature.
    if constexpr (!kStep) {
      stats = at::empty({4, save ? N : B0}, opts);
    } else {
      stats = at::empty({2, save ? Tn : 1, G}, opts);
      means = at::empty({2, G}, opts);  // this step's means of the two gate terms
    }
    xi_all = XI.data_ptr<T>();
    xh_all = XH.data_ptr<T>();
    out_p = out.data_ptr<T>();
    hn_p = hn.data_ptr<T>();
    h0_p = h0.data_ptr<T>();
    w_hh_mkl = step_pack<T>(a.w_hh, true, sh, w_hh_packed);  // W_hh^T packed by MKL, or
    if (!w_hh_mkl) w_hh_t = plain_operand<T>(a.w_hh, sh.T);  // (H, G): a plain GEMM operand (or its view)
  }

  // Step t's row pointers, and the input projection of the chunk of steps that starts at t.
  void project(int64_t t) {
    Bt = sh.bs[t], o0 = sh.off[t];
    step_no = t + step_offset;
    if (hoisted && t >= proj_end) {
      const int64_t t2 = sh.proj_chunk_end(t, inproj_rows);
      const int64_t rows = sh.off[t2] - o0;
      proj_base = keep ? 0 : o0;
      Tensor dst = XI.narrow(0, o0 - proj_base, rows);
      gemm_into(dst, x.narrow(0, o0, rows), WT);
      proj_end = t2;
    }
    xi = hoisted ? xi_all + (o0 - proj_base) * G : (keep ? xi_all + o0 * G : xi_all);
    xh_dst = keep ? xh_all + o0 * G : xh_all;  // where the (normalized) recurrent term is kept
    hp = t == 0 ? h0_p : out_p + sh.off[t - 1] * H;
    hout = out_p + o0 * H;
    xrows = x_p + o0 * I;
  }

  // Recurrent GEMM for the rows valid at t (raw term read from xh, normalized term written to xh_dst).
  void recurrent(int64_t t) {
    Tensor hprev = t == 0 ? h0.narrow(0, 0, Bt) : out.narrow(0, sh.off[t - 1], Bt);
    Tensor dst = keep ? XH.narrow(0, o0, Bt) : XH.narrow(0, 0, Bt);
    gh = step_gemm<T>(hprev, w_hh_t, w_hh_mkl, w_hh_packed, dst);
    xh = gh.data_ptr<T>();
  }

  void step(int64_t t) {
    if constexpr (kStep) {
      columns(t);
    } else {
      rows();
    }
  }

  void finish(int64_t t) {
    if (zone) {  // zoneout: mix the step's new state with the previous one
      at::parallel_for(0, Bt, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t bb = b0; bb < b1; ++bb) zone_row(hout + bb * H, hout + bb * H, hp + bb * H, zone.at<T>(o0 + bb), H);
      });
    }
    // Sequences whose last step is t: rows [bs[t+1], bs[t]).
    const int64_t nb = sh.next_bs(t);
    if (nb < Bt) std::copy(hout + nb * H, hout + Bt * H, hn_p + nb * H);
  }

  std::vector<Tensor> outputs() {
    // Outputs of a registered operator must not alias each other: a fresh empty tensor for each unused one.
    auto none = [&]() { return at::empty({0}, opts); };
    if (!save) return {out, hn, none(), none(), none(), moments};
    if (!keep) return {out, hn, none(), none(), stats, moments};  // the terms are not needed (terms_unused)
    return {out, hn, XI, XH, stats, moments};
  }

 private:
  // Row statistics of row bb's two terms, mean and rstd of each group: {ia, ib, ha, hb} (the family
  // "none": 0 and 1).
  void row_norms(T* xir, const T* xhr, T* m, T* r) {
    T mia = 0, ria = 1, mib = 0, rib = 1, mha = 0, rha = 1, mhb = 0, rhb = 1;
    if (joint) add_row(xir, xhr, G);  // one norm of the sum; the recurrent term then counts 0
    if (joint) {
      F::group(xir, S_ih, cen_ih, eps_ih, mia, ria);
      rha = 0;
    } else if (S_ih == S_hh) {  // two groups of one size: computed together (the same values)
      group_pair<F>(xir, xhr, S_ih, cen_ih, cen_hh, eps_ih, eps_hh, mia, ria, mha, rha);
    } else {
      F::group(xir, S_ih, cen_ih, eps_ih, mia, ria);
      F::group(xhr, S_hh, cen_hh, eps_hh, mha, rha);
    }
    if constexpr (kGru) {  // the n block's groups: their own, or (one group per term) the term's
      if (one_ih) mib = mia, rib = ria;
      if (one_hh) mhb = mha, rhb = rha;
      if (!one_ih && !one_hh) {
        group_pair<F>(xir + S_ih, xhr + S_hh, H, cen_ih, cen_hh, eps_ih, eps_hh, mib, rib, mhb, rhb);
      } else if (!one_ih) {
        F::group(xir + S_ih, H, cen_ih, eps_ih, mib, rib);
      } else if (!one_hh) {
        F::group(xhr + S_hh, H, cen_hh, eps_hh, mhb, rhb);
      }
    }
    m[0] = mia, r[0] = ria, m[1] = mib, r[1] = rib, m[2] = mha, r[2] = rha, m[3] = mhb, r[3] = rhb;
  }

  // Row-parallel pass (no norm, row statistics): each row's statistics, gates and new state.
  void rows() {
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
        T mg[4], rg[4];  // mean and rstd of the groups ia, ib, ha, hb
        row_norms(xir, xhr, mg, rg);
        rs[0 * rstride + rbase + bb] = rg[0];
        rs[1 * rstride + rbase + bb] = rg[1];
        rs[2 * rstride + rbase + bb] = rg[2];
        rs[3 * rstride + rbase + bb] = rg[3];
        const Vec<T> vmia(mg[0]), vria(rg[0]), vmib(mg[1]), vrib(rg[1]), vmha(mg[2]), vrha(rg[2]), vmhb(mg[3]), vrhb(rg[3]);
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = std::min(VS, H - j);
          if constexpr (kGru) {
            Vec<T> a[3], h[3];
            for (int k = 0; k < 3; ++k) {
              const int64_t q = k * H + j;
              a[k] = k < 2 ? (ld(xir + q, n) - vmia) * vria : (ld(xir + q, n) - vmib) * vrib;
              h[k] = k < 2 ? (ld(xhr + q, n) - vmha) * vrha : (ld(xhr + q, n) - vmhb) * vrhb;
              if (keep) {  // keep the normalized terms for backward
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
            if (keep) {
              st(xir + j, a, n);
              st(xhw + j, h, n);
            }
            st(hr + j, act(fma(ld(gih + j, n), a, fma(ld(ghh + j, n), h, ld(b + j, n))), kRelu_), n);
          }
        }
      }
    });
  }

  // Batch statistics: every hidden unit j is independent of the others (column-parallel).
  void columns(int64_t t) {
    const bool batch = F::batch_step(training, Bt);
    const auto s_ih = F::begin_step(bn[0], t, step_no, batch);
    const auto s_hh = F::begin_step(bn[1], t, step_no, batch);
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
        if (!hoisted) project_gate_cols<kGru ? 3 : 1>(xrows, wt, I, G, H, j, n, Bt, xi);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t q = k * H + j;
          F::columns(xi + q, G, Bt, n, q, s_ih, m_ih + q, r_ih + q);
          F::columns(xh + q, G, Bt, n, q, s_hh, m_hh + q, r_hh + q);
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
        const Vec<T> vbhn = kGru ? ld(bhn + j, n) : Vec<T>(T(0));
        for (int64_t bb = 0; bb < Bt; ++bb) {
          T* xir = xi + bb * G + j;
          const T* xhr = xh + bb * G + j;
          T* xhw = xh_dst + bb * G + j;
          Vec<T> a[3], h[3];
          for (int64_t k = 0; k < K; ++k) {
            a[k] = (ld(xir + k * H, n) - mi[k]) * ri[k];
            h[k] = (ld(xhr + k * H, n) - mh[k]) * rh[k];
            if (keep) {  // keep the normalized terms for backward
              st(xir + k * H, a[k], n);
              st(xhw + k * H, h[k], n);
            }
          }
          if constexpr (kGru) {
            const Vec<T> r = sigmoid(fma(vg[0], a[0], fma(vh[0], h[0], vb[0])));
            const Vec<T> z = sigmoid(fma(vg[1], a[1], fma(vh[1], h[1], vb[1])));
            const Vec<T> hnf = fma(vh[2], h[2], vbhn);
            const Vec<T> nn = tanh_(fma(r, hnf, fma(vg[2], a[2], vb[2])));
            st(hout + bb * H + j, fma(z, ld(hp + bb * H + j, n) - nn, nn), n);
          } else {
            st(hout + bb * H + j, act(fma(vg[0], a[0], fma(vh[0], h[0], vb[0])), kRelu_), n);
          }
        }
      }
    });
  }

  const Tensor &x, &h0;
  const c10::optional<Tensor>& w_hh_packed;
  const ZoneRows& zone;
  const Shape& sh;
  const int64_t H, G, N, B0, Tn, K, I;
  const bool one_ih, one_hh;
  const int64_t S_ih, S_hh;  // width of the first layer-norm group of each site
  const at::TensorOptions opts;
  const GateVectors<T> gv;
  const T *b, *bhn, *gih, *ghh;
  const T eps_ih, eps_hh;
  const bool cen_ih, cen_hh, joint, training, save;
  const bool keep;  // save the two gate terms for backward (see terms_unused)
  const int64_t step_offset, inproj_rows;
  const bool hoisted;  // input projection by GEMM, not in the pass
  typename SiteOf<F, T>::type bn[2];  // the two sites' population statistics (batch axis)
  Tensor moments, XI, WT, XH, out, hn, stats, means, w_hh_t, gh;
  MklPacked w_hh_mkl;
  int64_t proj_end = 0, proj_base = 0;  // steps [.., proj_end) are projected; XI row 0 is packed row proj_base
  const T *wt = nullptr, *x_p = nullptr, *h0_p = nullptr;
  T *xi_all = nullptr, *xh_all = nullptr, *out_p = nullptr, *hn_p = nullptr;
  // Step t: rows, input term, recurrent term (raw, and where its normalized form goes), states.
  int64_t Bt = 0, o0 = 0, step_no = 0;
  T *xi = nullptr, *xh_dst = nullptr, *hout = nullptr;
  const T *xh = nullptr, *hp = nullptr, *xrows = nullptr;
};

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// What forward saved for backward, and the gradients backward receives.
struct GruRnnSaved {
  const c10::optional<Tensor> &d_out, &d_hn;  // gradients of out and h_n (absent: zero)
  const Tensor &out, &XI, &XH, &stats;
};

// One backward call, with the statistic family F (families.h) and the cell C fixed at compile time (the phases:
// fused_loop.h).
template <typename T, class F, Cell C>
class GruRnnBackward {
 public:
  static_assert(family_check<F, T>());
  static constexpr bool kStep = F::kAxis == Axis::kBatch;  // per-step batch statistics: column-parallel
  static constexpr bool kGru = C == kGRU;
  static constexpr bool kRelu_ = C == kRelu;
  static constexpr int64_t VS = Vec<T>::size();

  GruRnnBackward(const GruRnnArgs& a, const GruRnnSaved& s, const Shape& shape, bool need_dx, int64_t chunk_rows)
      : x(a.x), h0(a.h0), w_ih(a.w_ih), w_hh(a.w_hh), out(s.out), w_hh_packed(a.w_hh_packed), zone(a.zone), sh(shape),
        H(sh.H), G(sh.G), N(sh.N), B0(sh.B0), Tn(sh.T), one_ih(!kGru || a.one_group[0] != 0),
        one_hh(!kGru || a.one_group[1] != 0), joint(a.joint), training(a.training), opts(x.options()),
        gv(G, a.bias, a.b_hn, a.g_ih, a.g_hh), b(gv.b), bhn(gv.bhn), gih(gv.gih), ghh(gv.ghh),
        d_out(ptr_or<T>(s.d_out, static_cast<const T*>(nullptr))),
        // The layer-norm backward's row sums (0 without a norm); its mean-of-gradient terms only when centred.
        on(T(F::kAxis != Axis::kNone)), ci(on * T(a.center[0] != 0)), ch(on * T(a.center[1] != 0)),
        nthreads(max_threads()), PW(4 * G), nslots(kStep ? 1 : nthreads) {
    // dh_rec rows [0, bs[t]) hold dL/dh_t while step t runs; afterwards (GEMM) dL/dh_{t-1}.
    dh_rec = has(s.d_hn) ? s.d_hn->clone() : at::zeros({B0, H}, opts);
    dhr_p = dh_rec.data_ptr<T>();
    // Without kept terms (terms_unused), xi and xh stay null and nothing reads them.
    TORCH_CHECK(s.XI.size(0) == N || (terms_unused<F, C>(a)), "fused GRU/RNN: backward needs the saved gate terms");
    xi_all = s.XI.numel() ? s.XI.data_ptr<T>() : nullptr;
    xh_all = s.XH.numel() ? s.XH.data_ptr<T>() : nullptr;
    out_p = out.data_ptr<T>();
    h0_p = h0.data_ptr<T>();
    st_p = s.stats.data_ptr<T>();
    // Parameter-gradient accumulators: per thread for layer mode (row-parallel), shared (column-exclusive)
    // for batch mode. Layout per slot: db (G), dg_ih (G), dg_hh (G), d(a_h) sums (G; the GRU's n block
    // is db_hn).
    partial.assign(nslots * PW, T(0));
    // Chunks of consecutive steps for the weight-gradient GEMMs.
    int64_t cap = 0;
    chunks_ = sh.grad_chunks(chunk_rows, cap);
    DGH = at::empty({cap, G}, opts);  // dL/d(W_hh h_{t-1}) of the chunk's rows
    DGI = at::empty({cap, G}, opts);  // dL/d(W_ih x_t)
    Hprev = at::empty({cap, H}, opts);
    dgh_p = DGH.data_ptr<T>();
    dgi_p = DGI.data_ptr<T>();
    dW = WeightGrads(w_ih, w_hh);
    dx = need_dx ? at::empty_like(x) : Tensor();
    w_hh_mkl = step_pack<T>(w_hh, false, sh, w_hh_packed);  // dG W_hh's W_hh packed by MKL
  }

  const std::vector<std::pair<int64_t, int64_t>>& chunks() const { return chunks_; }

  // The fused pass of step t: dL/dh_t -> the gate gradients (DGI, DGH rows), the direct part of
  // dL/dh_{t-1}, parameter sums.
  void step(int64_t t, int64_t cbase) {
    Bt = sh.bs[t], o0 = sh.off[t];
    xi = xi_all ? xi_all + o0 * G : nullptr;
    xh = xh_all ? xh_all + o0 * G : nullptr;
    hc = out_p + o0 * H;
    hp = t == 0 ? h0_p : out_p + sh.off[t - 1] * H;
    dout = d_out ? d_out + o0 * H : nullptr;
    dgi = dgi_p + (o0 - cbase) * G;
    dgh = dgh_p + (o0 - cbase) * G;
    if constexpr (kStep) {
      columns(t);
    } else {
      rows();
    }
  }

  // dh_{t-1} for the rows valid at t: the GRU (and zoneout) add to the direct term the pass left
  // there. With a joint gate norm the recurrent term's gradient is the joint term's, in DGI.
  void recurrent(int64_t t, int64_t cbase) {
    Tensor dst = dh_rec.narrow(0, 0, Bt);
    Tensor dg = (joint ? DGI : DGH).narrow(0, o0 - cbase, Bt);
    step_gemm_into<T>(dst, dg, w_hh, w_hh_mkl, w_hh_packed, kGru || bool(zone));
  }

  void weight_grads(int64_t t0, int64_t t1) {
    chunk_weight_grads(sh, t0, t1, x, h0, out, w_ih, joint ? DGI : DGH, DGI, Hprev, dW, dx);
  }

  std::vector<Tensor> gradients() {
    // Reduce the per-thread accumulators.
    const std::vector<T> acc = reduce_slots(partial, nslots, PW);
    Tensor db = vec_tensor(acc, 0, G, opts);
    Tensor dg_ih = vec_tensor(acc, G, G, opts);
    Tensor dg_hh = vec_tensor(acc, 2 * G, G, opts);
    Tensor db_hn = kGru ? vec_tensor(acc, 3 * G + 2 * H, H, opts) : at::empty({0}, opts);
    const auto [dW_ih, dW_hh] = dW.result<T>();
    return {dx, dh_rec, dW_ih, dW_hh, db, db_hn, dg_ih, dg_hh};
  }

 private:
  // One site's row sums of the layer-norm backward, (mean of dy, mean of dy * y) of group a then group b,
  // from the lane sums (a1, a2) and (b1, b2) of the two groups; `cen` drops the first where not centred.
  // A one-group site (the RNN; haste's LayerNormGRU) sums both blocks over all G features, and its group
  // b reads group a's sums.
  void site_sums(bool one, T cen, const Vec<T>& a1, const Vec<T>& a2, const Vec<T>& b1, const Vec<T>& b2, T* out) const {
    if (one) {
      out[0] = out[2] = cen * (hsum(a1) + hsum(b1)) / T(G);
      out[1] = out[3] = on * (hsum(a2) + hsum(b2)) / T(G);
    } else {
      out[0] = cen * hsum(a1) / T(2 * H);
      out[1] = on * hsum(a2) / T(2 * H);
      out[2] = cen * hsum(b1) / T(H);
      out[3] = on * hsum(b2) / T(H);
    }
  }

  // Row-parallel pass (no norm, row statistics). Rows go in groups: per row, the gate gradients dA_i,
  // dA_h (before the gains; parked in the DGI/DGH rows; the GRU's rz blocks of dA_h equal dA_i and are
  // not written) and the row sums of the layer-norm backward; then, column by column over the group, the
  // parameter-gradient sums and the layer-norm backward (-> DGI, DGH rows).
  void rows() {
    at::parallel_for(0, Bt, 8, [&](int64_t b0, int64_t b1) {
      const int64_t tid = at::get_thread_num();
      T* pdb = partial.data() + tid * PW;
      constexpr int64_t RB = 8;
      T rsum[8 * RB], rstd[4 * RB];
      for (int64_t g0 = b0; g0 < b1; g0 += RB) {
        const int64_t g1 = std::min(b1, g0 + RB);
        for (int64_t bb = g0; bb < g1; ++bb) {
          const int64_t r = o0 + bb;
          const int64_t lr = bb - g0;
          // Lane sums of the layer-norm backward: sia1, sia2, sib1, sib2 (ih), sha1, sha2, shb1, shb2 (hh).
          Vec<T> s[8];
          for (int k = 0; k < 8; ++k) s[k] = Vec<T>(T(0));
          if constexpr (kGru) {
            gru_row(bb, s);
          } else {
            rnn_row(bb, s);
          }
          const int64_t rstride = N;
          site_sums(one_ih, ci, s[0], s[1], s[2], s[3], rsum + 8 * lr);
          site_sums(one_hh, ch, s[4], s[5], s[6], s[7], rsum + 8 * lr + 4);
          for (int k = 0; k < 4; ++k) rstd[4 * lr + k] = st_p[k * rstride + r];
        }
        group_columns(g0, g1, pdb, rsum, rstd);
      }
    });
  }

  // The GRU's gate gradients of row bb, and the lane sums s of its layer-norm backward.
  void gru_row(int64_t bb, Vec<T>* s) {
    const T* xir = xi + bb * G;
    const T* xhr = xh + bb * G;
    const T* doutr = dout ? dout + bb * H : nullptr;
    const ZoneRow<T> zr = zone.at<T>(o0 + bb);  // zoneout keep indicators of the row (or none)
    T* dhr = dhr_p + bb * H;
    T* dgir = dgi + bb * G;
    T* dghr = dgh + bb * G;
    Vec<T>&sia1 = s[0], &sia2 = s[1], &sib1 = s[2], &sib2 = s[3], &sha1 = s[4], &sha2 = s[5], &shb1 = s[6], &shb2 = s[7];
    const Vec<T> one(T(1));
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
      if (zr) {  // zoneout: d * dh goes to h_{t-1} directly, (1 - d) * dh to h~
        const Vec<T> dz = zr(j, n) * dh;
        dh -= dz;
        st(dhr + j, fma(dh, zg, dz), n);
      } else {
        st(dhr + j, dh * zg, n);  // direct path to h_{t-1}; the GEMM adds the rest
      }
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
  }

  // The RNN's gate gradients of row bb, and the lane sums s of its layer-norm backward.
  void rnn_row(int64_t bb, Vec<T>* s) {
    const T* xir = xi ? xi + bb * G : nullptr;  // null: not kept (terms_unused)
    const T* xhr = xh ? xh + bb * G : nullptr;
    const T* doutr = dout ? dout + bb * H : nullptr;
    const ZoneRow<T> zr = zone.at<T>(o0 + bb);  // zoneout keep indicators of the row (or none)
    T* dhr = dhr_p + bb * H;
    T* dgir = dgi + bb * G;
    Vec<T>&sia1 = s[0], &sia2 = s[1], &sha1 = s[4], &sha2 = s[5];
    const T* hcr = hc + bb * H;
    for (int64_t j = 0; j < H; j += VS) {
      const int64_t n = std::min(VS, H - j);
      Vec<T> dh = ld(dhr + j, n);
      if (doutr) dh += ld(doutr + j, n);
      Vec<T> hv;
      if (zr) {  // zoneout: d * dh to h_{t-1} directly; h~ recomputed from the saved terms
        const Vec<T> dz = zr(j, n) * dh;
        dh -= dz;
        st(dhr + j, dz, n);
        hv = act(fma(ld(gih + j, n), ld(xir + j, n), fma(ld(ghh + j, n), ld(xhr + j, n), ld(b + j, n))), kRelu_);
      } else {
        hv = ld(hcr + j, n);
      }
      const Vec<T> d = lanes(dh * act_grad(hv, kRelu_), n);
      st(dgir + j, d, n);
      if constexpr (F::kAxis != Axis::kNone) {  // the layer-norm backward's lane sums (no norm: unused, and xi may be null)
        const Vec<T> yi = d * ld(gih + j, n), yh = d * ld(ghh + j, n);
        sia1 += yi;
        sia2 = fma(yi, ld(xir + j, n), sia2);
        sha1 += yh;
        sha2 = fma(yh, ld(xhr + j, n), sha2);
      }
    }
  }

  // Column pass over the group of rows [g0, g1): parameter-gradient sums (in registers across the group's
  // rows) and the backward of the two gate layer norms.
  void group_columns(int64_t g0, int64_t g1, T* pdb, const T* rsum, const T* rstd) {
    T* pdgi = pdb + G;
    T* pdgh = pdgi + G;
    T* pdbh = pdgh + G;
    for (int64_t k = 0; k < sh.K; ++k) {
      const int grp = (kGru && k == 2) ? 1 : 0;  // layer-norm group of block k
      const bool own_dah = kGru && k == 2;  // dA_h differs from dA_i (the n block)
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
          // No kept terms (terms_unused: no norm, no gains): the gain sums and the norm backward use 0. A
          // normalized family always keeps them, so its test folds away at compile time.
          const bool kept = F::kAxis != Axis::kNone || xi;
          const Vec<T> vxi = kept ? ld(xi + bb * G + q, n) : Vec<T>(T(0));
          const Vec<T> vxh = kept ? ld(xh + bb * G + q, n) : Vec<T>(T(0));
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

  // Batch statistics, column-parallel: per chunk of VS hidden units, the gate gradients (pass A) and the
  // gate batch norms' backward (pass C).
  void columns(int64_t t) {
    const bool batch = F::batch_step(training, Bt);
    const T invn = T(1) / T(Bt);
    const int64_t nchunks = (H + VS - 1) / VS;
    at::parallel_for(0, nchunks, 1, [&](int64_t k0, int64_t k1) {
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
        if constexpr (kGru) {
          column_gru(j, n, vgi, vgh, vb, P1, Pi, Ph, Pbh);
        } else {
          column_rnn(j, n, vgi, vgh, vb, P1, Pi, Ph);
        }
        column_gate_norms(t, j, n, batch, invn, vgi, vgh, P1, Pi, Ph, Pbh);
      }
    });
  }

  // Pass A of the GRU for hidden units [j, j + n): gate gradients (DGI rows, DGH's n block) and their sums.
  void column_gru(int64_t j, int64_t n, const Vec<T>* vgi, const Vec<T>* vgh, const Vec<T>* vb, Vec<T>* P1, Vec<T>* Pi,
                  Vec<T>* Ph, Vec<T>& Pbh) {
    const Vec<T> one(T(1));
    const Vec<T> vbhn = ld(bhn + j, n);
    for (int64_t bb = 0; bb < Bt; ++bb) {  // pass A: gate gradients
      const T* xir = xi + bb * G + j;
      const T* xhr = xh + bb * G + j;
      if (bb + kAhead < Bt) {  // this step's first touch of the rows: ask for them kAhead rows on
        const int64_t ra = kAhead * G, rh = (bb + kAhead) * H + j;
        for (int k = 0; k < 3; ++k) {
          prefetch(xir + ra + k * H);
          prefetch(xhr + ra + k * H);
          prefetch_write(dgi + (bb + kAhead) * G + k * H + j);
        }
        prefetch(dhr_p + rh);
        prefetch(hp + rh);
        if (dout) prefetch(dout + rh);
      }
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
      if (zone) {  // zoneout: d * dh goes to h_{t-1} directly, (1 - d) * dh to h~
        const Vec<T> dz = zone.at<T>(o0 + bb)(j, n) * dh;
        dh -= dz;
        st(dhr, fma(dh, zg, dz), n);
      } else {
        st(dhr, dh * zg, n);
      }
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
  }

  // Pass A of the RNN for hidden units [j, j + n): gate gradients (DGI rows) and their sums.
  void column_rnn(int64_t j, int64_t n, const Vec<T>* vgi, const Vec<T>* vgh, const Vec<T>* vb, Vec<T>* P1, Vec<T>* Pi,
                  Vec<T>* Ph) {
    for (int64_t bb = 0; bb < Bt; ++bb) {  // pass A: gate gradients
      if (bb + kAhead < Bt) {  // this step's first touch of the rows: ask for them kAhead rows on
        const int64_t ra = (bb + kAhead) * G + j, rh = (bb + kAhead) * H + j;
        prefetch(xi + ra);
        prefetch(xh + ra);
        prefetch_write(dgi + ra);
        prefetch(dhr_p + rh);
        prefetch(hc + rh);
        if (dout) prefetch(dout + rh);
      }
      Vec<T> dh = ld(dhr_p + bb * H + j, n);
      if (dout) dh += ld(dout + bb * H + j, n);
      Vec<T> hv;
      if (zone) {  // zoneout: d * dh to h_{t-1} directly; h~ recomputed from the saved terms
        const Vec<T> dz = zone.at<T>(o0 + bb)(j, n) * dh;
        dh -= dz;
        st(dhr_p + bb * H + j, dz, n);
        hv = act(fma(vgi[0], ld(xi + bb * G + j, n), fma(vgh[0], ld(xh + bb * G + j, n), vb[0])), kRelu_);
      } else {
        hv = ld(hc + bb * H + j, n);
      }
      const Vec<T> d = lanes(dh * act_grad(hv, kRelu_), n);
      st(dgi + bb * G + j, d, n);
      P1[0] += d;
      Pi[0] = fma(d, ld(xi + bb * G + j, n), Pi[0]);
      Ph[0] = fma(d, ld(xh + bb * G + j, n), Ph[0]);
    }
  }

  // The parameter-gradient sums of hidden units [j, j + n), and pass C: through the two gate batch norms
  // (population statistics: a fixed scale) -> the DGI and DGH rows.
  void column_gate_norms(int64_t t, int64_t j, int64_t n, bool batch, T invn, const Vec<T>* vgi, const Vec<T>* vgh,
                         const Vec<T>* P1, const Vec<T>* Pi, const Vec<T>* Ph, const Vec<T>& Pbh) {
    const T* r_ih = st_p + (0 * Tn + t) * G;
    const T* r_hh = st_p + (1 * Tn + t) * G;
    T* pdb = partial.data();
    T* pdgi = pdb + G;
    T* pdgh = pdgi + G;
    T* pdbh = pdgh + G;
    for (int64_t k = 0; k < sh.K; ++k) {
      const int64_t q = k * H + j;
      st(pdb + q, ld(pdb + q, n) + P1[k], n);
      st(pdgi + q, ld(pdgi + q, n) + Pi[k], n);
      st(pdgh + q, ld(pdgh + q, n) + Ph[k], n);
    }
    if (kGru) st(pdbh + 2 * H + j, ld(pdbh + 2 * H + j, n) + Pbh, n);
    Vec<T> si[3], sgh[3], mi[3], mih[3], mh[3], mhh[3];
    for (int64_t k = 0; k < sh.K; ++k) {
      const int64_t q = k * H + j;
      si[k] = ld(r_ih + q, n) * vgi[k];
      sgh[k] = ld(r_hh + q, n) * vgh[k];
      mi[k] = P1[k] * Vec<T>(ci * invn);
      mih[k] = Pi[k] * Vec<T>(invn);
      mh[k] = ((kGru && k == 2) ? Pbh : P1[k]) * Vec<T>(ch * invn);
      mhh[k] = Ph[k] * Vec<T>(invn);
    }
    for (int64_t bb = 0; bb < Bt; ++bb) {
      const T* xir = xi + bb * G + j;
      const T* xhr = xh + bb * G + j;
      T* dgir = dgi + bb * G + j;
      T* dghr = dgh + bb * G + j;
      if (bb + kAhead < Bt) {
        for (int64_t k = 0; k < sh.K; ++k) prefetch_write(dghr + kAhead * G + k * H);
      }
      for (int64_t k = 0; k < sh.K; ++k) {
        const Vec<T> di = ld(dgir + k * H, n);
        const Vec<T> dh = (kGru && k == 2) ? ld(dghr + k * H, n) : di;
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

  const Tensor &x, &h0, &w_ih, &w_hh, &out;
  const c10::optional<Tensor>& w_hh_packed;
  const ZoneRows& zone;
  const Shape& sh;
  const int64_t H, G, N, B0, Tn;
  const bool one_ih, one_hh, joint, training;
  const at::TensorOptions opts;
  const GateVectors<T> gv;
  const T *b, *bhn, *gih, *ghh;
  const T* d_out;  // dL/d out (null: zero)
  const T on, ci, ch;
  const int64_t nthreads, PW, nslots;  // threads, accumulator slot width, slots
  Tensor dh_rec, DGH, DGI, Hprev, dx;
  WeightGrads dW;
  MklPacked w_hh_mkl;
  T *dhr_p = nullptr, *dgh_p = nullptr, *dgi_p = nullptr;
  const T *xi_all = nullptr, *xh_all = nullptr, *out_p = nullptr, *h0_p = nullptr, *st_p = nullptr;
  std::vector<T> partial;
  std::vector<std::pair<int64_t, int64_t>> chunks_;
  // Step t: rows, saved terms, states, gradient rows.
  int64_t Bt = 0, o0 = 0;
  const T *xi = nullptr, *xh = nullptr, *hc = nullptr, *hp = nullptr, *dout = nullptr;
  T *dgi = nullptr, *dgh = nullptr;
};

// ------------------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------------------

int64_t check_common(const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, int64_t cell) {
  TORCH_CHECK(cell == kGRU || cell == kTanh || cell == kRelu, "fused GRU/RNN: unknown cell ", cell);
  TORCH_CHECK(x.device().is_cpu(), "fused GRU/RNN: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fused GRU/RNN: float32 or float64 only");
  for (const Tensor* t : {&x, &h0, &w_ih, &w_hh}) {
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type(), "fused GRU/RNN: expected contiguous tensors of one dtype");
  }
  constexpr int64_t kBlocks[] = {3, 1, 1};  // gate blocks of H per cell: GRU (r, z, n), RNN (one)
  const int64_t K = kBlocks[cell];
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2 && w_ih.size(1) == x.size(1) && w_hh.size(0) == K * w_hh.size(1) &&
                  w_ih.size(0) == w_hh.size(0),
              "fused GRU/RNN: bad shapes");
  return K;
}

void check_variant(int64_t cell, int64_t family, bool joint, const std::vector<int64_t>& one_group) {
  TORCH_CHECK(one_group.size() == 2, "fused GRU/RNN: one_group needs one flag per site (ih, hh)");
  TORCH_CHECK(!joint || (cell != kGRU && family_axis(family) == Axis::kRow), "fused GRU/RNN: a joint gate norm needs the RNN cell and row statistics");
}

void check_vec(const c10::optional<Tensor>& t, const Tensor& x, int64_t len, const char* what) {
  if (!has(t)) return;
  TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->numel() == len, "fused GRU/RNN: bad ", what);
}

// Sites: input term, recurrent term. `stat` and `center` are the sites' descriptor fields, `pop` their
// population statistics (running mean, running variance, num_batches_tracked per site; read only).
// Returns out, h_n, what backward needs (the two normalized terms and the row or column statistics;
// empty when `save` is false) and the batch moments of a training call with batch statistics, (2, T, 2G).
std::vector<Tensor> forward(const Tensor& x, const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& w_ih,
                            const Tensor& w_hh, const c10::optional<Tensor>& bias, const c10::optional<Tensor>& b_hn,
                            const c10::optional<Tensor>& g_ih, const c10::optional<Tensor>& g_hh, std::vector<c10::optional<Tensor>> pop,
                            int64_t cell, std::vector<int64_t> stat, std::vector<int64_t> center, std::vector<double> eps,
                            bool batch_stats, bool save, int64_t step_offset, int64_t inproj_max, int64_t inproj_rows,
                            const c10::optional<Tensor>& w_hh_packed, bool joint, std::vector<int64_t> one_group,
                            const c10::optional<Tensor>& zone_h) {
  const int64_t K = check_common(x, h0, w_ih, w_hh, cell);
  const int64_t code = family_of(stat, "fused GRU/RNN");
  check_variant(cell, code, joint, one_group);
  const ZoneRows zone(zone_h, x, w_hh.size(1), "fused GRU/RNN");
  Shape sh(batch_sizes_of(batch_sizes, x.size(0), h0.size(0), "fused GRU/RNN"), w_hh.size(1), x.size(1), K, "fused GRU/RNN");
  TORCH_CHECK(x.size(0) == sh.N && h0.dim() == 2 && h0.size(0) == sh.B0 && h0.size(1) == sh.H, "fused GRU/RNN: rows do not match batch_sizes");
  TORCH_CHECK(stat.size() == 2 && center.size() == 2 && eps.size() == 2 && pop.size() == 6, "fused GRU/RNN: bad norm arguments");
  check_vec(bias, x, sh.G, "bias");
  check_vec(b_hn, x, sh.H, "b_hn");
  check_vec(g_ih, x, sh.G, "g_ih");
  check_vec(g_hh, x, sh.G, "g_hh");
  const GruRnnArgs a{x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, w_hh_packed, center, batch_stats, joint, one_group, zone};
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_gru_rnn_forward", [&] {
    with_family(code, [&](auto family) {
      with_cell(cell, [&](auto c) {
        GruRnnForward<scalar_t, decltype(family), decltype(c)::value> k(a, sh, eps, save, step_offset, pop, inproj_max, inproj_rows);
        res = run_forward(k, sh);
      });
    });
  });
  return res;
}

std::vector<Tensor> backward(const c10::optional<Tensor>& d_out, const c10::optional<Tensor>& d_hn, const Tensor& x,
                             const c10::optional<Tensor>& batch_sizes, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                             const c10::optional<Tensor>& bias, const c10::optional<Tensor>& b_hn, const c10::optional<Tensor>& g_ih,
                             const c10::optional<Tensor>& g_hh, const Tensor& out, const Tensor& XI, const Tensor& XH,
                             const Tensor& stats, int64_t cell, std::vector<int64_t> stat, std::vector<int64_t> center,
                             bool batch_stats, bool need_dx, int64_t chunk_rows, const c10::optional<Tensor>& w_hh_packed,
                             bool joint, std::vector<int64_t> one_group, const c10::optional<Tensor>& zone_h) {
  const int64_t K = check_common(x, h0, w_ih, w_hh, cell);
  const int64_t code = family_of(stat, "fused GRU/RNN");
  check_variant(cell, code, joint, one_group);
  const ZoneRows zone(zone_h, x, w_hh.size(1), "fused GRU/RNN");
  TORCH_CHECK(center.size() == 2, "fused GRU/RNN: bad norm arguments");
  Shape sh(batch_sizes_of(batch_sizes, x.size(0), h0.size(0), "fused GRU/RNN"), w_hh.size(1), x.size(1), K, "fused GRU/RNN");
  for (const c10::optional<Tensor>* g : {&d_out, &d_hn}) {
    TORCH_CHECK(!has(*g) || ((*g)->is_contiguous() && (*g)->scalar_type() == x.scalar_type()), "fused GRU/RNN: bad gradient");
  }
  TORCH_CHECK(out.size(0) == sh.N && ((XI.size(0) == sh.N && XH.size(0) == sh.N) || (XI.numel() == 0 && XH.numel() == 0)),
              "fused GRU/RNN: saved tensors do not match batch_sizes");
  const GruRnnArgs a{x, h0, w_ih, w_hh, bias, b_hn, g_ih, g_hh, w_hh_packed, center, batch_stats, joint, one_group, zone};
  const GruRnnSaved saved{d_out, d_hn, out, XI, XH, stats};
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "recnorm_fused_gru_rnn_backward", [&] {
    with_family(code, [&](auto family) {
      with_cell(cell, [&](auto c) {
        GruRnnBackward<scalar_t, decltype(family), decltype(c)::value> k(a, saved, sh, need_dx, chunk_rows);
        res = run_backward(k, sh);
      });
    });
  });
  return res;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recnorm fused CPU GRU / RNN time loop (forward and BPTT backward)";
  // The loops touch no Python object: let other Python threads run meanwhile.
  m.def("forward", &forward, "fused GRU/RNN direction forward", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "fused GRU/RNN direction backward", py::call_guard<py::gil_scoped_release>());
  m.def("running_stats_update", &running_stats_update, "recurrent batch norm: fold a call's batch moments into the running statistics");
  m.def("onednn_available", &dnn_linear_available, "whether mkldnn::_linear_pointwise can be called");
  def_gemm_settings(m);
  m.attr("VERSION") = 4;
}
