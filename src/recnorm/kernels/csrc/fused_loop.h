// The time loop the fused kernels share (fused_lstm.cpp, fused_gru_rnn.cpp).
//
// A kernel is a forward and a backward class, templated over the dtype T and the statistic family F (a type
// from families.h; the GRU/RNN kernel also over the cell), whose member functions are the phases below.
// Inside them the family's axis and the cell are compile-time constants (if constexpr): the choice is made
// once, at the entry point (with_family, families.h), instead of in every step of the loop. A phase that an
// axis or a cell does not need is a branch that compiles away; a pass takes its statistics from F.
//
// Forward, per step t (packed rows [off[t], off[t] + bs[t])):
//   project(t)    the step's row pointers; where the input projection W_ih x is hoisted, the GEMM of the
//                 chunk of steps that starts at t
//   recurrent(t)  the recurrent term h_{t-1} W_hh^T of the step's rows (a GEMM)
//   step(t)       one fused pass: statistics and normalization, gates, state update, output
//   finish(t)     zoneout, and the final states of the sequences whose last step is t
// Backward (BPTT), over chunks [t0, t1] of consecutive steps, last chunk first, last step first:
//   step(t, cbase)       one fused pass: gate gradients, the norms' backward, parameter-gradient sums
//   recurrent(t, cbase)  dh_{t-1} = dG_hh W_hh for the step's rows (a GEMM)
//   weight_grads(t0, t1) dW_ih, dW_hh and dx of the chunk (GEMMs over its rows)

#pragma once

#include <type_traits>
#include <utility>
#include <vector>

#include "families.h"  // the statistic families and with_family
#include "fused_common.h"

namespace {

template <class Forward>
std::vector<Tensor> run_forward(Forward& k, const Shape& sh) {
  for (int64_t t = 0; t < sh.T; ++t) {
    k.project(t);
    k.recurrent(t);
    k.step(t);
    k.finish(t);
  }
  return k.outputs();
}

template <class Backward>
std::vector<Tensor> run_backward(Backward& k, const Shape& sh) {
  for (const auto& chunk : k.chunks()) {
    const int64_t t0 = chunk.first, t1 = chunk.second;
    const int64_t cbase = sh.off[t0];  // first packed row of the chunk: its rows in DGI/DGH start here
    for (int64_t t = t1; t >= t0; --t) {
      k.step(t, cbase);
      k.recurrent(t, cbase);
    }
    k.weight_grads(t0, t1);
  }
  return k.gradients();
}

// H % VS != 0 as a type (kTail: the last vector of a row of H is partial): the row passes compile the
// full-vector case without the tail's bounds.
template <typename F>
void with_tail(bool tail, F&& f) {
  if (tail) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace
