// The statistic families the fused kernels serve, and the one place a call's family is asked.
//
// Each family is one header (family.h says what it holds); this list is the only other place that names
// them. The kernels are templated over the family type and read its axis (Axis) and statistics; they
// name no family.

#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "family.h"
#include "family_batch.h"
#include "family_none.h"
#include "family_row.h"

namespace {

template <class... Fs>
struct FamilyList {};

using Families = FamilyList<NoneFamily, RowFamily, StepBatchFamily>;

// f(F{}) for the family F whose code is `code`: its statistics become template arguments once, at the
// entry point, instead of runtime branches in every step of the loop.
template <typename Fn>
void dispatch_family(int64_t code, Fn&&, FamilyList<>) {
  TORCH_CHECK(false, "fused kernels: unknown statistic family ", code);
}

template <typename Fn, class F, class... Rest>
void dispatch_family(int64_t code, Fn&& f, FamilyList<F, Rest...>) {
  if (code == F::kCode) {
    f(F{});
  } else {
    dispatch_family(code, std::forward<Fn>(f), FamilyList<Rest...>{});
  }
}

template <typename Fn>
void with_family(int64_t code, Fn&& f) {
  dispatch_family(code, std::forward<Fn>(f), Families{});
}

template <class... Fs>
constexpr bool is_family(int64_t code, FamilyList<Fs...>) {
  return ((code == Fs::kCode) || ...);
}

// The axis of the family whose code is `code` (an unknown code is an error).
inline Axis family_axis(int64_t code) {
  Axis axis = Axis::kNone;
  with_family(code, [&](auto family) { axis = decltype(family)::kAxis; });
  return axis;
}

// The family every site of a kernel call uses, as its code: the kernels serve calls whose normalized sites
// share one family (the Python side checks; this is the last line of defence).
inline int64_t family_of(const std::vector<int64_t>& stat, const char* what) {
  TORCH_CHECK(!stat.empty(), what, ": no sites");
  for (int64_t s : stat) {
    TORCH_CHECK(is_family(s, Families{}), what, ": unknown statistic ", s);
    TORCH_CHECK(s == stat[0], what, ": every site of a call must use the same statistic family");
  }
  return stat[0];
}

}  // namespace
