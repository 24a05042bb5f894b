// Kernels that break the rules on purpose, and one that exercises every warp collective: the
// emulator's own tests (tests/test_simt.py::test_emulator_*). Built like the csrc kernels.
#include "../cuda_compat.h"

namespace {

__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + 8 * threadIdx.x;
  o[0] = __shfl_sync(0xffffffffu, lane * 10, 31 - lane);
  o[1] = __shfl_xor_sync(0xffffffffu, lane, 1);
  o[2] = __shfl_up_sync(0xffffffffu, lane, 2);
  o[3] = __shfl_down_sync(0xffffffffu, lane, 2);
  o[4] = (int)__ballot_sync(0xffffffffu, lane % 3 == 0);
  o[5] = __any_sync(0xffffffffu, lane == 7);
  o[6] = __all_sync(0xffffffffu, lane < 31);
  if (lane < 16) o[7] = __shfl_sync(0x0000ffffu, lane, 15 - lane, 16);  // a half-warp group, width 16
  else o[7] = __shfl_sync(0xffff0000u, lane, 0, 16);                     // lane 16 of the other half
  __syncwarp();
}

__global__ void smem_kernel(float* out) {
  NVFM_DYNAMIC_SMEM(float, smem);
  out[threadIdx.x] = smem[threadIdx.x];  // never written: NaN on the emulator
}

__global__ void broken_kernel(int which, int* out) {
  const int lane = threadIdx.x % 32;
  int x = lane;
  switch (which) {
    case 0:  // barriers at two call sites
      if (threadIdx.x < 16) __syncthreads();
      else __syncthreads();
      break;
    case 1:  // thread 0 exits, the others wait
      if (threadIdx.x == 0) return;
      __syncthreads();
      break;
    case 2:  // a shuffle that names an exited lane
      if (lane == 5) return;
      x = __shfl_sync(0xffffffffu, x, 0);
      break;
    case 3:  // a full mask in a partial warp (launched with 48 threads)
      x = __shfl_xor_sync(0xffffffffu, x, 1);
      break;
    case 4:  // one lane at a barrier, its warp in a shuffle that needs it
      if (lane == 3) __syncthreads();
      else x = __shfl_sync(0xffffffffu, x, 3);
      break;
    case 5:  // a source lane outside the mask
      if (lane < 16) x = __shfl_sync(0x0000ffffu, x, 20);
      else x = __shfl_sync(0xffff0000u, x, 20);
      break;
  }
  out[threadIdx.x] = x;
}

}  // namespace

extern "C" int simt_selftest_collectives(int* out) {
  NVFM_LAUNCH(1, 64, 0, nullptr, collectives_kernel)(out);
  return cudaGetLastError();
}

// smem bytes of dynamic shared memory; attr >= 0 sets cudaFuncAttributeMaxDynamicSharedMemorySize first.
extern "C" int simt_selftest_smem(float* out, int smem, int attr, int grid_y) {
  if (attr >= 0 && cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, attr) != cudaSuccess)
    return -1;
  NVFM_LAUNCH(dim3(1, grid_y), 32, smem, nullptr, smem_kernel)(out);
  return cudaGetLastError();
}

extern "C" int simt_selftest_broken(int which, int* out) {
  NVFM_LAUNCH(1, which == 3 ? 48 : 64, 0, nullptr, broken_kernel)(which, out);
  return cudaGetLastError();
}
