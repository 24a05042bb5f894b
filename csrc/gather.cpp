// Training-path token gather: tensor handling, the C++ CPU kernel, torch.library registration.
// Reference (the specification): nvfm/gather.py. CUDA kernel: gather_cuda.cu.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "gather.h"

#ifdef NVFM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace nvfm {
namespace {

constexpr int kWindowChannel[4] = {0, 0, 1, 1};  // mr, brain -> channel 0; blood, bone -> channel 1

void check_args(at::TensorList volumes, const at::Tensor& coords, const at::Tensor& cu, const at::Tensor& params,
                const at::Tensor& table, at::IntArrayRef patch, at::ScalarType dtype) {
  const int64_t B = volumes.size();
  TORCH_CHECK(patch.size() == 3 && patch[0] > 0 && patch[1] > 0 && patch[2] > 0, "patch must be 3 positive sizes");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "gather_tokens writes float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(coords.scalar_type() == at::kInt && coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "coords must be contiguous (N, 3) int32");
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == B + 1, "cu_seqlens must be int32 (B + 1)");
  TORCH_CHECK(params.scalar_type() == at::kInt && params.dim() == 2 && params.size(0) == B &&
              params.size(1) == kGatherParams && params.is_contiguous(), "params must be contiguous (B, 16) int32");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) == 4 && table.size(1) == 256 &&
              table.is_contiguous(), "table must be contiguous (4, 256) float32");
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& v = volumes[b];
    TORCH_CHECK(v.scalar_type() == at::kByte && v.dim() == 4 && v.is_contiguous(),
                "volume ", b, " must be contiguous uint8 (C, D, H, W), got ", v.scalar_type(), " ", v.sizes());
    TORCH_CHECK(v.device() == coords.device(), "volume ", b, " is on ", v.device(), ", coords on ", coords.device());
  }
}

// Host-side validation of one volume's parameters against its shape (cheap; the CUDA path
// relies on nvfm/gather.py having run the same checks on the coordinates).
void check_volume(const at::Tensor& v, const int32_t* p, at::IntArrayRef patch, int64_t b) {
  TORCH_CHECK(p[12] >= 0 && p[12] < 4, "volume ", b, ": window index ", p[12], " not in 0..3");
  TORCH_CHECK(v.size(0) > kWindowChannel[p[12]], "volume ", b, ": window ", p[12], " needs channel ",
              kWindowChannel[p[12]], " but the volume has ", v.size(0));
  for (int o : {6, 13})
    TORCH_CHECK(p[o] != p[o + 1] && p[o] != p[o + 2] && p[o + 1] != p[o + 2] && p[o] >= 0 && p[o] < 3 &&
                p[o + 1] >= 0 && p[o + 1] < 3 && p[o + 2] >= 0 && p[o + 2] < 3,
                "volume ", b, ": perm and patch_perm must be permutations of 0, 1, 2");
  for (int a = 0; a < 3; ++a) {
    const int64_t grid = (v.size(1 + a) + patch[a] - 1) / patch[a];
    TORCH_CHECK(p[a] >= 0 && p[3 + a] >= 1 && p[a] + p[3 + a] <= grid, "volume ", b, ": crop axis ", a, " start ",
                p[a], " size ", p[3 + a], " outside the token grid (", grid, ")");
  }
}

template <typename T>
void gather_cpu(at::TensorList volumes, const int32_t* coords, const int32_t* cu, const int32_t* params,
                const float* table, at::IntArrayRef patch, int64_t B, T* out) {
  const int64_t n = cu[B], P = patch[0] * patch[1] * patch[2];
  at::parallel_for(0, n, 16, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> off[3];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = std::upper_bound(cu, cu + B + 1, (int32_t)t) - cu - 1;
      const int32_t* p = params + b * kGatherParams;
      const at::Tensor& vol = volumes[b];
      const int64_t dims[3] = {vol.size(1), vol.size(2), vol.size(3)};
      const int64_t strides[3] = {dims[1] * dims[2], dims[2], 1};
      const uint8_t* src = vol.data_ptr<uint8_t>() + kWindowChannel[p[12]] * dims[0] * dims[1] * dims[2];
      const float* lut = table + 256 * p[12];
      // original token of this output token; a flip of output axis k mirrors crop axis perm[k]
      int64_t tok[3];
      bool flipped[3];
      for (int k = 0; k < 3; ++k) {
        const int a = p[6 + k];
        flipped[a] = p[9 + k] != 0;
        tok[a] = p[a] + (flipped[a] ? p[3 + a] - 1 - coords[3 * t + k] : coords[3 * t + k]);
      }
      // offset of index e along within-token axis j (voxel axis patch_perm[j]), -1 in the padding
      for (int j = 0; j < 3; ++j) {
        const int a = p[13 + j];
        const int64_t pk = patch[a];
        off[j].resize(pk);
        for (int64_t e = 0; e < pk; ++e) {
          const int64_t vox = tok[a] * pk + (flipped[a] ? pk - 1 - e : e);
          off[j][e] = vox < dims[a] ? vox * strides[a] : -1;
        }
      }
      T* dst = out + t * P;
      const float zero = lut[0];
      for (size_t e0 = 0; e0 < off[0].size(); ++e0)
        for (size_t e1 = 0; e1 < off[1].size(); ++e1) {
          const bool inside = off[0][e0] >= 0 && off[1][e1] >= 0;
          const uint8_t* line = src + off[0][e0] + off[1][e1];
          for (size_t e2 = 0; e2 < off[2].size(); ++e2, ++dst)
            *dst = static_cast<T>(inside && off[2][e2] >= 0 ? lut[line[off[2][e2]]] : zero);
        }
    }
  });
}

