// CUDA kernels of varlen attention (FlashAttention-2 structure, fp32 accumulation).
// Plain CUDA: no torch headers (see attention.h).
//
// Every kernel has the same skeleton: a block of 4 warps owns a tile of kRows = 32 rows of
// one (sequence, head) (query rows in the forward and dQ kernels, key rows in the dK/dV
// kernel), 8 rows per warp, and streams tiles of 32 rows of the other side through shared
// memory (fp32, rows padded to D + 1 floats so that lane-per-row reads are bank-conflict
// free). Scores use "lane j owns column j" (a D-long dot product per lane); accumulation uses
// "lane owns head dims lane, lane + 32, ..." with the probabilities broadcast by shuffles.
// Online softmax (running max and sum) keeps the forward's memory linear in the sequence
// length; the backward recomputes probabilities from the saved log-sum-exp, dQ in its own
// pass (no atomics, deterministic) and dK/dV in another.
// This is a plain-FMA kernel (no tensor cores): the correctness-first version. Inputs are
// fp16 or bf16 (fp32 inputs take the SDPA path in nvfm/attention.py); head dim 64 or 128.
#include "cuda_compat.h"  // NVFM_LAUNCH, NVFM_DYNAMIC_SMEM (nvcc or the SIMT emulator)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention.h"
#include "tensor_core.h"

namespace nvfm {
namespace {

constexpr int kRows = 32;      // rows owned per block
constexpr int kCols = 32;      // rows of the streamed tile (one per lane)
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kCols == 32, "lane j owns column j of the streamed tile");
static_assert(kRows == kCols, "load_tile fills kCols rows and also loads the owned kRows-row tiles");
static_assert(kRows % kWarps == 0, "every warp owns kRowsPerWarp whole rows");

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// Copy rows [r0, r0 + n) of one head of a packed (total, H, D) tensor into a padded fp32
// tile (kCols x (D + 1)); rows past n are zero. All threads of the block take part.
template <typename T, int D>
__device__ __forceinline__ void load_tile(float* tile, const T* __restrict__ x, int64_t row0, int n, int H, int h) {
  constexpr int LD = D + 1;
  for (int e = threadIdx.x; e < kCols * D; e += kThreads) {
    const int r = e / D, d = e % D;
    tile[r * LD + d] = r < n ? to_f(x[(row0 + r) * (int64_t)H * D + (int64_t)h * D + d]) : 0.0f;
  }
}

template <int D>
__device__ __forceinline__ float dot_rows(const float* a, const float* b) {
  float s = 0.0f;
#pragma unroll
  for (int d = 0; d < D; ++d) s = fmaf(a[d], b[d], s);
  return s;
}

// grid (ceil(max_q / kRows), H, B): out and lse of 32 query rows of one (sequence, head).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(VarlenAttnArgs a, T* __restrict__ out,
                                                            float* __restrict__ lse) {
  constexpr int LD = D + 1, DPL = D / 32;
  NVFM_DYNAMIC_SMEM(float, smem);
  float* sQ = smem;
  float* sK = sQ + kRows * LD;
  float* sV = sK + kCols * LD;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lq || lk == 0) return;  // out is pre-zeroed and lse pre-filled with -inf
  const int nr = min(kRows, lq - r0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<T, D>(sQ, q, q0 + r0, nr, a.H, h);
  float o[kRowsPerWarp][DPL], m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int t = 0; t < DPL; ++t) o[i][t] = 0.0f;
  }
  for (int c0 = 0; c0 < lk; c0 += kCols) {
    const int nc = min(kCols, lk - c0);
    __syncthreads();  // the previous K/V tile is consumed
    load_tile<T, D>(sK, k, k0 + c0, nc, a.H, h);
    load_tile<T, D>(sV, v, k0 + c0, nc, a.H, h);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      if (r >= nr) continue;  // warp-uniform
      const float s = lane < nc ? dot_rows<D>(sQ + r * LD, sK + lane * LD) * a.scale : -INFINITY;
      const float mnew = fmaxf(m[i], warp_max(s));
      // a row all -inf so far (scores that overflowed): shift by 0, its p are 0 and not exp(-inf + inf) = NaN
      const float p = lane < nc ? __expf(s - (mnew == -INFINITY ? 0.0f : mnew)) : 0.0f;
      const float alpha = m[i] == -INFINITY ? 0.0f : __expf(m[i] - mnew);
      l[i] = l[i] * alpha + warp_sum(p);
      m[i] = mnew;
#pragma unroll
      for (int t = 0; t < DPL; ++t) o[i][t] *= alpha;
      for (int j = 0; j < nc; ++j) {
        const float pj = __shfl_sync(kFull, p, j);
#pragma unroll
        for (int t = 0; t < DPL; ++t) o[i][t] = fmaf(pj, sV[j * LD + lane + 32 * t], o[i][t]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r >= nr) continue;
    const float inv = 1.0f / l[i];
    const int64_t row = (int64_t)(q0 + r0 + r) * a.H * D + (int64_t)h * D;
#pragma unroll
    for (int t = 0; t < DPL; ++t) out[row + lane + 32 * t] = from_f<T>(o[i][t] * inv);
    if (lane == 0) lse[(int64_t)h * a.total_q + q0 + r0 + r] = m[i] + logf(l[i]);
  }
}

// dvec[h, i] = sum_d dout[i, h, d] * out[i, h, d]; one warp per (row, head).
template <typename T, int D>
__global__ void attn_bwd_dvec_kernel(VarlenAttnArgs a, const T* __restrict__ dout, const T* __restrict__ out,
                                     float* __restrict__ dvec) {
  const int64_t n = a.total_q * a.H;
  const int lane = threadIdx.x % 32;
  for (int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / 32; w < n;
       w += (int64_t)gridDim.x * blockDim.x / 32) {
    const int64_t i = w / a.H;
    const int h = (int)(w % a.H);
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) {
      const int64_t e = w * D + d;  // (i, h, d) row-major
      s = fmaf(to_f(dout[e]), to_f(out[e]), s);
    }
    s = warp_sum(s);
    if (lane == 0) dvec[(int64_t)h * a.total_q + i] = s;
  }
}

// grid (ceil(max_q / kRows), H, B): dq of 32 query rows, streaming K/V tiles.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(VarlenAttnArgs a, const T* __restrict__ dout,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ dvec, T* __restrict__ dq) {
  constexpr int LD = D + 1, DPL = D / 32;
  NVFM_DYNAMIC_SMEM(float, smem);
  float* sQ = smem;
  float* sdO = sQ + kRows * LD;
  float* sK = sdO + kRows * LD;
  float* sV = sK + kCols * LD;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lq || lk == 0) return;  // dq is pre-zeroed
  const int nr = min(kRows, lq - r0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<T, D>(sQ, q, q0 + r0, nr, a.H, h);
  load_tile<T, D>(sdO, dout, q0 + r0, nr, a.H, h);
  float acc[kRowsPerWarp][DPL], lrow[kRowsPerWarp], drow[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = min(warp * kRowsPerWarp + i, nr - 1);
    lrow[i] = lse[(int64_t)h * a.total_q + q0 + r0 + r];
    drow[i] = dvec[(int64_t)h * a.total_q + q0 + r0 + r];
#pragma unroll
    for (int t = 0; t < DPL; ++t) acc[i][t] = 0.0f;
  }
  for (int c0 = 0; c0 < lk; c0 += kCols) {
    const int nc = min(kCols, lk - c0);
    __syncthreads();
    load_tile<T, D>(sK, k, k0 + c0, nc, a.H, h);
    load_tile<T, D>(sV, v, k0 + c0, nc, a.H, h);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      if (r >= nr) continue;
      float ds = 0.0f;
      if (lane < nc) {
        const float p = __expf(dot_rows<D>(sQ + r * LD, sK + lane * LD) * a.scale - lrow[i]);
        const float dp = dot_rows<D>(sdO + r * LD, sV + lane * LD);
        ds = p * (dp - drow[i]);
      }
      for (int j = 0; j < nc; ++j) {
        const float dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int t = 0; t < DPL; ++t) acc[i][t] = fmaf(dsj, sK[j * LD + lane + 32 * t], acc[i][t]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r >= nr) continue;
    const int64_t row = (int64_t)(q0 + r0 + r) * a.H * D + (int64_t)h * D;
#pragma unroll
    for (int t = 0; t < DPL; ++t) dq[row + lane + 32 * t] = from_f<T>(acc[i][t] * a.scale);
  }
}

