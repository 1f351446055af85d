"""A new statistic family on an existing axis is one header (issue 17, item 4).

The kernels' sources are copied, a family header is added beside them with its entry in ``families.h``'s
list, and both kernels are compiled (syntax and template instantiation only, no code generation): every
kernel class is instantiated for the new family at the entry points' dispatch, so a pass that still named a
family, or asked a family for something outside family.h's contract, fails to compile. The families used
hold exactly their axis's contract: batch norm with frozen statistics (every step normalizes with its slot's
population statistics, in training too), on the batch axis, and an RMS-only row norm (no centring whatever
the site asks), on the row axis. A header that misses part of its axis's contract fails with family_check's
message."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

from recnorm.kernels import fused

CSRC = os.path.join(os.path.dirname(fused.__file__), "csrc")
CXX = os.environ.get("CXX", "c++")

FROZEN = """#pragma once
#include "family_batch.h"
namespace {
// Batch norm with frozen statistics: every step normalizes with its slot's population statistics.
struct FrozenBatchFamily : StepBatchFamily {
  static constexpr int64_t kCode = 3;
  static constexpr const char* kName = "frozen";
  static bool batch_step(bool, int64_t) { return false; }
};
}  // namespace
"""

RMS_ONLY = """#pragma once
#include "family_row.h"
namespace {
// Row statistics that never subtract the mean: group() and nothing else, as family.h asks of the row axis.
struct RmsOnlyFamily {
  static constexpr int64_t kCode = 4;
  static constexpr Axis kAxis = Axis::kRow;
  static constexpr const char* kName = "rms_only";
  template <typename T>
  static void group(const T* x, int64_t n, bool, T eps, T& mean, T& rstd) {
    RowFamily::group(x, n, false, eps, mean, rstd);
  }
};
}  // namespace
"""

INCOMPLETE = """#pragma once
#include "family.h"
namespace {
// A batch-axis family without its statistics.
struct FrozenBatchFamily {
  static constexpr int64_t kCode = 3;
  static constexpr Axis kAxis = Axis::kBatch;
  static constexpr const char* kName = "frozen";
  template <typename T>
  using Site = NoSite<T>;
};
}  // namespace
"""

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _sources_with(tmp_path, headers):
    """A copy of the kernels' sources with ``headers`` (``{file name: (struct, text)}``) added and listed."""
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    families = (src / "families.h").read_text()
    listed = "using Families = FamilyList<NoneFamily, RowFamily, StepBatchFamily>;"
    assert listed in families, "families.h's list changed: update this test"
    for name, (struct, text) in headers.items():
        (src / name).write_text(text)
        families = families.replace('#include "family_row.h"\n', f'#include "family_row.h"\n#include "{name}"\n')
        listed, old = listed.replace(">;", f", {struct}>;"), listed
        families = families.replace(old, listed)
    (src / "families.h").write_text(families)
    return src


def _compile(path):
    _, flags = fused.build_flags()
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    cmd = [CXX, "-std=c++17", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=family_check",
           "-DTORCH_API_INCLUDE_EXTENSION_H", *[f for f in flags if f.startswith(("-m", "-D", "-f"))],
           *[f"-I{p}" for p in includes], str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kernel", ["fused_lstm.cpp", "fused_gru_rnn.cpp"])
def test_a_family_on_the_batch_or_the_row_axis_is_one_header(tmp_path, kernel):
    src = _sources_with(tmp_path, {"family_frozen.h": ("FrozenBatchFamily", FROZEN), "family_rms_only.h": ("RmsOnlyFamily", RMS_ONLY)})
    done = _compile(src / kernel)
    assert done.returncode == 0, done.stderr[-4000:]


def test_a_header_missing_its_axis_contract_fails_with_family_checks_message(tmp_path):
    src = _sources_with(tmp_path, {"family_frozen.h": ("FrozenBatchFamily", INCOMPLETE)})
    done = _compile(src / "fused_lstm.cpp")
    assert done.returncode != 0
    assert "a batch-axis family needs" in done.stderr, done.stderr[-4000:]
