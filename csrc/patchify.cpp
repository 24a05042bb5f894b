// 3D patch tokenizer: tensor handling, the C++ CPU kernel, and torch.library registration.
// Reference (the specification): nvfm/tokenize.py. CUDA kernels: patchify_cuda.cu.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "patchify.h"

#ifdef NVFM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace nvfm {
namespace {

PatchGeom make_geom(at::IntArrayRef shape, at::IntArrayRef patch) {
  TORCH_CHECK(patch.size() == 3, "patch must have 3 sizes (pd, ph, pw)");
  TORCH_CHECK(shape.size() == 3, "volumes must be 3D (D, H, W), got ", shape.size(), "D");
  TORCH_CHECK(shape[0] >= 0 && shape[1] >= 0 && shape[2] >= 0 && shape[0] < INT32_MAX && shape[1] < INT32_MAX &&
              shape[2] < INT32_MAX, "bad volume shape ", shape);
  PatchGeom g;
  g.D = shape[0]; g.H = shape[1]; g.W = shape[2];
  g.pd = patch[0]; g.ph = patch[1]; g.pw = patch[2];
  TORCH_CHECK(g.pd > 0 && g.ph > 0 && g.pw > 0, "patch sizes must be positive");
  g.gz = (g.D + g.pd - 1) / g.pd; g.gy = (g.H + g.ph - 1) / g.ph; g.gx = (g.W + g.pw - 1) / g.pw;
  return g;
}

void check_pair(const at::Tensor& vol, const at::Tensor& mask) {
  TORCH_CHECK(vol.scalar_type() == at::kByte, "volumes must be uint8");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "masks must be uint8 (0 = background)");
  TORCH_CHECK(vol.sizes() == mask.sizes(), "volume ", vol.sizes(), " and mask ", mask.sizes(), " differ");
  TORCH_CHECK(vol.is_contiguous() && mask.is_contiguous(), "volumes and masks must be contiguous");
  TORCH_CHECK(vol.device() == mask.device(), "volume and mask on different devices");
}

// CPU: count foreground per patch (parallel over z-slabs of patches).
void fg_count_cpu(const uint8_t* mask, const PatchGeom& g, int32_t* counts) {
  at::parallel_for(0, g.gz, 1, [&](int64_t zb, int64_t ze) {
    for (int64_t tz = zb; tz < ze; ++tz) {
      int32_t* row = counts + tz * g.gy * g.gx;
      std::fill(row, row + g.gy * g.gx, 0);
      for (int z = tz * g.pd; z < std::min<int>((tz + 1) * g.pd, g.D); ++z)
        for (int y = 0; y < g.H; ++y) {
          const uint8_t* line = mask + ((int64_t)z * g.H + y) * g.W;
          int32_t* cy = row + (y / g.ph) * g.gx;
          for (int tx = 0; tx < g.gx; ++tx) {  // a short fixed-width run per patch: vectorizes
            const int x0 = tx * g.pw, x1 = std::min(x0 + g.pw, g.W);
            int32_t s = 0;
            for (int x = x0; x < x1; ++x) s += line[x] != 0;
            cy[tx] += s;
          }
        }
    }
  });
}

// CPU: copy the patch at each coordinate into its token row (rows of pw contiguous bytes).
void gather_cpu(const uint8_t* vol, const PatchGeom& g, const int32_t* coords, int64_t n, uint8_t* out) {
  const int64_t P = (int64_t)g.pd * g.ph * g.pw;
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      uint8_t* dst = out + t * P;
      const int z0 = coords[3 * t] * g.pd, y0 = coords[3 * t + 1] * g.ph, x0 = coords[3 * t + 2] * g.pw;
      const int nx = std::max(0, std::min(g.pw, g.W - x0));
      for (int dz = 0; dz < g.pd; ++dz)
        for (int dy = 0; dy < g.ph; ++dy, dst += g.pw) {
          const int z = z0 + dz, y = y0 + dy;
          if (z >= g.D || y >= g.H) { std::memset(dst, 0, g.pw); continue; }
          std::memcpy(dst, vol + ((int64_t)z * g.H + y) * g.W + x0, nx);
          if (nx < g.pw) std::memset(dst + nx, 0, g.pw - nx);
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patchify_cpu(at::TensorList volumes, at::TensorList masks,
                                                            int64_t min_fg_voxels, at::IntArrayRef patch) {
  TORCH_CHECK(volumes.size() == masks.size(), "got ", volumes.size(), " volumes and ", masks.size(), " masks");
  const int64_t B = volumes.size();
  std::vector<PatchGeom> geoms;
  std::vector<at::Tensor> coords;
  std::vector<int32_t> cu(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    check_pair(volumes[b], masks[b]);
    PatchGeom g = make_geom(volumes[b].sizes(), patch);
    at::Tensor counts = at::empty({g.gz, g.gy, g.gx}, at::kInt);
    fg_count_cpu(masks[b].data_ptr<uint8_t>(), g, counts.data_ptr<int32_t>());
    coords.push_back(at::nonzero(counts >= min_fg_voxels).to(at::kInt).contiguous());
    TORCH_CHECK(cu[b] + coords.back().size(0) < INT32_MAX, "more than 2^31 tokens in one batch");
    cu[b + 1] = cu[b] + (int32_t)coords.back().size(0);
    geoms.push_back(g);
  }
  const int64_t P = patch[0] * patch[1] * patch[2];
  at::Tensor tokens = at::empty({cu[B], P}, at::kByte);
  for (int64_t b = 0; b < B; ++b)
    gather_cpu(volumes[b].data_ptr<uint8_t>(), geoms[b], coords[b].data_ptr<int32_t>(), coords[b].size(0),
               tokens.data_ptr<uint8_t>() + (int64_t)cu[b] * P);
  at::Tensor all = B ? at::cat(coords) : at::empty({0, 3}, at::kInt);
  return {tokens, all, torch::tensor(std::vector<int32_t>(cu.begin(), cu.end()), at::kInt)};
}

// unpatchify's validation, shared by the CPU and CUDA entry points (the kernels trust it):
// dtypes, shapes, devices, and every coordinate inside the token grid (tensor ops on the
// coordinates' device: one sync on CUDA, where unpatchify is a debugging/visualisation path).
PatchGeom check_unpatchify(const at::Tensor& tokens, const at::Tensor& coords, at::IntArrayRef shape,
                           at::IntArrayRef patch) {
  TORCH_CHECK(shape.size() == 3, "shape must be (D, H, W)");
  const PatchGeom g = make_geom(shape, patch);
  TORCH_CHECK(tokens.scalar_type() == at::kByte && tokens.is_contiguous(), "tokens must be contiguous uint8");
  TORCH_CHECK(coords.scalar_type() == at::kInt && coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "coords must be contiguous (n, 3) int32");
  TORCH_CHECK(tokens.device() == coords.device(), "tokens on ", tokens.device(), " but coords on ", coords.device());
  const int64_t P = (int64_t)g.pd * g.ph * g.pw, n = coords.size(0);
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) == n && tokens.size(1) == P, "tokens must be (n, ", P, ")");
  if (n > 0) {
    const at::Tensor grid = torch::tensor({g.gz, g.gy, g.gx}, at::kInt).to(coords.device());
    const at::Tensor bad = at::logical_or(coords < 0, coords >= grid).any(1);
    if (bad.any().item<bool>())
      TORCH_CHECK(false, "coordinate ", bad.nonzero()[0][0].item<int64_t>(), " outside the token grid (", g.gz, ", ",
                  g.gy, ", ", g.gx, ")");
    // two tokens at one grid cell: which lands there would be undefined (a race in the CUDA kernel)
    const at::Tensor c = coords.to(at::kLong);
    const at::Tensor cell = (c.select(1, 0) * g.gy + c.select(1, 1)) * g.gx + c.select(1, 2);
    const at::Tensor sorted = std::get<0>(cell.sort());
    TORCH_CHECK(n < 2 || !at::eq(sorted.slice(0, 1), sorted.slice(0, 0, n - 1)).any().item<bool>(),
                "two coordinates on one grid cell: one token per cell");
  }
  return g;
}