// grid (ceil(max_k / kRows), H, B): dk, dv of 32 key rows, streaming Q/dO tiles.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(VarlenAttnArgs a, const T* __restrict__ dout,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ dvec, T* __restrict__ dk,
                                                                 T* __restrict__ dv) {
  constexpr int LD = D + 1, DPL = D / 32;
  NVFM_DYNAMIC_SMEM(float, smem);
  float* sK = smem;
  float* sV = sK + kRows * LD;
  float* sQ = sV + kRows * LD;
  float* sdO = sQ + kCols * LD;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lk || lq == 0) return;  // dk, dv are pre-zeroed
  const int nr = min(kRows, lk - r0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_tile<T, D>(sK, k, k0 + r0, nr, a.H, h);
  load_tile<T, D>(sV, v, k0 + r0, nr, a.H, h);
  float gk[kRowsPerWarp][DPL], gv[kRowsPerWarp][DPL];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
    for (int t = 0; t < DPL; ++t) gk[i][t] = gv[i][t] = 0.0f;
  for (int c0 = 0; c0 < lq; c0 += kCols) {
    const int nc = min(kCols, lq - c0);
    __syncthreads();
    load_tile<T, D>(sQ, q, q0 + c0, nc, a.H, h);
    load_tile<T, D>(sdO, dout, q0 + c0, nc, a.H, h);
    __syncthreads();
    // lane owns query c0 + lane of this tile
    const float lse_l = lane < nc ? lse[(int64_t)h * a.total_q + q0 + c0 + lane] : 0.0f;
    const float dvec_l = lane < nc ? dvec[(int64_t)h * a.total_q + q0 + c0 + lane] : 0.0f;
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp * kRowsPerWarp + i;
      if (r >= nr) continue;
      float p = 0.0f, ds = 0.0f;
      // lse = -inf: a row the forward did not compute (max_seqlen_q below its length): p = 0
      if (lane < nc && lse_l != -INFINITY) {
        p = __expf(dot_rows<D>(sQ + lane * LD, sK + r * LD) * a.scale - lse_l);
        const float dp = dot_rows<D>(sdO + lane * LD, sV + r * LD);
        ds = p * (dp - dvec_l);
      }
      for (int j = 0; j < nc; ++j) {
        const float pj = __shfl_sync(kFull, p, j), dsj = __shfl_sync(kFull, ds, j);
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
          gv[i][t] = fmaf(pj, sdO[j * LD + lane + 32 * t], gv[i][t]);
          gk[i][t] = fmaf(dsj, sQ[j * LD + lane + 32 * t], gk[i][t]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r >= nr) continue;
    const int64_t row = (int64_t)(k0 + r0 + r) * a.H * D + (int64_t)h * D;
#pragma unroll
    for (int t = 0; t < DPL; ++t) {
      dk[row + lane + 32 * t] = from_f<T>(gk[i][t] * a.scale);
      dv[row + lane + 32 * t] = from_f<T>(gv[i][t]);
    }
  }
}

// ---- tensor-core forward (mma.sync m16n8k16, fp32 accumulators; sm_80+) ----------------------
// grid (ceil(max_q / 64), H, B), 4 warps; warp w owns query rows 16w..16w+15 of the block's 64.
// Key/value tiles of 64 rows stream through two shared-memory buffers filled by cp.async (the
// next tile loads while this one is used). Scores and output live in mma fragments; the C
// fragments of two 8-key n-tiles of P are, converted to T, the A fragment of the next 16-key
// step of P V (FlashAttention-2's register reuse). Same out / lse contract as attn_fwd_kernel,
// so the FMA backward kernels consume its lse.
constexpr int kTcRows = 64, kTcCols = 64, kTcWarps = 4, kTcThreads = 32 * kTcWarps;
static_assert(kTcRows == 16 * kTcWarps, "one 16-row mma tile per warp");
static_assert(kTcRows == kTcCols, "tc_load_tile loads the query tile too");
static_assert(kTcCols % 16 == 0, "P V consumes keys 16 at a time");

// Rows [row0, row0 + n) of one head into a (kTcCols x (D + 8)) tile of T by 16-byte cp.async
// (the 8-element pad puts the 8 rows of an ldmatrix on distinct banks); rows >= n zero-filled.
template <typename T, int D>
__device__ __forceinline__ void tc_load_tile(T* tile, const T* __restrict__ x, int64_t row0, int n, int H, int h) {
  constexpr int LD = D + 8, kChunks = D / 8;
  for (int e = threadIdx.x; e < kTcCols * kChunks; e += kTcThreads) {
    const int r = e / kChunks, c = (e % kChunks) * 8;
    const bool valid = r < n;
    tc::cp_async_16(tile + r * LD + c, x + ((row0 + (valid ? r : 0)) * (int64_t)H + h) * D + c, valid);
  }
}

// Step t of a tile loop streaming two row sets (K/V, or Q/dO) of one head, rows [base, base + L) in
// ntiles tiles of kTcCols, through the double buffers sA and sB (buffer i at i * kTcCols * (D + 8)).
// Issues tile t + 1 of both into buffer (t + 1) & 1 as one cp.async group, then waits for every
// older group. On return, tile t of both row sets (and whatever was committed with or before it)
// has landed in buffer t & 1 for every thread of the block, and tile t + 1's copies are in flight
// into the other buffer. The caller must be done with that other buffer (tile t - 1) before
// step t: a __syncthreads() at the end of each iteration.
template <typename T, int D>
__device__ __forceinline__ void tc_stream_pair(T* sA, T* sB, const T* __restrict__ a_src, const T* __restrict__ b_src,
                                               int base, int L, int t, int ntiles, int H, int h) {
  constexpr int LD = D + 8;
  const int buf = t & 1;
  if (t + 1 < ntiles) {  // prefetch tile t + 1 into the other buffer, then wait for tile t only
    const int c1 = (t + 1) * kTcCols, n1 = min(kTcCols, L - c1);
    tc_load_tile<T, D>(sA + (buf ^ 1) * kTcCols * LD, a_src, base + c1, n1, H, h);
    tc_load_tile<T, D>(sB + (buf ^ 1) * kTcCols * LD, b_src, base + c1, n1, H, h);
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
  } else {
    tc::cp_async_wait<0>();
  }
  __syncthreads();  // every thread's copies of tile t have landed
}

template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads) attn_fwd_tc_kernel(VarlenAttnArgs a, T* __restrict__ out,
                                                                 float* __restrict__ lse) {
  constexpr int LD = D + 8, KS = D / 16, NT = kTcCols / 8, DT = D / 8;
  NVFM_DYNAMIC_SMEM(float, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kTcRows * LD;   // two buffers
  T* sV = sK + 2 * kTcCols * LD;  // two buffers
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kTcRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lq || lk == 0) return;  // out is pre-zeroed and lse pre-filled with -inf
  const int nr = min(kTcRows, lq - r0), ntiles = (lk + kTcCols - 1) / kTcCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  tc_load_tile<T, D>(sQ, q, q0 + r0, nr, a.H, h);
  tc_load_tile<T, D>(sK, k, k0, min(kTcCols, lk), a.H, h);
  tc_load_tile<T, D>(sV, v, k0, min(kTcCols, lk), a.H, h);
  tc::cp_async_commit();
  uint32_t qf[KS][4];
  float o[DT][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dt][e] = 0.0f;
  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    tc_stream_pair<T, D>(sK, sV, k, v, k0, lk, t, ntiles, a.H, h);  // K/V tile t (and Q, with tile 0) landed
    if (t == 0) {
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
        tc::ldmatrix_x4(qf[ks], sQ + (warp * 16 + lane % 8 + (lane / 8) % 2 * 8) * LD + ks * 16 + lane / 16 * 8);
    }
    const T* tK = sK + buf * kTcCols * LD;
    const T* tV = sV + buf * kTcCols * LD;
    const int nc = min(kTcCols, lk - t * kTcCols);
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t kb[2];
        tc::ldmatrix_x2(kb, tK + (nt * 8 + lane % 8) * LD + ks * 16 + (lane / 8) % 2 * 8);
        tc::mma_m16n8k16<T>(s[nt], qf[ks], kb);
      }
    }
    // online softmax on the fragments: this thread holds rows g (e = 0, 1) and g + 8 (e = 2, 3)
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = nt * 8 + 2 * c + (e & 1) < nc ? s[nt][e] * a.scale : -INFINITY;
        s[nt][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // the 4 threads of a quad share a row
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFull, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(kFull, mx[i], 2));
      alpha[i] = m[i] == -INFINITY ? 0.0f : __expf(m[i] - mx[i]);
      m[i] = mx[i];  // -inf only while every score so far overflowed to -inf (shifted by 0 below)
      l[i] *= alpha[i];
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = __expf(s[nt][e] - (m[e >> 1] == -INFINITY ? 0.0f : m[e >> 1]));  // masked keys: exp(-inf) = 0
        l[e >> 1] += s[nt][e];
      }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
