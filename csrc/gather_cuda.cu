// CUDA kernel of the training-path token gather. Plain CUDA: no torch headers (see gather.h).
// Grid-stride over (token, element) pairs: consecutive threads write consecutive output
// elements (coalesced stores); reads follow the permuted/flipped voxel order.
#include "cuda_compat.h"  // NVFM_LAUNCH, NVFM_DYNAMIC_SMEM (nvcc or the SIMT emulator)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gather.h"

namespace nvfm {
namespace {

__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// Window level of a stored byte (nvfm.data.expand_window): uint8 output, no table.
__device__ __forceinline__ uint8_t level(int window, uint8_t b) {
  return window == 2 ? (uint8_t)((b >> 4) * 17) : window == 3 ? (uint8_t)((b & 15) * 17) : b;
}

template <typename T>
__global__ void gather_tokens_kernel(const GatherVolume* __restrict__ vols, const int32_t* __restrict__ params,
                                     const int32_t* __restrict__ cu, int B, const int32_t* __restrict__ coords,
                                     int64_t n, const float* __restrict__ table, int pd, int ph, int pw,
                                     T* __restrict__ out) {
  const int patch[3] = {pd, ph, pw};
  const int P = pd * ph * pw;
  const int64_t total = n * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / P;
    const int e = (int)(i % P);
    int lo = 0, hi = B;  // volume b with cu[b] <= t < cu[b + 1]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (cu[mid] <= t) lo = mid; else hi = mid;
    }
    const int32_t* p = params + lo * kGatherParams;
    const GatherVolume v = vols[lo];
    const int dims[3] = {v.D, v.H, v.W};
    const int64_t strides[3] = {(int64_t)v.H * v.W, v.W, 1};
    int tok[3];
    bool flipped[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {  // original token; a flip of output axis k mirrors crop axis perm[k]
      const int a = p[6 + k];
      const int ck = coords[3 * t + k];
      flipped[a] = p[9 + k] != 0;
      tok[a] = p[a] + (flipped[a] ? p[3 + a] - 1 - ck : ck);
    }
    const int pj[3] = {patch[p[13]], patch[p[14]], patch[p[15]]};  // within-token axis j = voxel axis p[13 + j]
    const int ej[3] = {e / (pj[1] * pj[2]), (e / pj[2]) % pj[1], e % pj[2]};
    int64_t off = (int64_t)(p[12] >= 2) * v.D * strides[0];  // blood/bone live in channel 1
    bool inside = true;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      const int a = p[13 + j];
      const int vox = tok[a] * pj[j] + (flipped[a] ? pj[j] - 1 - ej[j] : ej[j]);
      inside = inside && vox >= 0 && vox < dims[a];  // never read outside the volume
      off += (int64_t)vox * strides[a];
    }
    const uint8_t byte = inside ? v.data[off] : 0;
    if constexpr (sizeof(T) == 1) out[i] = level(p[12], byte);  // uint8: levels (padding: level 0)
    else store(out + i, table[256 * p[12] + byte]);
  }
}

}  // namespace

cudaError_t launch_gather_tokens(const GatherVolume* vols, const int32_t* params, const int32_t* cu, int B,
                                 const int32_t* coords, int64_t n, const float* table, int pd, int ph, int pw,
                                 void* out, GatherOut out_type, cudaStream_t stream) {
  const int64_t work = n * pd * ph * pw;
  if (work == 0 || B == 0) return cudaSuccess;
  int64_t blocks = (work + 255) / 256;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  switch (out_type) {
    case GatherOut::kFloat32:
      NVFM_LAUNCH((unsigned)blocks, 256, 0, stream, gather_tokens_kernel<float>)(vols, params, cu, B, coords, n, table, pd, ph,
                                                                        pw, static_cast<float*>(out));
      break;
    case GatherOut::kFloat16:
      NVFM_LAUNCH((unsigned)blocks, 256, 0, stream, gather_tokens_kernel<__half>)(vols, params, cu, B, coords, n, table, pd,
                                                                         ph, pw, static_cast<__half*>(out));
      break;
    case GatherOut::kBFloat16:
      NVFM_LAUNCH((unsigned)blocks, 256, 0, stream, gather_tokens_kernel<__nv_bfloat16>)(
          vols, params, cu, B, coords, n, table, pd, ph, pw, static_cast<__nv_bfloat16*>(out));
      break;
    case GatherOut::kUInt8:
      NVFM_LAUNCH((unsigned)blocks, 256, 0, stream, gather_tokens_kernel<uint8_t>)(vols, params, cu, B, coords, n, table, pd,
                                                                          ph, pw, static_cast<uint8_t*>(out));
      break;
  }
  return cudaGetLastError();
}

}  // namespace nvfm
