// The two spellings where the .cu sources differ between nvcc and the SIMT emulator
// (csrc/simt/simt.h, built with -DNVFM_SIMT by the tests): a kernel launch and a dynamic
// shared-memory array. Each kernel has one source; see csrc/README.md "Kernels on the CPU".
//   NVFM_LAUNCH(grid, block, smem, stream, kernel)(args...)  ==  kernel<<<grid, block, smem, stream>>>(args...)
//   NVFM_DYNAMIC_SMEM(float, smem);                          ==  extern __shared__ float smem[];
#pragma once
#ifdef NVFM_SIMT
#include "simt/simt.h"
#define NVFM_LAUNCH(grid, block, smem, stream, ...) ::simt::launcher(grid, block, smem, stream, __VA_ARGS__)
#define NVFM_DYNAMIC_SMEM(T, name) T* name = ::simt::dynamic_smem<T>()
#else
#include <cuda_runtime.h>
#define NVFM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define NVFM_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif
