// The statistic family "row": layer norm and RMSNorm. A group is one row's features (or a block of them:
// the GRU's (r, z) and n blocks, as the kernel groups them), per example and step; centred (mean and
// biased variance) or not (mean 0 and the mean square), by the site's `center` flag. Training and eval
// compute the same statistics; nothing is carried between steps or calls.

#pragma once

#include <cmath>

#include "family.h"

namespace {

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

// row_moments of two rows x[0:n] and y[0:n] at once: each row's sums in the same order as row_moments's (the
// same values), the two rows' chains interleaved, which doubles the additions in flight.
template <typename T>
inline void row_moments_pair(const T* x, const T* y, int64_t n, T& mean_x, T& var_x, T& mean_y, T& var_y) {
  constexpr int64_t VS = Vec<T>::size();
  const Vec<T> x0(x[0]), y0(y[0]);
  Vec<T> s0(T(0)), s1(T(0)), u0(T(0)), u1(T(0));
  int64_t j = 0;
  for (; j + 2 * VS <= n; j += 2 * VS) {
    s0 += Vec<T>::loadu(x + j) - x0;
    u0 += Vec<T>::loadu(y + j) - y0;
    s1 += Vec<T>::loadu(x + j + VS) - x0;
    u1 += Vec<T>::loadu(y + j + VS) - y0;
  }
  for (; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    s0 += lanes(ld(x + j, c) - x0, c);
    u0 += lanes(ld(y + j, c) - y0, c);
  }
  mean_x = x[0] + hsum(s0 + s1) / T(n);
  mean_y = y[0] + hsum(u0 + u1) / T(n);
  const Vec<T> mx(mean_x), my(mean_y);
  Vec<T> q0(T(0)), q1(T(0)), r0(T(0)), r1(T(0));
  j = 0;
  for (; j + 2 * VS <= n; j += 2 * VS) {
    const Vec<T> d0 = Vec<T>::loadu(x + j) - mx, d1 = Vec<T>::loadu(x + j + VS) - mx;
    const Vec<T> e0 = Vec<T>::loadu(y + j) - my, e1 = Vec<T>::loadu(y + j + VS) - my;
    q0 = fma(d0, d0, q0);
    r0 = fma(e0, e0, r0);
    q1 = fma(d1, d1, q1);
    r1 = fma(e1, e1, r1);
  }
  for (; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    const Vec<T> d = lanes(ld(x + j, c) - mx, c), e = lanes(ld(y + j, c) - my, c);
    q0 = fma(d, d, q0);
    r0 = fma(e, e, r0);
  }
  var_x = hsum(q0 + q1) / T(n);
  var_y = hsum(r0 + r1) / T(n);
}

// Row statistics of a layer norm (centred: mean and biased variance) or of an RMSNorm (mean 0 and the
// mean square).
template <typename T>
inline void row_stats(const T* x, int64_t n, bool center, T& mean, T& var) {
  if (center) {
    row_moments(x, n, mean, var);
    return;
  }
  constexpr int64_t VS = Vec<T>::size();
  Vec<T> q0(T(0)), q1(T(0));
  int64_t j = 0;
  for (; j + 2 * VS <= n; j += 2 * VS) {
    const Vec<T> a = Vec<T>::loadu(x + j), b = Vec<T>::loadu(x + j + VS);
    q0 = fma(a, a, q0);
    q1 = fma(b, b, q1);
  }
  for (; j < n; j += VS) {
    const int64_t c = std::min(VS, n - j);
    const Vec<T> a = lanes(ld(x + j, c), c);
    q0 = fma(a, a, q0);
  }
  mean = T(0);
  var = hsum(q0 + q1) / T(n);
}

// rstd of a row group from its mean and variance; 0 for a degenerate group (var <= (16 eps |mean|)^2).
template <typename T>
inline T ln_rstd(T mean, T var, T eps) {
  const T tol = degenerate_tol<T>() * mean;
  if (var <= tol * tol) return T(0);
  return T(1) / std::sqrt(var + eps);
}

struct RowFamily {
  static constexpr int64_t kCode = 1;
  static constexpr Axis kAxis = Axis::kRow;
  static constexpr const char* kName = "row";

  template <typename T>
  static void group(const T* x, int64_t n, bool center, T eps, T& mean, T& rstd) {
    T var;
    row_stats(x, n, center, mean, var);
    rstd = ln_rstd(mean, var, eps);
  }

  // The statistics of two row groups of one size (group() of each, the same values), computed together.
  template <typename T>
  static void group_pair(const T* x, const T* y, int64_t n, bool center_x, bool center_y, T eps_x, T eps_y, T& mean_x,
                         T& rstd_x, T& mean_y, T& rstd_y) {
    if (!(center_x && center_y)) {
      group(x, n, center_x, eps_x, mean_x, rstd_x);
      group(y, n, center_y, eps_y, mean_y, rstd_y);
      return;
    }
    T var_x, var_y;
    row_moments_pair(x, y, n, mean_x, var_x, mean_y, var_y);
    rstd_x = ln_rstd(mean_x, var_x, eps_x);
    rstd_y = ln_rstd(mean_y, var_y, eps_y);
  }
};

}  // namespace
