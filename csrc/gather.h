// Training-path token gather: launchers of the CUDA kernel (defined in gather_cuda.cu).
// No torch types here: raw pointers, sizes and a stream, so the .cu compiles with plain nvcc.
// Specification: nvfm/gather.py (gather_tokens_reference and the module docstring).
#pragma once
#include <cstdint>
#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)
#include <cuda_runtime.h>  // launchers exist only in CUDA builds; CPU builds need no CUDA headers
#endif

namespace nvfm {

// Per-volume parameters, one row of the (B, kGatherParams) int32 table built by nvfm/gather.py.
constexpr int kGatherParams = 16;  // crop_start[3], crop_size[3], perm[3], flip[3], window, patch_perm[3]
// kUInt8: the raw window level (nvfm.data.expand_window: CT nibbles expanded x 17), no table.
enum class GatherOut : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kUInt8 = 3 };

struct GatherVolume {
  const uint8_t* data;  // channel 0 of (C, D, H, W) uint8, contiguous
  int32_t C, D, H, W;
};

#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)

// out[i, e] = table[window][byte] of element e of token i (see gather.py), tokens of volume b
// at rows cu[b]:cu[b+1]; kUInt8 writes the window level instead (table unused, may be null).
// vols, params, cu, coords, table are device pointers.
cudaError_t launch_gather_tokens(const GatherVolume* vols, const int32_t* params, const int32_t* cu, int B,
                                 const int32_t* coords, int64_t n, const float* table, int pd, int ph, int pw,
                                 void* out, GatherOut out_type, cudaStream_t stream);

#endif  // CUDA

}  // namespace nvfm
