// 3D patch tokenizer: launchers of the CUDA kernels (defined in patchify_cuda.cu).
// No torch types here: raw pointers, sizes and a stream, so the .cu compiles with plain nvcc.
#pragma once
#include <cstdint>
#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)
#include <cuda_runtime.h>  // launchers exist only in CUDA builds; CPU builds need no CUDA headers
#endif

namespace nvfm {

struct PatchGeom {
  int D, H, W;     // volume shape (voxels)
  int pd, ph, pw;  // patch shape (voxels)
  int gz, gy, gx;  // token grid = ceil(shape / patch)
};

#if defined(__CUDACC__) || defined(NVFM_WITH_CUDA) || defined(NVFM_SIMT)

// counts[t] = number of nonzero mask voxels in patch t (row-major over the grid); padding = 0.
cudaError_t launch_token_fg_count(const uint8_t* mask, PatchGeom g, int32_t* counts, cudaStream_t stream);

// out[i, :] = voxels of the patch at coords[i] = (z, y, x), zero outside the volume.
cudaError_t launch_patch_gather(const uint8_t* vol, PatchGeom g, const int32_t* coords, int64_t n,
                                uint8_t* out, cudaStream_t stream);

// Inverse: vol[patch at coords[i]] = tokens[i, :], voxels outside the volume dropped.
cudaError_t launch_patch_scatter(const uint8_t* tokens, PatchGeom g, const int32_t* coords, int64_t n,
                                 uint8_t* vol, cudaStream_t stream);

#endif  // CUDA

}  // namespace nvfm
