// The statistic family "step": recurrent batch norm (Cooijmans et al. 2016), with statistics per time step
// over the rows valid at that step, per feature; the naive horizontal form ("shared": one BatchNorm at
// every step) is the same family with one slot of running statistics. A step normalizes with its batch's
// statistics in training when it has at least 2 rows, and otherwise (eval; a step of one row) with the
// population statistics of its slot.
//
// Kernels never write running statistics. A step that normalizes with batch statistics writes its
// batch mean and biased variance (mean square when not centred) to the call's `moments` output, row t,
// and the Python side folds them into the running averages (running_stats.h); population statistics are
// read from the slot min(step, last slot with num_batches_tracked > 0) as they were when the call started.

#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "family.h"

namespace {

// Population statistics (eval, and training steps with fewer than 2 rows) follow training's rule: a
// feature whose stored variance is zero up to rounding relative to its stored mean normalizes to 0
// (rstd = 0). 32 rather than 16 units of rounding: the stored variance averages updates that were each
// within training's threshold while the mean drifted (docs/eval_statistics.md, rule R2).
template <typename T>
constexpr T population_tol() {
  return T(32) * std::numeric_limits<T>::epsilon();
}

// One site's population statistics and moments output (Site), and what it does at one step (Step).
template <typename T>
struct BNSite {
  const T* rm = nullptr;  // (S, F)
  const T* rv = nullptr;  // (S, F)
  int64_t S = 1;
  int64_t F = 0;
  bool center = true;
  T eps = T(1e-5);
  int64_t last = -1;   // last slot with num_batches_tracked > 0
  T* mo = nullptr;     // moments output: batch means of step t at mo + t * stride
  T* vo = nullptr;     // batch variances
  int64_t stride = 0;

  void init(const Tensor& rm_, const Tensor& rv_, const Tensor& nbt_, bool center_, double eps_, T* mean_out, T* var_out,
            int64_t stride_) {
    rm = rm_.data_ptr<T>();
    rv = rv_.data_ptr<T>();
    S = rm_.size(0);
    F = rm_.size(1);
    center = center_;
    eps = T(eps_);
    last = -1;
    const int64_t* nbt = nbt_.data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s)
      if (nbt[s] > 0) last = s;
    mo = mean_out;
    vo = var_out;
    stride = stride_;
  }
};

// What one BN site does at one step.
template <typename T>
struct BNStep {
  bool batch = false;     // batch statistics vs population statistics
  bool center = true;
  const T* rm = nullptr;  // slot row of the population statistics (population)
  const T* rv = nullptr;
  T* mo = nullptr;        // where the batch moments go (batch)
  T* vo = nullptr;
  T eps = 0;
};

struct StepBatchFamily {
  static constexpr int64_t kCode = 2;
  static constexpr Axis kAxis = Axis::kBatch;
  static constexpr const char* kName = "step";
  template <typename T>
  using Site = BNSite<T>;
  template <typename T>
  using Step = BNStep<T>;

  // Whether a step of `rows` valid rows normalizes with its batch's statistics.
  static bool batch_step(bool training, int64_t rows) { return training && rows >= 2; }

  // What a site does at step t (call step `step`, counting from the first call of a chunked sequence):
  // batch statistics (written to the moments output), or the population statistics of its slot.
  template <typename T>
  static BNStep<T> begin_step(const BNSite<T>& site, int64_t t, int64_t step, bool batch) {
    BNStep<T> s;
    s.batch = batch;
    s.center = site.center;
    s.eps = site.eps;
    if (batch) {
      s.mo = site.mo + t * site.stride;
      s.vo = site.vo + t * site.stride;
    } else {
      const int64_t last = site.last >= 0 ? site.last : site.S - 1;
      const int64_t slot = std::min(step, last);
      s.rm = site.rm + slot * site.F;
      s.rv = site.rv + slot * site.F;
    }
    return s;
  }

  // Statistics of `cnt` adjacent columns (starting at column `col` of the site) over n rows of X (row
  // stride `stride`): batch statistics (written to the moments output) or the slot's population
  // statistics. Writes the mean (0 when not centred) and rstd (0 for a degenerate column) of those columns.
  template <typename T>
  static void columns(const T* X, int64_t stride, int64_t n, int64_t cnt, int64_t col, const BNStep<T>& s, T* mean_out,
                      T* rstd_out) {
    Vec<T> mean, rstd;
    if (s.batch) {
      Vec<T> var;
      if (s.center) {
        const Vec<T> x0 = ld(X, cnt);
        Vec<T> acc(T(0));
        for (int64_t b = 1; b < n; ++b) {  // the step's first touch of these rows: ask for them ahead
          if (b + kAhead < n) prefetch(X + (b + kAhead) * stride);
          acc += ld(X + b * stride, cnt) - x0;
        }
        mean = x0 + acc / Vec<T>(T(n));
        Vec<T> q(T(0));
        for (int64_t b = 0; b < n; ++b) {
          const Vec<T> d = ld(X + b * stride, cnt) - mean;
          q = fma(d, d, q);
        }
        var = q / Vec<T>(T(n));
      } else {
        mean = Vec<T>(T(0));
        Vec<T> q(T(0));
        for (int64_t b = 0; b < n; ++b) {
          if (b + kAhead < n) prefetch(X + (b + kAhead) * stride);
          const Vec<T> d = ld(X + b * stride, cnt);
          q = fma(d, d, q);
        }
        var = q / Vec<T>(T(n));
      }
      const Vec<T> tol = mean * Vec<T>(degenerate_tol<T>());
      const Vec<T> degenerate = var <= tol * tol;
      rstd = Vec<T>::blendv((var + Vec<T>(s.eps)).rsqrt(), Vec<T>(T(0)), degenerate);
      st(s.mo + col, mean, cnt);
      st(s.vo + col, var, cnt);
    } else {
      const Vec<T> rm = ld(s.rm + col, cnt), rv = ld(s.rv + col, cnt);
      mean = s.center ? rm : Vec<T>(T(0));
      const Vec<T> tol = rm * Vec<T>(population_tol<T>());
      rstd = Vec<T>::blendv((rv + Vec<T>(s.eps)).rsqrt(), Vec<T>(T(0)), rv <= tol * tol);
    }
    st(mean_out, mean, cnt);
    st(rstd_out, rstd, cnt);
  }

  // rstd of VS features from their population statistics (0 for a degenerate feature): 1 / sqrt(var + eps),
  // correctly rounded as one feature's scalar sqrt and division would be.
  template <typename T>
  static Vec<T> population_rstd(const Vec<T>& mean, const Vec<T>& var, T eps) {
    const Vec<T> tol = mean * Vec<T>(population_tol<T>());
    return Vec<T>::blendv(Vec<T>(T(1)) / (var + Vec<T>(eps)).sqrt(), Vec<T>(T(0)), var <= tol * tol);
  }
};

}  // namespace
