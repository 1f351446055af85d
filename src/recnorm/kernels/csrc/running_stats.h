// The running-statistics update of recurrent batch norm (recnorm.nn.norms.RecurrentBatchNorm.record), in one
// call: the same values, bit for bit, as the reference in Python, which is some forty small tensor operations
// per norm and training call (about 0.3 ms each, up to a tenth of a small layer's training step).
//
// Both extensions bind it (running_stats_update); recnorm/kernels/fused.py decides when it serves a call
// (CPU, float32 or float64, no population pass, not traced) and otherwise the reference runs.
//
// What the reference computes, per step k of the call in order (slot s_k = min(step_k, S - 1)):
//   valid_k = count_k >= 2 and the step's moments are finite;
//   the k-th update of its slot weighs f_k = 1 / n_k, or max(momentum, 1 / n_k), n_k the slot's update count
//   including this one (0 for an invalid step);
//   a slot of its own: new = old + f (value - old);
//   the last slot, shared by the steps past it (possibly several per call, applied in order):
//   new = prod_k (1 - f_k) old + sum_k f_k prod_{j > k} (1 - f_j) value_k;
// value being the batch mean, or the biased variance times n / (n - 1). Each product and sum below is rounded
// on its own, as torch's elementwise operations round them (see rounded()); the cumulative sums and products
// accumulate in double, as torch's CPU cumsum and cumprod do for float32; the sum over the shared slot's steps
// is torch's own sum. The tests compare every buffer with the reference, bit for bit
// (tests/kernels/test_running_stats.py).

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// Every product and sum here is rounded on its own, as torch's elementwise operations round them: GCC compiles
// this header's functions without contracting a product and a sum into an FMA (the kernels' own files are
// built with -mfma, and GCC contracts by default); other compilers round each product through a volatile.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
inline T rounded(T x) {
  return x;
}
#else
template <typename T>
inline T rounded(T x) {
  volatile T v = x;
  return v;
}
#endif

template <typename T>
void running_stats_impl(Tensor& rm, Tensor& rv, Tensor& nbt, const Tensor& steps, const Tensor& mean, const Tensor& var,
                        const Tensor& count, double momentum, bool* fin) {
  const int64_t S = rm.size(0), F = rm.size(1), K = steps.size(0);
  const int64_t* st = steps.data_ptr<int64_t>();
  const int64_t* cnt = count.data_ptr<int64_t>();
  const T *mu = mean.data_ptr<T>(), *va = var.data_ptr<T>();
  const int64_t ms = mean.stride(0), vs = var.stride(0);  // rows may be a view's (unit stride within)
  T *rmp = rm.data_ptr<T>(), *rvp = rv.data_ptr<T>();
  int64_t* nb = nbt.data_ptr<int64_t>();

  std::vector<int64_t> slot(K);
  std::vector<char> valid(K), tail(K);
  std::vector<T> ratio(K), f(K), w(K);
  int64_t ntail = 0;
  double cum = 0;  // cumsum of vf * tail (exact: small integers)
  for (int64_t k = 0; k < K; ++k) {
    slot[k] = std::min(st[k], S - 1);
    valid[k] = cnt[k] >= 2 && fin[k];
    tail[k] = slot[k] == S - 1;
    ntail += tail[k];
    const T n = T(std::max<int64_t>(cnt[k], 2));
    ratio[k] = n / (n - T(1));
    const T vf = valid[k] ? T(1) : T(0);
    cum += double(tail[k] ? vf : T(0));
    const T before = T(nb[slot[k]]);
    const T upd = std::max(before + (tail[k] ? T(cum) : vf), T(1));
    f[k] = momentum < 0 ? vf / upd : vf * std::max(T(1) / upd, T(momentum));
  }
  // suffix_k = prod_{j >= k} g_j, g = 1 - f on the shared slot's steps and 1 elsewhere (accumulated in double).
  std::vector<T> suffix(K + 1);
  suffix[K] = T(1);
  double prod = 1;
  for (int64_t k = K - 1; k >= 0; --k) {
    prod *= double(tail[k] ? T(T(1) - f[k]) : T(1));
    suffix[k] = T(prod);
  }
  for (int64_t k = 0; k < K; ++k) w[k] = tail[k] ? rounded(f[k] * suffix[k + 1]) : T(0);
  const T keep = K ? suffix[0] : T(1);

  // The shared slot's sum over the call's steps: torch's sum over all K rows of products (its order of
  // summation; rows of other slots are 0 * value), or, for a call of one step, that step's product.
  std::vector<T> tail_sum(ntail ? F : 0), value(F);
  Tensor prods = ntail && K >= 2 ? at::empty({K, F}, mean.options()) : Tensor();
  for (int s = 0; s < 2; ++s) {  // the running mean, then the running variance
    T* buf = s == 0 ? rmp : rvp;
    auto value_row = [&](int64_t k) {  // the step's value: the batch mean, or the unbiased variance
      if (!valid[k]) {
        std::fill(value.begin(), value.end(), s == 0 ? T(0) : T(1));
      } else if (s == 0) {
        std::copy(mu + k * ms, mu + k * ms + F, value.begin());
      } else {
        const T* vr = va + k * vs;
        for (int64_t j = 0; j < F; ++j) value[j] = rounded(vr[j] * ratio[k]);
      }
    };
    if (ntail && K >= 2) {
      T* pp = prods.data_ptr<T>();
      for (int64_t k = 0; k < K; ++k) {
        value_row(k);
        for (int64_t j = 0; j < F; ++j) pp[k * F + j] = rounded(w[k] * value[j]);
      }
      const Tensor sums = prods.sum(0);
      std::copy(sums.data_ptr<T>(), sums.data_ptr<T>() + F, tail_sum.begin());
    } else if (ntail) {
      value_row(0);
      for (int64_t j = 0; j < F; ++j) tail_sum[j] = rounded(w[0] * value[j]);
    }
    // Slots of their own (every one distinct, and none the shared one: the caller checked).
    for (int64_t k = 0; k < K; ++k) {
      if (tail[k]) continue;
      value_row(k);
      T* row = buf + slot[k] * F;
      const T fk = f[k];
      for (int64_t j = 0; j < F; ++j) row[j] = row[j] + rounded(fk * T(value[j] - row[j]));
    }
    if (ntail) {
      T* row = buf + (S - 1) * F;
      for (int64_t j = 0; j < F; ++j) row[j] = rounded(keep * row[j]) + tail_sum[j];
    }
  }
  for (int64_t k = 0; k < K; ++k) nb[slot[k]] += valid[k];
}

