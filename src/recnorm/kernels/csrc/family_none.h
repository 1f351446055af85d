// The statistic family "none": no norm. Its passes are the row-parallel ones; a row's statistics are the
// identity's (mean 0, rstd 1), and the LSTM's passes skip the norm altogether (Axis::kNone).

#pragma once

#include "family.h"

namespace {

struct NoneFamily {
  static constexpr int64_t kCode = 0;
  static constexpr Axis kAxis = Axis::kNone;
  static constexpr const char* kName = "none";

  template <typename T>
  static void group(const T*, int64_t, bool, T, T& mean, T& rstd) {
    mean = T(0);
    rstd = T(1);
  }
};

}  // namespace