#pragma unroll
    for (int j = 0; j < kTcCols / 16; ++j) {
      const uint32_t pa[4] = {tc::pack2(from_f<T>(s[2 * j][0]), from_f<T>(s[2 * j][1])),
                              tc::pack2(from_f<T>(s[2 * j][2]), from_f<T>(s[2 * j][3])),
                              tc::pack2(from_f<T>(s[2 * j + 1][0]), from_f<T>(s[2 * j + 1][1])),
                              tc::pack2(from_f<T>(s[2 * j + 1][2]), from_f<T>(s[2 * j + 1][3]))};
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        uint32_t vb[2];
        tc::ldmatrix_x2_trans(vb, tV + (j * 16 + lane % 8 + (lane / 8) % 2 * 8) * LD + dt * 8);
        tc::mma_m16n8k16<T>(o[dt], pa, vb);
      }
    }
    __syncthreads();  // buffer `buf` is free for the prefetch of tile t + 2
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(kFull, l[i], 1);
    l[i] += __shfl_xor_sync(kFull, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    if (r >= nr) continue;
    const float inv = 1.0f / l[i];
    T* orow = out + ((int64_t)(q0 + r0 + r) * a.H + h) * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      orow[dt * 8 + 2 * c] = from_f<T>(o[dt][2 * i] * inv);
      orow[dt * 8 + 2 * c + 1] = from_f<T>(o[dt][2 * i + 1] * inv);
    }
    if (c == 0) lse[(int64_t)h * a.total_q + q0 + r0 + r] = m[i] + logf(l[i]);
  }
}

template <typename T, int D>
cudaError_t fwd_tc(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream) {
  if (a.B == 0 || a.max_q == 0 || a.total_q == 0) return cudaSuccess;
  const size_t smem = (size_t)(kTcRows + 4 * kTcCols) * (D + 8) * sizeof(T);
  cudaError_t err = cudaFuncSetAttribute(attn_fwd_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((a.max_q + kTcRows - 1) / kTcRows, a.H, a.B);
  NVFM_LAUNCH(grid, kTcThreads, smem, stream, attn_fwd_tc_kernel<T, D>)(a, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

// ---- tensor-core backward: dQ and dK/dV kernels, the forward's structure ------------------------
// dQ: a warp owns 16 query rows (Q, dO fragments held), K/V tiles stream: S = Q K^T, P from the
// saved lse, dP = dO V^T, dS = P (dP - dvec), dQ += dS K. dK/dV: a warp owns 16 key rows (K, V
// fragments held), Q/dO tiles stream and everything is computed transposed, so P^T and dS^T
// come out in C layout and feed the next mma as A fragments: S^T = K Q^T, dV += P^T dO,
// dP^T = V dO^T, dK += dS^T Q. No atomics: deterministic. P and dS are rounded to T for the
// mma, as in FlashAttention-2.

// Fragments of the warp's 16 rows of a (64 x D + 8) tile as mma A operands (ldmatrix.x4).
template <typename T, int D>
__device__ __forceinline__ void tc_load_a(uint32_t (&f)[D / 16][4], const T* tile, int warp, int lane) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    tc::ldmatrix_x4(f[ks], tile + (warp * 16 + lane % 8 + (lane / 8) % 2 * 8) * (D + 8) + ks * 16 + lane / 16 * 8);
}

// acc[nt] = A (16 x D, fragments) times B^T for the 64 rows of `rows` (B = rows^T: n = row, k = dim).
template <typename T, int D>
__device__ __forceinline__ void tc_a_times_rows_t(float (&acc)[kTcCols / 8][4], const uint32_t (&f)[D / 16][4],
                                                  const T* rows, int lane) {
#pragma unroll
  for (int nt = 0; nt < kTcCols / 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t b[2];
      tc::ldmatrix_x2(b, rows + (nt * 8 + lane % 8) * (D + 8) + ks * 16 + (lane / 8) % 2 * 8);
      tc::mma_m16n8k16<T>(acc[nt], f[ks], b);
    }
  }
}

// out[dt] += X (16 x 64, C-layout floats, rounded to T) times the 64 x D tile `rows`.
template <typename T, int D>
__device__ __forceinline__ void tc_c_times_rows(float (&out)[D / 8][4], const float (&x)[kTcCols / 8][4],
                                                const T* rows, int lane) {
#pragma unroll
  for (int j = 0; j < kTcCols / 16; ++j) {
    const uint32_t a[4] = {tc::pack2(from_f<T>(x[2 * j][0]), from_f<T>(x[2 * j][1])),
                           tc::pack2(from_f<T>(x[2 * j][2]), from_f<T>(x[2 * j][3])),
                           tc::pack2(from_f<T>(x[2 * j + 1][0]), from_f<T>(x[2 * j + 1][1])),
                           tc::pack2(from_f<T>(x[2 * j + 1][2]), from_f<T>(x[2 * j + 1][3]))};
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      uint32_t b[2];
      tc::ldmatrix_x2_trans(b, rows + (j * 16 + lane % 8 + (lane / 8) % 2 * 8) * (D + 8) + dt * 8);
      tc::mma_m16n8k16<T>(out[dt], a, b);
    }
  }
}

// Row r (< nr) of the warp's 16: C-layout accumulators times `mul` into dst (T, packed rows).
template <typename T, int D>
__device__ __forceinline__ void tc_store_rows(T* __restrict__ dst, const float (&acc)[D / 8][4], float mul,
                                              int64_t row0, int nr, int H, int h, int warp, int lane) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + lane / 4 + 8 * i;
    if (r >= nr) continue;
    T* row = dst + ((row0 + r) * H + h) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      row[dt * 8 + 2 * (lane % 4)] = from_f<T>(acc[dt][2 * i] * mul);
      row[dt * 8 + 2 * (lane % 4) + 1] = from_f<T>(acc[dt][2 * i + 1] * mul);
    }
  }
}

// grid (ceil(max_q / 64), H, B)
template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dq_tc_kernel(VarlenAttnArgs a, const T* __restrict__ dout,
                                                                    const float* __restrict__ lse,
                                                                    const float* __restrict__ dvec,
                                                                    T* __restrict__ dq) {
  constexpr int LD = D + 8, NT = kTcCols / 8, DT = D / 8;
  NVFM_DYNAMIC_SMEM(float, smem);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kTcRows * LD;
  T* sK = sdO + kTcRows * LD;     // two buffers
  T* sV = sK + 2 * kTcCols * LD;  // two buffers
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kTcRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lq || lk == 0) return;  // dq is pre-zeroed
  const int nr = min(kTcRows, lq - r0), ntiles = (lk + kTcCols - 1) / kTcCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c = lane % 4;
  tc_load_tile<T, D>(sQ, q, q0 + r0, nr, a.H, h);
  tc_load_tile<T, D>(sdO, dout, q0 + r0, nr, a.H, h);
  tc_load_tile<T, D>(sK, k, k0, min(kTcCols, lk), a.H, h);
  tc_load_tile<T, D>(sV, v, k0, min(kTcCols, lk), a.H, h);
  tc::cp_async_commit();
  float lrow[2], drow[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // rows past the sequence or not computed by the forward: p = 0
    const int r = warp * 16 + lane / 4 + 8 * i;
    const float l = r < nr ? lse[(int64_t)h * a.total_q + q0 + r0 + r] : INFINITY;
    lrow[i] = l == -INFINITY ? INFINITY : l;
    drow[i] = r < nr ? dvec[(int64_t)h * a.total_q + q0 + r0 + r] : 0.0f;
  }
  uint32_t qf[D / 16][4], dof[D / 16][4];
  float acc[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[dt][e] = 0.0f;
  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1;
    tc_stream_pair<T, D>(sK, sV, k, v, k0, lk, t, ntiles, a.H, h);  // K/V tile t (and Q, dO, with tile 0) landed
    if (t == 0) {
      tc_load_a<T, D>(qf, sQ, warp, lane);
      tc_load_a<T, D>(dof, sdO, warp, lane);
    }
    const T* tK = sK + buf * kTcCols * LD;
    const T* tV = sV + buf * kTcCols * LD;
    const int nc = min(kTcCols, lk - t * kTcCols);
    float p[NT][4], dp[NT][4];
    tc_a_times_rows_t<T, D>(p, qf, tK, lane);
    tc_a_times_rows_t<T, D>(dp, dof, tV, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = nt * 8 + 2 * c + (e & 1) < nc ? __expf(p[nt][e] * a.scale - lrow[e >> 1]) : 0.0f;
        dp[nt][e] = pe * (dp[nt][e] - drow[e >> 1]);  // dS
      }
    tc_c_times_rows<T, D>(acc, dp, tK, lane);
    __syncthreads();  // buffer `buf` is free for the prefetch of tile t + 2
  }
  tc_store_rows<T, D>(dq, acc, a.scale, q0 + r0, nr, a.H, h, warp, lane);
}