// Folds one call's batch moments (steps (K,), mean and var (K, F), count (K,)) into the running statistics
// rm, rv (S, F) and num_batches_tracked (S,) in place; momentum < 0 stands for None (a cumulative average).
// Returns whether each step's moments were finite (or carried no information: count < 2), and how many were
// not; or -1 for the count, with nothing changed, where two steps share a slot of their own. The caller
// checked dtypes, shapes, devices and contiguity (recnorm/kernels/fused.py).
std::tuple<Tensor, int64_t> running_stats_update(Tensor rm, Tensor rv, Tensor nbt, const Tensor& steps, const Tensor& mean,
                                                 const Tensor& var, const Tensor& count, double momentum) {
  TORCH_CHECK(rm.dim() == 2 && rv.sizes() == rm.sizes() && nbt.dim() == 1 && nbt.size(0) == rm.size(0) && mean.dim() == 2 &&
                  mean.size(1) == rm.size(1) && var.sizes() == mean.sizes() && steps.dim() == 1 && steps.size(0) == mean.size(0) &&
                  count.sizes() == steps.sizes(),
              "running_stats_update: expected buffers (S, F), (S, F), (S,) and moments (K,), (K, F), (K, F), (K,)");
  TORCH_CHECK(rm.scalar_type() == rv.scalar_type() && mean.scalar_type() == rm.scalar_type() && var.scalar_type() == rm.scalar_type() &&
                  nbt.scalar_type() == at::kLong && steps.scalar_type() == at::kLong && count.scalar_type() == at::kLong,
              "running_stats_update: dtypes do not match");
  TORCH_CHECK(rm.is_contiguous() && rv.is_contiguous() && nbt.is_contiguous() && steps.is_contiguous() && count.is_contiguous() &&
                  (mean.stride(1) == 1 || mean.size(1) == 1) && (var.stride(1) == 1 || var.size(1) == 1),
              "running_stats_update: expected contiguous tensors (the moments: contiguous rows)");
  const int64_t K = steps.size(0), F = mean.size(1);
  Tensor finite = at::empty({K}, steps.options().dtype(at::kBool));
  bool* fin = finite.data_ptr<bool>();
  int64_t bad = 0;
  // The reference writes each slot of its own once per call (index_copy_): two steps of the call in one such
  // slot are left to it (-1: nothing done).
  {
    const int64_t S = rm.size(0);
    const int64_t* st = steps.data_ptr<int64_t>();
    std::vector<char> seen(S, 0);
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(st[k] >= 0, "running_stats_update: negative step ", st[k]);
      const int64_t s = std::min(st[k], S - 1);
      if (s == S - 1) continue;
      if (seen[s]) return {finite, -1};
      seen[s] = 1;
    }
  }
  AT_DISPATCH_FLOATING_TYPES(rm.scalar_type(), "running_stats_update", [&] {
    const scalar_t *mu = mean.data_ptr<scalar_t>(), *va = var.data_ptr<scalar_t>();
    const int64_t* cnt = count.data_ptr<int64_t>();
    const scalar_t big = std::numeric_limits<scalar_t>::max();
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t *mr = mu + k * mean.stride(0), *vr = va + k * var.stride(0);
      int nonfinite = 0;  // |x| <= max fails for an inf and a NaN (a comparison and an OR: the loop vectorizes)
      for (int64_t j = 0; j < F; ++j) nonfinite |= int(!(std::abs(mr[j]) <= big)) | int(!(std::abs(vr[j]) <= big));
      fin[k] = !nonfinite || cnt[k] < 2;
      bad += !fin[k];
    }
    running_stats_impl<scalar_t>(rm, rv, nbt, steps, mean, var, count, momentum, fin);
  });
  // In-place writes, as index_copy_ would make them: autograd must see that these tensors changed.
  rm.unsafeGetTensorImpl()->bump_version();
  rv.unsafeGetTensorImpl()->bump_version();
  nbt.unsafeGetTensorImpl()->bump_version();
  return {finite, bad};
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace
