// GAE and KL-penalised GAE on the GPU: plain CUDA (no torch headers), launched through gae.h.
//
// Formulation. Going back in time, each valid step maps the running advantage `last` affinely:
//   last_t = a_t * last_{t+1} + b_t,  a_t = gamma * lam, b_t = delta_t = r_t + gamma * nv_t - v_t,
// where nv_t is v at the next valid position after t (0 if none); a masked step is the identity
// (a = 1, b = 0). Affine maps compose associatively, (a2, b2) o (a1, b1) = (a2 * a1, a2 * b1 + b2), so a row
// is a reverse scan. nv_t is itself a reverse scan ("first valid value to my right"), done first.
//
// Layout. One warp per row; the row is walked from its end in tiles of 32 lanes x kItems contiguous
// positions, carrying (next value, any valid seen, last) from tile to tile. Within a tile:
//   1. coalesced loads into warp-private shared memory, then each lane reads its kItems positions;
//   2. warp reverse scan (shuffles) of "first valid v" per lane chunk -> each lane's incoming next value;
//   3. each lane composes the affine maps of its chunk sequentially;
//   4. warp reverse scan (shuffles) of the lanes' maps -> each lane's incoming `last`;
//   5. each lane replays its chunk from that state (the plain recurrence), outputs go back through
//      shared memory for coalesced stores.
// NaN/inf propagate as in the sequential loop: masked steps are selected, never multiplied by 0, and
// 0 * NaN in a composition happens only where the loop computes gamma * lam * last with the same NaN.
#include <cuda_runtime.h>

#include <cstdint>

#include "gae.h"
#include "kl_estimators.h"  // kl_estimate<ESTIMATOR>: the one C++ definition of the estimators

namespace rlhf_fast {
namespace {

// ---- device code begins: tests/ops/test_kernels_gae.py compiles from here to "device code ends" on the
// CPU under a warp emulation (32 threads per warp, shuffles through barriers) to check it without a GPU.

constexpr int kWarp = 32;
constexpr int kItems = 16;                     // positions per lane per tile
constexpr int kTile = kWarp * kItems;          // 512 positions per tile
constexpr int kTilePadded = kTile + kTile / kWarp;  // one pad word per 32: conflict-free blocked reads
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

// Shared index of tile position j with one pad word every 32 words: the striped writes (j = i*32 + lane)
// and the blocked reads (j = lane*kItems + i) then hit 32 distinct banks.
__device__ __forceinline__ int pad(int j) { return j + j / kWarp; }

struct Params {
  const float* r;    // rewards (GAE) or logprobs (KL)
  const float* ref;  // ref_logprobs (KL only)
  const float* v;
  const float* m;
  const float* scores;  // (B,) (KL only)
  float* adv;
  float* ret;
  float* rew;  // (KL only)
  int64_t B, T;
  float kl_coef, gamma, lam;
};

// Striped global -> shared for one (B, T) array: lane reads positions i*32 + lane (coalesced).
__device__ __forceinline__ void load_tile(float* s, const float* row, int64_t t0, int64_t T, int lane) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = i * kWarp + lane;
    const int64_t t = t0 + j;
    s[pad(j)] = t < T ? row[t] : 0.f;
  }
}

__device__ __forceinline__ void store_tile(const float* s, float* row, int64_t t0, int64_t T, int lane) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int j = i * kWarp + lane;
    const int64_t t = t0 + j;
    if (t < T) row[t] = s[pad(j)];
  }
}

