// What a statistic family is to the fused kernels (fused_lstm.cpp, fused_gru_rnn.cpp).
//
// Every norm the kernels run is a standardization, y = (x - mean) * rstd, of a group of values: its
// gain and shift are the cell's parameters, outside the norm. A family says which values form a group
// and where their statistics come from. The kernels' passes depend on one property of it only, the
// axis its statistics reduce over, which decides the shape of a pass:
//
//   Axis::kNone   the identity (no statistics): row-parallel passes that skip the norm;
//   Axis::kRow    over the features of one row (a row group), per example and step: row-parallel passes
//                 that take each row's statistics first, and in backward its row sums;
//   Axis::kBatch  over the rows valid at one step, per feature: column-parallel passes (each chunk of
//                 features independent), with column sums in backward.
//
// A family is a struct with
//   kCode                       its code in the operators' `stat` argument (recnorm/kernels/fused.py,
//                               _FAMILY);
//   kAxis                       the above;
//   kName                       for error messages;
// and the statistics its axis's passes ask for (the axis's contract, checked by family_check below):
//   Axis::kNone and Axis::kRow: group(x, n, center, eps, mean, rstd): the statistics of one row group
//       x[0:n) (mean 0 when not centred; rstd 0 for a degenerate group: it normalizes to 0 and passes no
//       gradient, recnorm.kernels.stats.degenerate_features);
//       optionally group_pair(x, y, n, center_x, center_y, eps_x, eps_y, mean_x, rstd_x, mean_y, rstd_y): two
//       groups' statistics at once, the same values as group() of each (group_pair below falls back to that);
//   Axis::kBatch: Site<T> (one norm site's population statistics and moments output, init(...)),
//       begin_step(site, t, step, batch) -> Step<T> (what the site does at step t: batch or population
//       statistics; with population statistics its rm, rv and eps are the slot's, which the LSTM's eval
//       fold reads), columns(X, stride, rows, cnt, col, step, mean_out, rstd_out) (the statistics of cnt
//       adjacent features over the step's rows), population_rstd(mean, var, eps) (the rstd of a
//       vector of features, Vec<T>, from population statistics: eval folds the norm into an affine map with it), and
//       batch_step(training, rows) (whether a step normalizes with its batch's statistics).
//
// The passes own the derivative: they differentiate y = (x - mean) * rstd as a standardization by the
// group's own mean and variance, dx = rstd (dy - mean(dy) - y mean(dy y)) over the group (row axis; over
// the step's rows on the batch axis), or dx = rstd dy where the statistics are constants (population
// statistics: a step for which batch_step is false). A family is the statistics alone: which values, which
// centring, which eps, which degenerate rule, where population statistics come from.
//
// So a family whose statistics reduce over one of these axes, with that derivative, is one header:
// family_<name>.h with its struct, and its entry in families.h's list (and its code in the Python side's
// _FAMILY). A family over another axis, or with another derivative, needs passes of its own in each kernel.

#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "fused_common.h"

