// Launchers for GAE and KL-penalised GAE: plain pointers and sizes, no torch types, so that gae.cu
// compiles with nvcc alone. bindings.cpp checks the tensors and calls these.
//
// All arrays are fp32, contiguous, row-major (B, T); scores is (B,). Semantics (per row, t = T-1 .. 0,
// next_value = 0, last = 0): where mask[t] != 0, delta = r[t] + gamma * next_value - v[t],
// last = delta + gamma * lam * last, adv[t] = last, next_value = v[t]; where mask[t] == 0 the step is
// skipped (adv[t] = 0, state unchanged). returns = adv + values where mask != 0, else 0.
// KL variant: r[b, t] = -kl_coef * kl(logprobs - ref_logprobs)[b, t] where mask != 0 (else 0), plus scores[b] at the
// last position of row b whose mask is non-zero; estimator 0 = k1 (d), 1 = k2 (d^2 / 2),
// 2 = k3 (exp(-d) - 1 + d), 3 = abs (|d|), as defined in kl_estimators.h. The rewards are written out too.
// Masked positions are selected, never multiplied by the mask: their inputs (even NaN) do not enter any
// output, while NaN or inf at a valid position propagates to it and to every earlier valid position.
#pragma once

#include <cstdint>

namespace rlhf_fast {

// CPU (csrc/gae_cpu.cpp): one row at a time, rows spread over threads with at::parallel_for.
void gae_cpu(const float* rewards, const float* values, const float* mask, float* advantages,
             float* returns, int64_t B, int64_t T, float gamma, float lam);

void kl_penalized_gae_cpu(const float* logprobs, const float* ref_logprobs, const float* values,
                          const float* scores, const float* mask, float* advantages, float* returns,
                          float* rewards, int64_t B, int64_t T, float kl_coef, float gamma, float lam,
                          int estimator);

// CUDA (csrc/gae.cu): one warp per row, a reverse scan of affine maps across lanes. Pointers are device
// pointers; `stream` is a cudaStream_t (void* here so this header needs no CUDA headers). Returns nullptr
// on success, else the CUDA error string of the launch. Asynchronous like any kernel launch.
const char* gae_cuda(const float* rewards, const float* values, const float* mask, float* advantages,
                     float* returns, int64_t B, int64_t T, float gamma, float lam, void* stream);

const char* kl_penalized_gae_cuda(const float* logprobs, const float* ref_logprobs, const float* values,
                                  const float* scores, const float* mask, float* advantages,
                                  float* returns, float* rewards, int64_t B, int64_t T, float kl_coef,
                                  float gamma, float lam, int estimator, void* stream);

}  // namespace rlhf_fast
