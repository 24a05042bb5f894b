// CUDA kernel of the foreground-masked block sampling. Plain CUDA: no torch headers (see blocks.h).
// One thread block per volume, in four phases separated by __syncthreads():
//   1. box-norm distance of every token to its nearest block (IEEE division: __fdiv_rn, so
//      --use_fast_math cannot change a distance and the split equals the reference's);
//   2. rank of each token in the total order (d, key0, index) by counting the tokens before it
//      (O(n^2) per volume, n <= a few thousand after the 20-patch crop); rank < n_sel -> selected;
//   3. the same rank among context tokens by (key1, index): rank < n_drop -> moved to the target
//      (decided for all, then applied after a barrier);
//   4. a block-wide scan of the context flags writes both index lists in ascending order.
#include "cuda_compat.h"  // NVFM_LAUNCH, NVFM_DYNAMIC_SMEM (nvcc or the SIMT emulator)
#include "blocks.h"

namespace nvfm {
namespace {

constexpr int kThreads = 512;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "the compaction counts whole warps");

__device__ __forceinline__ bool before_d(float da, int32_t ka, int a, float db, int32_t kb, int b) {
  return da < db || (da == db && (ka < kb || (ka == kb && a < b)));
}

__global__ void block_masks_kernel(const int32_t* __restrict__ coords, const int32_t* __restrict__ cu,
                                   const int32_t* __restrict__ centres, const int32_t* __restrict__ cu_blocks,
                                   const float* __restrict__ aspects, const int32_t* __restrict__ keys, int64_t N,
                                   const int32_t* __restrict__ counts, const int32_t* __restrict__ cu_ctx,
                                   const int32_t* __restrict__ cu_tgt, float* __restrict__ dist,
                                   uint8_t* __restrict__ flag, int64_t* __restrict__ ctx_index,
                                   int64_t* __restrict__ tgt_index) {
  __shared__ int warp_count[kThreads / 32];
  const int b = blockIdx.x;
  const int64_t s = cu[b];
  const int n = cu[b + 1] - cu[b];
  if (n == 0) return;
  const int k0 = cu_blocks[b], K = cu_blocks[b + 1] - k0;
  const int n_sel = counts[3 * b], n_drop = counts[3 * b + 2];
  const bool sel_target = counts[3 * b + 1] != 0;
  const int32_t* key0 = keys + s;
  const int32_t* key1 = keys + N + s;
  float* d = dist + s;
  uint8_t* f = flag + s;  // 1 = context

  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // 1. distances
    const int32_t* c = coords + 3 * (s + i);
    float best = __int_as_float(0x7f800000);  // +inf
    for (int k = 0; k < K; ++k) {
      float m = 0.f;
#pragma unroll
      for (int a = 0; a < 3; ++a) {
        // in 64 bits, as the CPU kernel: an int32 difference overflows for coordinates 2^31 apart
        const float diff = (float)llabs((long long)c[a] - (long long)centres[3 * (k0 + k) + a]);
        m = fmaxf(m, __fdiv_rn(diff, aspects[3 * (k0 + k) + a]));
      }
      best = fminf(best, m);
    }
    d[i] = best;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {  // 2. selection by rank
    bool sel = n_sel >= n;
    if (n_sel > 0 && n_sel < n) {
      const float di = d[i];
      const int32_t ki = key0[i];
      int rank = 0;
      for (int j = 0; j < n && rank < n_sel; ++j) rank += before_d(d[j], key0[j], j, di, ki, i);
      sel = rank < n_sel;
    }
    f[i] = sel != sel_target;
  }
  __syncthreads();
  if (n_drop > 0) {  // 3. context dropout by rank among the context tokens
    // decisions go to d[i] (free after phase 2) and are applied after the barrier, so f is
    // only read while other threads rank against it
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      bool drop = false;
      if (f[i]) {
        const int32_t ki = key1[i];
        int rank = 0;
        for (int j = 0; j < n && rank < n_drop; ++j) rank += f[j] && (key1[j] < ki || (key1[j] == ki && j < i));
        drop = rank < n_drop;
      }
      d[i] = drop ? 1.f : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      if (d[i] != 0.f) f[i] = 0;
    __syncthreads();
  }
  // 4. compaction: ctx_before(i) = number of context tokens before i, by chunks of blockDim
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int carry = 0;
  for (int base = 0; base < n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool is_ctx = i < n && f[i] == 1;
    const unsigned ballot = __ballot_sync(0xffffffffu, is_ctx);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = carry + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (i < n) {
      if (is_ctx) ctx_index[cu_ctx[b] + before] = s + i;
      else tgt_index[cu_tgt[b] + (i - before)] = s + i;
    }
    carry += total;
    __syncthreads();  // warp_count is reused by the next chunk
  }
}

}  // namespace

cudaError_t launch_block_masks(const int32_t* coords, const int32_t* cu, int B, const int32_t* centres,
                               const int32_t* cu_blocks, const float* aspects, const int32_t* keys, int64_t N,
                               const int32_t* counts, const int32_t* cu_ctx, const int32_t* cu_tgt, float* dist,
                               uint8_t* flag, int64_t* ctx_index, int64_t* tgt_index, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  NVFM_LAUNCH(B, kThreads, 0, stream, block_masks_kernel)(coords, cu, centres, cu_blocks, aspects, keys, N, counts, cu_ctx,
                                                  cu_tgt, dist, flag, ctx_index, tgt_index);
  return cudaGetLastError();
}

}  // namespace nvfm