namespace {

enum class Axis { kNone, kRow, kBatch };

// A group (a row group, or a feature over a step's rows) whose variance is zero up to rounding relative to
// its mean is degenerate: it normalizes to exactly 0 and passes no gradient (rstd = 0). The threshold of
// recnorm.kernels.stats.degenerate_features: var <= (16 eps |mean|)^2.
template <typename T>
constexpr T degenerate_tol() {
  return T(16) * std::numeric_limits<T>::epsilon();
}

// What a kernel holds per norm site for family F: the family's Site<T> on the batch axis; nothing on the
// others, whose families need not define one.
template <typename T>
struct NoSite {};

template <class F, typename T, bool = F::kAxis == Axis::kBatch>
struct SiteOf {
  using type = NoSite<T>;
};
template <class F, typename T>
struct SiteOf<F, T, true> {
  using type = typename F::template Site<T>;
};

// The contract above, checked where a kernel is instantiated: a family header missing what its axis's
// passes ask for fails here, with these messages, before the errors from inside the passes.
template <class F, typename T, class = void>
struct HasGroup : std::false_type {};
template <class F, typename T>
struct HasGroup<F, T, std::void_t<decltype(F::group(std::declval<const T*>(), int64_t(0), true, T(0), std::declval<T&>(), std::declval<T&>()))>>
    : std::true_type {};

template <class F, class = void>
struct HasBatchStep : std::false_type {};
template <class F>
struct HasBatchStep<F, std::void_t<decltype(bool(F::batch_step(true, int64_t(0))))>> : std::true_type {};

template <class F, typename T, class = void>
struct HasPopulationRstd : std::false_type {};
template <class F, typename T>
struct HasPopulationRstd<F, T, std::void_t<decltype(Vec<T>(F::population_rstd(Vec<T>(T(0)), Vec<T>(T(0)), T(0))))>>
    : std::true_type {};

template <class F, typename T, class = void>
struct HasSteps : std::false_type {};
template <class F, typename T>
struct HasSteps<F, T,
                std::void_t<decltype(F::columns(std::declval<const T*>(), int64_t(0), int64_t(0), int64_t(0), int64_t(0),
                                                F::begin_step(std::declval<const typename F::template Site<T>&>(), int64_t(0),
                                                              int64_t(0), true),
                                                std::declval<T*>(), std::declval<T*>()))>> : std::true_type {};

// The statistics of two row groups of one size, x[0:n) and y[0:n): the family's group_pair where it has
// one (the same values as group() of each, computed together: RowFamily interleaves the two rows' sums),
// else group() of each.
template <class F, typename T, class = void>
struct HasGroupPair : std::false_type {};
template <class F, typename T>
struct HasGroupPair<F, T,
                    std::void_t<decltype(F::group_pair(std::declval<const T*>(), std::declval<const T*>(), int64_t(0), true, true,
                                                       T(0), T(0), std::declval<T&>(), std::declval<T&>(), std::declval<T&>(),
                                                       std::declval<T&>()))>> : std::true_type {};

template <class F, typename T>
inline void group_pair(const T* x, const T* y, int64_t n, bool center_x, bool center_y, T eps_x, T eps_y, T& mean_x, T& rstd_x,
                       T& mean_y, T& rstd_y) {
  if constexpr (HasGroupPair<F, T>::value) {
    F::group_pair(x, y, n, center_x, center_y, eps_x, eps_y, mean_x, rstd_x, mean_y, rstd_y);
  } else {
    F::group(x, n, center_x, eps_x, mean_x, rstd_x);
    F::group(y, n, center_y, eps_y, mean_y, rstd_y);
  }
}

template <class F, typename T>
constexpr bool family_check() {
  static_assert(std::is_same<std::remove_cv_t<decltype(F::kAxis)>, Axis>::value, "a statistic family needs `static constexpr Axis kAxis`");
  static_assert(std::is_same<std::remove_cv_t<decltype(F::kCode)>, int64_t>::value, "a statistic family needs `static constexpr int64_t kCode`");
  if constexpr (F::kAxis == Axis::kBatch) {
    static_assert(HasBatchStep<F>::value, "a batch-axis family needs `static bool batch_step(bool training, int64_t rows)`");
    static_assert(HasPopulationRstd<F, T>::value, "a batch-axis family needs `static Vec<T> population_rstd(Vec<T> mean, Vec<T> var, T eps)`");
    static_assert(HasSteps<F, T>::value,
                  "a batch-axis family needs `Site<T>`, `begin_step(site, t, step, batch)` returning its Step<T>, and "
                  "`columns(X, stride, rows, cnt, col, step, mean_out, rstd_out)`");
  } else {
    static_assert(HasGroup<F, T>::value,
                  "a family on the row or the none axis needs `static void group(const T* x, int64_t n, bool center, T eps, T& mean, T& rstd)`");
  }
  return true;
}

}  // namespace