// grid (ceil(max_k / 64), H, B)
template <typename T, int D>
__global__ void __launch_bounds__(kTcThreads) attn_bwd_dkdv_tc_kernel(VarlenAttnArgs a, const T* __restrict__ dout,
                                                                      const float* __restrict__ lse,
                                                                      const float* __restrict__ dvec,
                                                                      T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int LD = D + 8, NT = kTcCols / 8, DT = D / 8;
  NVFM_DYNAMIC_SMEM(float, smem);
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kTcRows * LD;
  T* sQ = sV + kTcRows * LD;       // two buffers
  T* sdO = sQ + 2 * kTcCols * LD;  // two buffers
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kTcRows;
  const int q0 = a.cu_q[b], lq = a.cu_q[b + 1] - q0, k0 = a.cu_k[b], lk = a.cu_k[b + 1] - k0;
  if (r0 >= lk || lq == 0) return;  // dk, dv are pre-zeroed
  const int nr = min(kTcRows, lk - r0), ntiles = (lq + kTcCols - 1) / kTcCols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, c = lane % 4;
  tc_load_tile<T, D>(sK, k, k0 + r0, nr, a.H, h);
  tc_load_tile<T, D>(sV, v, k0 + r0, nr, a.H, h);
  tc_load_tile<T, D>(sQ, q, q0, min(kTcCols, lq), a.H, h);
  tc_load_tile<T, D>(sdO, dout, q0, min(kTcCols, lq), a.H, h);
  tc::cp_async_commit();
  uint32_t kf[D / 16][4], vf[D / 16][4];
  float gk[DT][4], gv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) gk[dt][e] = gv[dt][e] = 0.0f;
  for (int t = 0; t < ntiles; ++t) {
    const int buf = t & 1, c0 = t * kTcCols, nc = min(kTcCols, lq - c0);
    tc_stream_pair<T, D>(sQ, sdO, q, dout, q0, lq, t, ntiles, a.H, h);  // Q/dO tile t (and K, V, with tile 0) landed
    if (t == 0) {
      tc_load_a<T, D>(kf, sK, warp, lane);
      tc_load_a<T, D>(vf, sV, warp, lane);
    }
    const T* tQ = sQ + buf * kTcCols * LD;
    const T* tdO = sdO + buf * kTcCols * LD;
    float pt[NT][4], dpt[NT][4];  // P^T and dP^T: rows = keys, columns = queries
    tc_a_times_rows_t<T, D>(pt, kf, tQ, lane);
    tc_a_times_rows_t<T, D>(dpt, vf, tdO, lane);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * c + (e & 1);
        // lse = -inf: a query the forward did not compute (max_seqlen_q below its length): p = 0
        const float l = col < nc ? lse[(int64_t)h * a.total_q + q0 + c0 + col] : -INFINITY;
        const float pe = l == -INFINITY ? 0.0f : __expf(pt[nt][e] * a.scale - l);
        pt[nt][e] = pe;
        dpt[nt][e] = col < nc ? pe * (dpt[nt][e] - dvec[(int64_t)h * a.total_q + q0 + c0 + col]) : 0.0f;  // dS^T
      }
    tc_c_times_rows<T, D>(gv, pt, tdO, lane);
    tc_c_times_rows<T, D>(gk, dpt, tQ, lane);
    __syncthreads();  // buffer `buf` is free for the prefetch of tile t + 2
  }
  tc_store_rows<T, D>(dk, gk, a.scale, k0 + r0, nr, a.H, h, warp, lane);
  tc_store_rows<T, D>(dv, gv, 1.0f, k0 + r0, nr, a.H, h, warp, lane);
}