template <bool KL, int ESTIMATOR>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) gae_fwd_kernel(Params p) {
  constexpr int kBufs = KL ? 4 : 3;
  __shared__ float smem[kWarpsPerBlock][kBufs][kTilePadded];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= p.B) return;  // the whole warp leaves together; nothing below syncs across warps

  float* s_r = smem[warp][0];  // rewards, or logprobs
  float* s_v = smem[warp][1];
  float* s_m = smem[warp][2];
  float* s_ref = smem[warp][kBufs - 1];  // ref_logprobs (KL); aliases s_m when !KL and is then unused
  const int64_t T = p.T;
  const int64_t off = row * T;
  const float gamma = p.gamma;
  const float c = p.gamma * p.lam;
  const float score = KL ? p.scores[row] : 0.f;

  // State entering the current tile from its right.
  float carry_nv = 0.f;       // v at the nearest valid position right of the tile (0 if none)
  bool carry_seen = false;    // a valid position exists right of the tile
  float carry_last = 0.f;     // `last` after the steps right of the tile

  const int64_t n_tiles = (T + kTile - 1) / kTile;
  for (int64_t k = n_tiles - 1; k >= 0; --k) {
    const int64_t t0 = k * kTile;

    // 1. Load (positions past T read as masked).
    load_tile(s_r, p.r + off, t0, T, lane);
    load_tile(s_v, p.v + off, t0, T, lane);
    load_tile(s_m, p.m + off, t0, T, lane);
    if constexpr (KL) load_tile(s_ref, p.ref + off, t0, T, lane);
    __syncwarp();
    float r[kItems], v[kItems], m[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int j = pad(lane * kItems + i);
      v[i] = s_v[j];
      m[i] = s_m[j];
      if constexpr (KL) {
        // the score is added in step 3; masked positions are selected out, never multiplied by 0
        r[i] = m[i] != 0.f ? -p.kl_coef * kl_estimate<ESTIMATOR>(s_r[j] - s_ref[j]) : 0.f;
      } else {
        r[i] = s_r[j];
      }
    }
    __syncwarp();  // every lane has read its inputs: the buffers may now hold outputs

    // 2. First valid v in my chunk, then a reverse scan across lanes: x_l = first valid at or after
    //    lane l's chunk. combine(mine, right) = mine if it has a valid position, else right.
    bool seen = false;
    float first_v = 0.f;
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      if (m[i] != 0.f) {
        seen = true;
        first_v = v[i];
      }
    }
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const bool seen_r = __shfl_down_sync(kFull, static_cast<int>(seen), o) != 0;
      const float v_r = __shfl_down_sync(kFull, first_v, o);
      if (lane + o < kWarp && !seen) {
        seen = seen_r;
        first_v = v_r;
      }
    }
    if (!seen) {  // nothing valid from my chunk to the tile's end: the state from the right applies
      seen = carry_seen;
      first_v = carry_nv;
    }
    // Exclusive: what lies right of my chunk is lane l+1's inclusive value (or the carry for lane 31).
    const bool seen_next = __shfl_down_sync(kFull, static_cast<int>(seen), 1) != 0;
    const float nv_next = __shfl_down_sync(kFull, first_v, 1);
    float nv = lane + 1 < kWarp ? nv_next : carry_nv;
    bool later = lane + 1 < kWarp ? seen_next : carry_seen;
    carry_seen = __shfl_sync(kFull, static_cast<int>(seen), 0) != 0;
    carry_nv = __shfl_sync(kFull, first_v, 0);

    // 3. My chunk's deltas and the composition of its maps, walking back in time.
    float delta[kItems];
    float A = 1.f, Bc = 0.f;
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      delta[i] = 0.f;
      if (m[i] != 0.f) {
        if constexpr (KL) {
          if (!later) r[i] += score;  // the last valid position of the row
        }
        later = true;
        delta[i] = r[i] + gamma * nv - v[i];
        nv = v[i];
        Bc = c * Bc + delta[i];  // step o mine: x -> c * (A * x + Bc) + delta
        A = c * A;
      }
    }

    // 4. Reverse scan of the lanes' maps: afterwards lane l holds the map from the state entering the
    //    tile at its right end to the state at the start of lane l's chunk.
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const float A_r = __shfl_down_sync(kFull, A, o);
      const float B_r = __shfl_down_sync(kFull, Bc, o);
      if (lane + o < kWarp) {
        Bc = A * B_r + Bc;  // mine o right: x -> A * (A_r * x + B_r) + Bc
        A = A * A_r;
      }
    }
    const float A_next = __shfl_down_sync(kFull, A, 1);
    const float B_next = __shfl_down_sync(kFull, Bc, 1);
    float last = lane + 1 < kWarp ? A_next * carry_last + B_next : carry_last;
    const float A0 = __shfl_sync(kFull, A, 0);
    const float B0 = __shfl_sync(kFull, Bc, 0);
    carry_last = A0 * carry_last + B0;

    // 5. Replay my chunk from its incoming state with the plain recurrence; stage outputs in shared
    //    memory (the input buffers, all read in step 1) and store them coalesced.
    float* s_adv = s_r;
    float* s_ret = s_v;
    float* s_rew = s_m;
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      const int j = pad(lane * kItems + i);
      float a = 0.f;
      if (m[i] != 0.f) {
        last = delta[i] + c * last;
        a = last;
      }
      s_adv[j] = a;
      s_ret[j] = m[i] != 0.f ? a + v[i] : 0.f;
      if constexpr (KL) s_rew[j] = r[i];
    }
    __syncwarp();
    store_tile(s_adv, p.adv + off, t0, T, lane);
    store_tile(s_ret, p.ret + off, t0, T, lane);
    if constexpr (KL) store_tile(s_rew, p.rew + off, t0, T, lane);
    __syncwarp();  // the buffers are reloaded by the next tile
  }
}

// ---- device code ends

template <bool KL, int ESTIMATOR>
const char* launch(const Params& p, void* stream) {
  const int64_t blocks = (p.B + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gae_fwd_kernel<KL, ESTIMATOR><<<static_cast<unsigned>(blocks), kWarp * kWarpsPerBlock, 0,
                                  static_cast<cudaStream_t>(stream)>>>(p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* gae_cuda(const float* rewards, const float* values, const float* mask, float* advantages,
                     float* returns, int64_t B, int64_t T, float gamma, float lam, void* stream) {
  if (B == 0 || T == 0) return nullptr;
  Params p{rewards, nullptr, values, mask, nullptr, advantages, returns, nullptr, B, T, 0.f, gamma, lam};
  return launch<false, 0>(p, stream);
}

const char* kl_penalized_gae_cuda(const float* logprobs, const float* ref_logprobs, const float* values,
                                  const float* scores, const float* mask, float* advantages,
                                  float* returns, float* rewards, int64_t B, int64_t T, float kl_coef,
                                  float gamma, float lam, int estimator, void* stream) {
  if (B == 0 || T == 0) return nullptr;
  Params p{logprobs, ref_logprobs, values, mask, scores, advantages, returns, rewards, B, T, kl_coef, gamma,
           lam};
  switch (estimator) {
    case 0: return launch<true, 0>(p, stream);
    case 1: return launch<true, 1>(p, stream);
    case 2: return launch<true, 2>(p, stream);
    case 3: return launch<true, 3>(p, stream);
    default: return "kl_penalized_gae_cuda: estimator must be 0, 1, 2 or 3";
  }
}

}  // namespace rlhf_fast
