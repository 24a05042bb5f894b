// CUDA kernels of the 3D patch tokenizer. Plain CUDA: no torch headers (see patchify.h).
#include "cuda_compat.h"  // NVFM_LAUNCH, NVFM_DYNAMIC_SMEM (nvcc or the SIMT emulator)
#include "patchify.h"

namespace nvfm {
namespace {

constexpr int kFgThreads = 256;  // threads of token_fg_count_kernel: its tree reduction needs a power of two
static_assert(kFgThreads > 0 && (kFgThreads & (kFgThreads - 1)) == 0, "the reduction halves kFgThreads");

// One block per token; threads stride over the patch voxels and reduce with shared memory.
__global__ void __launch_bounds__(kFgThreads) token_fg_count_kernel(const uint8_t* __restrict__ mask, PatchGeom g,
                                      int32_t* __restrict__ counts) {
  const int t = blockIdx.x;
  const int x0 = (t % g.gx) * g.pw;
  const int y0 = ((t / g.gx) % g.gy) * g.ph;
  const int z0 = (t / (g.gx * g.gy)) * g.pd;
  const int P = g.pd * g.ph * g.pw;
  int local = 0;
  for (int i = threadIdx.x; i < P; i += kFgThreads) {
    const int z = z0 + i / (g.ph * g.pw), y = y0 + (i / g.pw) % g.ph, x = x0 + i % g.pw;
    if (z < g.D && y < g.H && x < g.W) local += mask[((int64_t)z * g.H + y) * g.W + x] != 0;
  }
  __shared__ int partial[kFgThreads];
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int s = kFgThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[t] = partial[0];
}

// Grid-stride over every (token, voxel-in-patch) pair; consecutive threads write consecutive bytes.
template <bool kGather>
__global__ void patch_copy_kernel(const uint8_t* __restrict__ src, PatchGeom g,
                                  const int32_t* __restrict__ coords, int64_t n,
                                  uint8_t* __restrict__ dst) {
  const int P = g.pd * g.ph * g.pw;
  const int64_t total = n * P;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = e / P;
    const int i = (int)(e % P);
    const int z = coords[3 * t] * g.pd + i / (g.ph * g.pw);
    const int y = coords[3 * t + 1] * g.ph + (i / g.pw) % g.ph;
    const int x = coords[3 * t + 2] * g.pw + i % g.pw;
    const bool inside = z >= 0 && y >= 0 && x >= 0 && z < g.D && y < g.H && x < g.W;  // never write outside
    const int64_t v = ((int64_t)z * g.H + y) * g.W + x;
    if (kGather) {
      dst[e] = inside ? src[v] : 0;
    } else if (inside) {
      dst[v] = src[e];
    }
  }
}

int grid_for(int64_t work, int threads) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  return (int)(blocks > 0 ? blocks : 1);
}

}  // namespace

cudaError_t launch_token_fg_count(const uint8_t* mask, PatchGeom g, int32_t* counts, cudaStream_t stream) {
  const int tokens = g.gz * g.gy * g.gx;
  if (tokens == 0) return cudaSuccess;
  NVFM_LAUNCH(tokens, kFgThreads, 0, stream, token_fg_count_kernel)(mask, g, counts);
  return cudaGetLastError();
}

cudaError_t launch_patch_gather(const uint8_t* vol, PatchGeom g, const int32_t* coords, int64_t n,
                                uint8_t* out, cudaStream_t stream) {
  const int64_t work = n * g.pd * g.ph * g.pw;
  if (work == 0) return cudaSuccess;
  NVFM_LAUNCH(grid_for(work, 256), 256, 0, stream, patch_copy_kernel<true>)(vol, g, coords, n, out);
  return cudaGetLastError();
}

cudaError_t launch_patch_scatter(const uint8_t* tokens, PatchGeom g, const int32_t* coords, int64_t n,
                                 uint8_t* vol, cudaStream_t stream) {
  const int64_t work = n * g.pd * g.ph * g.pw;
  if (work == 0) return cudaSuccess;
  NVFM_LAUNCH(grid_for(work, 256), 256, 0, stream, patch_copy_kernel<false>)(tokens, g, coords, n, vol);
  return cudaGetLastError();
}

}  // namespace nvfm
