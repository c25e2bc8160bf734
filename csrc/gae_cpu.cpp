// GAE and KL-penalised GAE for CPU tensors: the reverse loop over time, one row per task, rows spread
// over threads. On a CPU the sequential recurrence is the fastest form (one fused multiply-add per step on
// data already in cache); the associative scan in gae.cu / kernels/gae.py exists for the GPU's lanes.
// Semantics: see gae.h. Masked positions are selected out (never multiplied by 0), so NaN or inf
// there does not leak into the outputs, and NaN or inf at a valid position propagates as in the loop.
#include "gae.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace rlhf_fast {
namespace {

template <int ESTIMATOR>
inline float kl_estimate(float d) {
  if constexpr (ESTIMATOR == 0) {
    return d;
  } else if constexpr (ESTIMATOR == 1) {
    return 0.5f * d * d;
  } else if constexpr (ESTIMATOR == 2) {
    return std::expm1(-d) + d;  // exp(-d) - 1 + d without the cancellation of exp(-d) - 1 near d = 0
  } else {
    return std::fabs(d);
  }
}

// One row at a time: ~430 us for B = 64, T = 4096 on one thread here (~4.5 cycles a step, the latency of
// the dependent multiply-add chain). Walking 4 rows in lockstep to overlap 4 chains was tried and measured
// 7x slower (3.1 ms): rows 16 KiB apart fall into the same L1 sets. A transposed tile could still win.
// Roughly 32k elements per task, so short rows are batched and long rows still split across threads.
inline int64_t grain_rows(int64_t T) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1)); }

void gae_row(const float* r, const float* v, const float* m, float* adv, float* ret, int64_t T, float gamma,
             float c) {
  float next_value = 0.f, last = 0.f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float mt = m[t];
    float a = 0.f;
    if (mt != 0.f) {
      const float delta = r[t] + gamma * next_value - v[t];
      last = delta + c * last;
      a = last;
      next_value = v[t];
    }
    adv[t] = a;
    ret[t] = mt != 0.f ? a + v[t] : 0.f;
  }
}

template <int ESTIMATOR>
void kl_gae_row(const float* lp, const float* ref, const float* v, float score, const float* m, float* adv,
                float* ret, float* rew, int64_t T, float kl_coef, float gamma, float c) {
  float next_value = 0.f, last = 0.f;
  bool seen_valid = false;  // a valid position exists after t: the first one met going back gets the score
  for (int64_t t = T - 1; t >= 0; --t) {
    const float mt = m[t];
    float r = 0.f, a = 0.f;
    if (mt != 0.f) {
      r = -kl_coef * kl_estimate<ESTIMATOR>(lp[t] - ref[t]);
      if (!seen_valid) r += score;
      seen_valid = true;
      const float delta = r + gamma * next_value - v[t];
      last = delta + c * last;
      a = last;
      next_value = v[t];
    }
    rew[t] = r;
    adv[t] = a;
    ret[t] = mt != 0.f ? a + v[t] : 0.f;
  }
}

template <int ESTIMATOR>
void kl_gae_rows(const float* lp, const float* ref, const float* v, const float* scores, const float* m,
                 float* adv, float* ret, float* rew, int64_t B, int64_t T, float kl_coef, float gamma,
                 float lam) {
  const float c = gamma * lam;
  at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      kl_gae_row<ESTIMATOR>(lp + o, ref + o, v + o, scores[b], m + o, adv + o, ret + o, rew + o, T, kl_coef,
                            gamma, c);
    }
  });
}

}  // namespace

void gae_cpu(const float* rewards, const float* values, const float* mask, float* advantages, float* returns,
             int64_t B, int64_t T, float gamma, float lam) {
  const float c = gamma * lam;
  at::parallel_for(0, B, grain_rows(T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b * T;
      gae_row(rewards + o, values + o, mask + o, advantages + o, returns + o, T, gamma, c);
    }
  });
}

void kl_penalized_gae_cpu(const float* logprobs, const float* ref_logprobs, const float* values,
                          const float* scores, const float* mask, float* advantages, float* returns,
                          float* rewards, int64_t B, int64_t T, float kl_coef, float gamma, float lam,
                          int estimator) {
  switch (estimator) {
    case 0:
      kl_gae_rows<0>(logprobs, ref_logprobs, values, scores, mask, advantages, returns, rewards, B, T, kl_coef,
                     gamma, lam);
      break;
    case 1:
      kl_gae_rows<1>(logprobs, ref_logprobs, values, scores, mask, advantages, returns, rewards, B, T, kl_coef,
                     gamma, lam);
      break;
    case 2:
      kl_gae_rows<2>(logprobs, ref_logprobs, values, scores, mask, advantages, returns, rewards, B, T, kl_coef,
                     gamma, lam);
      break;
    default:
      kl_gae_rows<3>(logprobs, ref_logprobs, values, scores, mask, advantages, returns, rewards, B, T, kl_coef,
                     gamma, lam);
      break;
  }
}

}  // namespace rlhf_fast