at::Tensor unpatchify_cpu(const at::Tensor& tokens, const at::Tensor& coords, at::IntArrayRef shape,
                          at::IntArrayRef patch) {
  const PatchGeom g = check_unpatchify(tokens, coords, shape, patch);
  at::Tensor vol = at::zeros({shape[0], shape[1], shape[2]}, tokens.options());
  const int64_t P = (int64_t)g.pd * g.ph * g.pw, n = coords.size(0);
  const int32_t* c = coords.data_ptr<int32_t>();
  uint8_t* v = vol.data_ptr<uint8_t>();
  const uint8_t* src = tokens.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {  // patches never overlap: no races
    for (int64_t t = b; t < e; ++t) {
      const uint8_t* s = src + t * P;
      const int z0 = c[3 * t] * g.pd, y0 = c[3 * t + 1] * g.ph, x0 = c[3 * t + 2] * g.pw;
      const int nx = std::max(0, std::min(g.pw, g.W - x0));
      for (int dz = 0; dz < g.pd; ++dz)
        for (int dy = 0; dy < g.ph; ++dy, s += g.pw)
          if (z0 + dz < g.D && y0 + dy < g.H) std::memcpy(v + ((int64_t)(z0 + dz) * g.H + y0 + dy) * g.W + x0, s, nx);
    }
  });
  return vol;
}

#ifdef NVFM_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> patchify_cuda(at::TensorList volumes, at::TensorList masks,
                                                             int64_t min_fg_voxels, at::IntArrayRef patch) {
  TORCH_CHECK(volumes.size() == masks.size(), "got ", volumes.size(), " volumes and ", masks.size(), " masks");
  const int64_t B = volumes.size();
  TORCH_CHECK(B > 0, "patchify on CUDA needs at least one volume");
  c10::cuda::CUDAGuard guard(volumes[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::vector<PatchGeom> geoms;
  std::vector<at::Tensor> coords;
  for (int64_t b = 0; b < B; ++b) {
    check_pair(volumes[b], masks[b]);
    PatchGeom g = make_geom(volumes[b].sizes(), patch);
    at::Tensor counts = at::empty({g.gz, g.gy, g.gx}, volumes[b].options().dtype(at::kInt));
    C10_CUDA_CHECK(launch_token_fg_count(masks[b].data_ptr<uint8_t>(), g, counts.data_ptr<int32_t>(), stream));
    coords.push_back(at::nonzero(counts >= min_fg_voxels).to(at::kInt).contiguous());
    geoms.push_back(g);
  }
  std::vector<int64_t> lens(B);
  for (int64_t b = 0; b < B; ++b) lens[b] = coords[b].size(0);  // nonzero already synchronized
  at::Tensor cu = at::zeros({B + 1}, at::kLong);
  cu.slice(0, 1).copy_(torch::tensor(lens, at::kLong).cumsum(0));
  const int64_t total = cu[B].item<int64_t>(), P = patch[0] * patch[1] * patch[2];
  at::Tensor tokens = at::empty({total, P}, volumes[0].options());
  int64_t off = 0;
  for (int64_t b = 0; b < B; ++b) {
    C10_CUDA_CHECK(launch_patch_gather(volumes[b].data_ptr<uint8_t>(), geoms[b], coords[b].data_ptr<int32_t>(),
                                       lens[b], tokens.data_ptr<uint8_t>() + off * P, stream));
    off += lens[b];
  }
  return {tokens, at::cat(coords), cu.to(at::kInt).to(volumes[0].device())};
}

at::Tensor unpatchify_cuda(const at::Tensor& tokens, const at::Tensor& coords, at::IntArrayRef shape,
                           at::IntArrayRef patch) {
  c10::cuda::CUDAGuard guard(tokens.device());
  const PatchGeom g = check_unpatchify(tokens, coords, shape, patch);
  at::Tensor vol = at::zeros({shape[0], shape[1], shape[2]}, tokens.options());
  C10_CUDA_CHECK(launch_patch_scatter(tokens.data_ptr<uint8_t>(), g, coords.data_ptr<int32_t>(), coords.size(0),
                                      vol.data_ptr<uint8_t>(), at::cuda::getCurrentCUDAStream()));
  return vol;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("patchify(Tensor[] volumes, Tensor[] masks, int min_fg_voxels, int[] patch) -> (Tensor, Tensor, Tensor)");
  m.def("unpatchify(Tensor tokens, Tensor coords, int[] shape, int[] patch) -> Tensor");
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) {
  m.impl("patchify", &patchify_cpu);
  m.impl("unpatchify", &unpatchify_cpu);
}

#ifdef NVFM_WITH_CUDA
TORCH_LIBRARY_IMPL(nvfm, CUDA, m) {
  m.impl("patchify", &patchify_cuda);
  m.impl("unpatchify", &unpatchify_cuda);
}
#endif

}  // namespace nvfm
