// GAE and KL-penalised GAE for CPU tensors: the reverse loop over time, one row at a time, rows spread over
// threads only when the work is large (see for_rows). On a CPU the sequential recurrence is the fastest form
// (one fused multiply-add per step on data already in cache); the associative scan in gae.cu and
// kernels/gae.py exists for the GPU's lanes.
// Semantics: see gae.h. Masked positions are selected out (never multiplied by 0), so NaN or inf
// there does not leak into the outputs, and NaN or inf at a valid position propagates as in the loop.
#include "gae.h"
#include "kl_estimators.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace rlhf_fast {
namespace {

// Threads: at most torch's intra-op count (at::get_num_threads(): torch.set_num_threads(1) makes this serial)
// and one per kMinWorkPerThread elements, so only B x T >= 8.4M (e.g. 1024 x 8192) runs on 2 threads. Measured
// on the shared 2-core build machine (fp32, 10% holes, parallel forced; median wall / process CPU per call,
// the CPU including the OpenMP pool's spin after the region; load average ~2 from other jobs):
//   B x T        1 thread          2 threads
//   8 x 512      0.06 / 0.11 ms    8.4 / 9.4 ms   (the worker waits for a busy core: the collapse)
//   64 x 4096    0.66 / 0.71 ms    0.97 / 4.8 ms
//   256 x 4096   2.9 / 2.8 ms      8.9 / 11.9 ms
//   512 x 8192   11.1 / 10.6 ms    17.0 / 19.9 ms
//   1024 x 8192  46 / 46 ms        56 / 60 ms     (quiet moment: 67 -> 40 ms wall for +18 ms CPU)
// Two threads always cost 2-9 ms more CPU and pay in wall time only on idle cores, so they are kept for
// rows x T where the loss on a busy machine is bounded (~20%) and the gain on an idle one is large (~40%).
constexpr int64_t kMinWorkPerThread = int64_t(1) << 22;
// Rows are claimed in blocks of ~64k elements from a shared counter (not split in fixed halves), so a worker
// descheduled by another process delays only the block it holds. Each row is computed by the same sequential
// code whichever thread takes it: results are bit-identical for any thread count.
constexpr int64_t kClaimElems = int64_t(1) << 16;

template <class Row>
void for_rows(int64_t B, int64_t T, const Row& row) {
  const int64_t threads =
      std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), B, B * T / kMinWorkPerThread});
  if (threads <= 1) {
    for (int64_t b = 0; b < B; ++b) row(b);
    return;
  }
  const int64_t claim = std::max<int64_t>(1, kClaimElems / T);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b0 = next.fetch_add(claim); b0 < B; b0 = next.fetch_add(claim)) {
      for (int64_t b = b0; b < std::min(B, b0 + claim); ++b) row(b);
    }
  });
}

// One row at a time: ~430 us for B = 64, T = 4096 on one thread here (~4.5 cycles a step, the latency of
// the dependent multiply-add chain). Walking 4 rows in lockstep to overlap 4 chains was tried and measured
// 7x slower (3.1 ms): rows 16 KiB apart fall into the same L1 sets. A transposed tile could still win.
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
  for_rows(B, T, [&](int64_t b) {
    const int64_t o = b * T;
    kl_gae_row<ESTIMATOR>(lp + o, ref + o, v + o, scores[b], m + o, adv + o, ret + o, rew + o, T, kl_coef, gamma,
                          c);
  });
}

}  // namespace

void gae_cpu(const float* rewards, const float* values, const float* mask, float* advantages, float* returns,
             int64_t B, int64_t T, float gamma, float lam) {
  const float c = gamma * lam;
  for_rows(B, T, [&](int64_t b) {
    const int64_t o = b * T;
    gae_row(rewards + o, values + o, mask + o, advantages + o, returns + o, T, gamma, c);
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