at::Tensor gather_tokens_cpu(at::TensorList volumes, const at::Tensor& coords, const at::Tensor& cu,
                             const at::Tensor& params, const at::Tensor& table, at::IntArrayRef patch,
                             at::ScalarType dtype) {
  check_args(volumes, coords, cu, params, table, patch, dtype);
  const int64_t B = volumes.size(), P = patch[0] * patch[1] * patch[2];
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* p = params.data_ptr<int32_t>();
  const int32_t* xyz = coords.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && c[B] == coords.size(0), "cu_seqlens must run from 0 to N = ", coords.size(0));
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] >= c[b], "cu_seqlens must be non-decreasing");
    check_volume(volumes[b], p + b * kGatherParams, patch, b);
    for (int64_t t = c[b]; t < c[b + 1]; ++t)
      for (int k = 0; k < 3; ++k)
        TORCH_CHECK(xyz[3 * t + k] >= 0 && xyz[3 * t + k] < p[b * kGatherParams + 3 + p[b * kGatherParams + 6 + k]],
                    "volume ", b, ": token ", t, " coordinate outside the output grid");
  }
  at::Tensor out = at::empty({coords.size(0), P}, coords.options().dtype(dtype));
  const float* lut = table.data_ptr<float>();
  if (dtype == at::kFloat) gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<float>());
  else if (dtype == at::kHalf) gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<at::Half>());
  else gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<at::BFloat16>());
  return out;
}

#ifdef NVFM_WITH_CUDA
at::Tensor gather_tokens_cuda(at::TensorList volumes, const at::Tensor& coords, const at::Tensor& cu,
                              const at::Tensor& params, const at::Tensor& table, at::IntArrayRef patch,
                              at::ScalarType dtype) {
  check_args(volumes, coords, cu, params, table, patch, dtype);
  c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = volumes.size(), P = patch[0] * patch[1] * patch[2];
  const at::Tensor p_host = params.cpu();
  std::vector<GatherVolume> host(B);
  for (int64_t b = 0; b < B; ++b) {
    check_volume(volumes[b], p_host.data_ptr<int32_t>() + b * kGatherParams, patch, b);
    const at::Tensor& v = volumes[b];
    host[b] = {v.data_ptr<uint8_t>(), (int32_t)v.size(0), (int32_t)v.size(1), (int32_t)v.size(2), (int32_t)v.size(3)};
  }
  at::Tensor vols = at::empty({(int64_t)(B * sizeof(GatherVolume))}, at::kByte);
  if (B) std::memcpy(vols.data_ptr<uint8_t>(), host.data(), B * sizeof(GatherVolume));
  vols = vols.to(coords.device(), /*non_blocking=*/false);
  const int64_t n = coords.size(0);
  at::Tensor out = at::empty({n, P}, coords.options().dtype(dtype));
  const GatherOut ot = dtype == at::kFloat ? GatherOut::kFloat32 : dtype == at::kHalf ? GatherOut::kFloat16
                                                                                      : GatherOut::kBFloat16;
  C10_CUDA_CHECK(launch_gather_tokens(reinterpret_cast<const GatherVolume*>(vols.data_ptr<uint8_t>()),
                                      params.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), (int)B,
                                      coords.data_ptr<int32_t>(), n, table.data_ptr<float>(), (int)patch[0],
                                      (int)patch[1], (int)patch[2], out.data_ptr(), ot,
                                      at::cuda::getCurrentCUDAStream()));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("gather_tokens(Tensor[] volumes, Tensor coords, Tensor cu_seqlens, Tensor params, Tensor table, "
        "int[] patch, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) { m.impl("gather_tokens", &gather_tokens_cpu); }

#ifdef NVFM_WITH_CUDA
TORCH_LIBRARY_IMPL(nvfm, CUDA, m) { m.impl("gather_tokens", &gather_tokens_cuda); }
#endif

}  // namespace nvfm