// The backward's launch sequence, the same for the FMA and the tensor-core kernels: dvec = rowsum(dO * O)
// by warps, then dQ over query tiles and dK/dV over key tiles of `rows` rows, `threads` threads and
// `smem` bytes of dynamic shared memory each.
template <typename T, int D, typename DqKernel, typename DkdvKernel>
cudaError_t launch_bwd(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse, float* dvec,
                       void* dq, void* dk, void* dv, cudaStream_t stream, DqKernel dq_kernel,
                       DkdvKernel dkdv_kernel, int rows, int threads, size_t smem) {
  if (a.B == 0 || a.total_q == 0 || a.total_k == 0) return cudaSuccess;
  const T* dO = static_cast<const T*>(dout);
  const int64_t warps = a.total_q * a.H;
  int64_t blocks = (warps * 32 + 255) / 256;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  NVFM_LAUNCH((unsigned)blocks, 256, 0, stream, attn_bwd_dvec_kernel<T, D>)(a, dO, static_cast<const T*>(out), dvec);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  if (a.max_q > 0) {
    const dim3 grid((a.max_q + rows - 1) / rows, a.H, a.B);
    NVFM_LAUNCH(grid, threads, smem, stream, dq_kernel)(a, dO, lse, dvec, static_cast<T*>(dq));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (a.max_k > 0) {
    const dim3 grid((a.max_k + rows - 1) / rows, a.H, a.B);
    NVFM_LAUNCH(grid, threads, smem, stream, dkdv_kernel)(a, dO, lse, dvec, static_cast<T*>(dk), static_cast<T*>(dv));
    err = cudaGetLastError();
  }
  return err;
}

template <typename T, int D>
cudaError_t bwd_tc(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse, float* dvec,
                   void* dq, void* dk, void* dv, cudaStream_t stream) {
  const size_t smem = (size_t)(2 * kTcRows + 4 * kTcCols) * (D + 8) * sizeof(T);
  return launch_bwd<T, D>(a, dout, out, lse, dvec, dq, dk, dv, stream, attn_bwd_dq_tc_kernel<T, D>,
                          attn_bwd_dkdv_tc_kernel<T, D>, kTcRows, kTcThreads, smem);
}

template <int D>
constexpr size_t tile_bytes(int tiles) {
  return (size_t)tiles * kRows * (D + 1) * sizeof(float);
}

template <typename T, int D>
cudaError_t fwd(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream) {
  if (a.B == 0 || a.max_q == 0 || a.total_q == 0) return cudaSuccess;
  const size_t smem = tile_bytes<D>(3);
  cudaError_t err = cudaFuncSetAttribute(attn_fwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((a.max_q + kRows - 1) / kRows, a.H, a.B);
  NVFM_LAUNCH(grid, kThreads, smem, stream, attn_fwd_kernel<T, D>)(a, static_cast<T*>(out), lse);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t bwd(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse, float* dvec, void* dq,
                void* dk, void* dv, cudaStream_t stream) {
  return launch_bwd<T, D>(a, dout, out, lse, dvec, dq, dk, dv, stream, attn_bwd_dq_kernel<T, D>,
                          attn_bwd_dkdv_kernel<T, D>, kRows, kThreads, tile_bytes<D>(4));
}

// Dispatch on (dtype, head dim) at run time to the templates.
template <template <typename, int> class F, typename... Args>
cudaError_t dispatch(const VarlenAttnArgs& a, Args... args) {
#define NVFM_ATTN_HEAD(T)                                   \
  switch (a.D) {                                            \
    case 64: return F<T, 64>::run(a, args...);              \
    case 128: return F<T, 128>::run(a, args...);            \
    default: return cudaErrorInvalidValue;                  \
  }
  switch (a.dtype) {
    case AttnDtype::kFloat32: return cudaErrorInvalidValue;  // fp16/bf16 only: keeps the build small
    case AttnDtype::kFloat16: NVFM_ATTN_HEAD(__half)
    case AttnDtype::kBFloat16: NVFM_ATTN_HEAD(__nv_bfloat16)
  }
#undef NVFM_ATTN_HEAD
  return cudaErrorInvalidValue;
}

template <typename T, int D>
struct Fwd {
  static cudaError_t run(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t s) { return fwd<T, D>(a, out, lse, s); }
};
template <typename T, int D>
struct FwdTc {
  static cudaError_t run(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t s) { return fwd_tc<T, D>(a, out, lse, s); }
};
template <typename T, int D>
struct BwdTc {
  static cudaError_t run(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse, float* dvec,
                         void* dq, void* dk, void* dv, cudaStream_t s) {
    return bwd_tc<T, D>(a, dout, out, lse, dvec, dq, dk, dv, s);
  }
};
template <typename T, int D>
struct Bwd {
  static cudaError_t run(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse, float* dvec,
                         void* dq, void* dk, void* dv, cudaStream_t s) {
    return bwd<T, D>(a, dout, out, lse, dvec, dq, dk, dv, s);
  }
};

}  // namespace

bool varlen_attn_cuda_supports_head_dim(int D) { return D == 64 || D == 128; }

cudaError_t launch_varlen_attn_fwd(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream) {
  return dispatch<Fwd>(a, out, lse, stream);
}

cudaError_t launch_varlen_attn_fwd_tc(const VarlenAttnArgs& a, void* out, float* lse, cudaStream_t stream) {
  return dispatch<FwdTc>(a, out, lse, stream);
}

cudaError_t launch_varlen_attn_bwd(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse,
                                   float* dvec, void* dq, void* dk, void* dv, cudaStream_t stream) {
  return dispatch<Bwd>(a, dout, out, lse, dvec, dq, dk, dv, stream);
}

cudaError_t launch_varlen_attn_bwd_tc(const VarlenAttnArgs& a, const void* dout, const void* out, const float* lse,
                                      float* dvec, void* dq, void* dk, void* dv, cudaStream_t stream) {
  return dispatch<BwdTc>(a, dout, out, lse, dvec, dq, dk, dv, stream);
}

}  // namespace nvfm
