// Training-path token gather: tensor handling, the C++ CPU kernel, torch.library registration.
// Reference (the specification): nvfm/gather.py. CUDA kernel: gather_cuda.cu.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
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
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kByte,
              "gather_tokens writes float32, float16, bfloat16 or uint8, got ", dtype);
  TORCH_CHECK(coords.scalar_type() == at::kInt && coords.dim() == 2 && coords.size(1) == 3 && coords.is_contiguous(),
              "coords must be contiguous (N, 3) int32");
  TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.size(0) == B + 1, "cu_seqlens must be int32 (B + 1)");
  TORCH_CHECK(params.scalar_type() == at::kInt && params.dim() == 2 && params.size(0) == B &&
              params.size(1) == kGatherParams && params.is_contiguous(), "params must be contiguous (B, 16) int32");
  if (dtype != at::kByte)  // uint8 output writes window levels: no table
    TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(0) == 4 &&
                table.size(1) == 256 && table.is_contiguous(), "table must be contiguous (4, 256) float32");
  TORCH_CHECK(cu.device() == coords.device() && params.device() == coords.device() &&
              (dtype == at::kByte || table.device() == coords.device()),
              "cu_seqlens, params and table must be on the coords' device ", coords.device());
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

// The values' validation, shared by the CPU and CUDA entry points (the kernels trust it): cu
// from 0 to N and non-decreasing, every volume's parameters, and every coordinate inside its
// volume's output grid (tensor ops on the coords' device). cu_h, p_h: host copies.
void check_values(at::TensorList volumes, const at::Tensor& coords, const int32_t* cu_h, const int32_t* p_h,
                  at::IntArrayRef patch) {
  const int64_t B = volumes.size(), N = coords.size(0);
  TORCH_CHECK(cu_h[0] == 0 && cu_h[B] == N, "cu_seqlens must run from 0 to N = ", N);
  std::vector<int32_t> bound(3 * B), lens(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(cu_h[b + 1] >= cu_h[b], "cu_seqlens must be non-decreasing");
    const int32_t* p = p_h + b * kGatherParams;
    check_volume(volumes[b], p, patch, b);
    for (int k = 0; k < 3; ++k) bound[3 * b + k] = p[3 + p[6 + k]];  // output axis k = crop axis perm[k]
    lens[b] = cu_h[b + 1] - cu_h[b];
  }
  if (N == 0) return;
  const at::Tensor per_token = at::repeat_interleave(torch::tensor(bound, at::kInt).view({B, 3}),
                                                     torch::tensor(lens, at::kLong), 0, N).to(coords.device());
  const at::Tensor bad = at::logical_or(coords < 0, coords >= per_token).any(1);
  if (bad.any().item<bool>()) {
    const int64_t t = bad.nonzero()[0][0].item<int64_t>();
    const int64_t b = std::upper_bound(cu_h, cu_h + B + 1, (int32_t)t) - cu_h - 1;
    TORCH_CHECK(false, "volume ", b, ": token ", t, " coordinate outside the output grid");
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

// uint8 output: the window level of each voxel (nvfm.data.expand_window), the JEPA loader's
// format. mr / brain: the stored byte; CT blood: high nibble x 17; bone: low nibble x 17.
template <int W>
inline uint8_t level(uint8_t b) {
  if constexpr (W == 2) return static_cast<uint8_t>((b >> 4) * 17);
  else if constexpr (W == 3) return static_cast<uint8_t>((b & 15) * 17);
  else return b;
}

// n levels of a voxel row, mirrored when FLIP; plain loops the compiler vectorises.
template <int W, bool FLIP>
inline void copy_row(const uint8_t* row, int64_t n, uint8_t* dst) {
  if constexpr (FLIP) {
    for (int64_t e = 0; e < n; ++e) dst[e] = level<W>(row[n - 1 - e]);
  } else {
    for (int64_t e = 0; e < n; ++e) dst[e] = level<W>(row[e]);
  }
}

// out[c][r] = in[r][c] for a 16 x 16 byte tile (rows of 16 bytes). SSE2 (every x86-64): four
// rounds of unpacks interleave 8-, 16-, 32- then 64-bit pieces of row pairs; else scalar.
inline void transpose16x16(const uint8_t* in, uint8_t* out) {
#if defined(__SSE2__)
  __m128i a[16], b[16];
  for (int r = 0; r < 16; ++r) a[r] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 16 * r));
  for (int k = 0; k < 8; ++k) {  // b[2k], b[2k+1]: columns 0-7, 8-15 of rows 2k, 2k+1 interleaved
    b[2 * k] = _mm_unpacklo_epi8(a[2 * k], a[2 * k + 1]);
    b[2 * k + 1] = _mm_unpackhi_epi8(a[2 * k], a[2 * k + 1]);
  }
  for (int m = 0; m < 4; ++m)  // a[4m + 2j + h]: 4 columns x rows 4m..4m+3
    for (int j = 0; j < 2; ++j) {
      a[4 * m + 2 * j] = _mm_unpacklo_epi16(b[4 * m + j], b[4 * m + 2 + j]);
      a[4 * m + 2 * j + 1] = _mm_unpackhi_epi16(b[4 * m + j], b[4 * m + 2 + j]);
    }
  for (int q = 0; q < 2; ++q)  // b[8q + 2i + h]: 2 columns x rows 8q..8q+7
    for (int i = 0; i < 4; ++i) {
      b[8 * q + 2 * i] = _mm_unpacklo_epi32(a[8 * q + i], a[8 * q + 4 + i]);
      b[8 * q + 2 * i + 1] = _mm_unpackhi_epi32(a[8 * q + i], a[8 * q + 4 + i]);
    }
  for (int j = 0; j < 8; ++j) {  // column 2j and 2j+1, all 16 rows
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * j), _mm_unpacklo_epi64(b[j], b[8 + j]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * j + 16), _mm_unpackhi_epi64(b[j], b[8 + j]));
  }
#else
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) out[16 * c + r] = in[16 * r + c];
#endif
}

// One token in two steps: (1) its voxel block in the flipped voxel frame, x-rows copied whole
// (straight into the output when patch_perm is the identity); (2) patch_perm applied from the
// 1-2 KB scratch block, which sits in L1. Padding beyond the volume is level 0.
template <int W>
void gather_token_u8(const uint8_t* src, const int64_t dims[3], const int64_t tok[3], const bool flipped[3],
                     const int32_t* pp, at::IntArrayRef patch, uint8_t* tmp, uint8_t* out) {
  const int64_t pz = patch[0], py = patch[1], px = patch[2];
  const bool identity = pp[0] == 0 && pp[1] == 1 && pp[2] == 2;
  uint8_t* blk = identity ? out : tmp;
  const int64_t x0 = tok[2] * px;
  const bool full_x = x0 + px <= dims[2];
  if (full_x && px == 16 && (tok[0] + 1) * pz <= dims[0] && (tok[1] + 1) * py <= dims[1]) {
    // interior token (the common case): 16-byte rows at fixed strides, no bounds checks
    const int64_t sz = dims[1] * dims[2], sy = dims[2];
    const uint8_t* first = src + (tok[0] * pz + (flipped[0] ? pz - 1 : 0)) * sz +
                           (tok[1] * py + (flipped[1] ? py - 1 : 0)) * sy + x0;
    const int64_t dz = flipped[0] ? -sz : sz, dy = flipped[1] ? -sy : sy;
    uint8_t* d = blk;
    for (int64_t ez = 0; ez < pz; ++ez) {
      const uint8_t* row = first + ez * dz;
      if (flipped[2]) {
        for (int64_t ey = 0; ey < py; ++ey, row += dy, d += 16) copy_row<W, true>(row, 16, d);
      } else {
        for (int64_t ey = 0; ey < py; ++ey, row += dy, d += 16) copy_row<W, false>(row, 16, d);
      }
    }
  } else {  // edge token: rows past the volume are padding (level 0)
    for (int64_t ez = 0; ez < pz; ++ez) {
      const int64_t vz = tok[0] * pz + (flipped[0] ? pz - 1 - ez : ez);
      for (int64_t ey = 0; ey < py; ++ey) {
        const int64_t vy = tok[1] * py + (flipped[1] ? py - 1 - ey : ey);
        uint8_t* d = blk + (ez * py + ey) * px;
        if (vz >= dims[0] || vy >= dims[1]) {
          std::memset(d, 0, px);
          continue;
        }
        const uint8_t* row = src + (vz * dims[1] + vy) * dims[2] + x0;
        if (full_x && px == 16) {  // the patch width: a fixed-size loop, unrolled and vectorised
          if (flipped[2]) copy_row<W, true>(row, 16, d);
          else copy_row<W, false>(row, 16, d);
        } else if (full_x) {
          if (flipped[2]) copy_row<W, true>(row, px, d);
          else copy_row<W, false>(row, px, d);
        } else {
          for (int64_t ex = 0; ex < px; ++ex) {
            const int64_t vx = flipped[2] ? px - 1 - ex : ex;
            d[ex] = x0 + vx < dims[2] ? level<W>(row[vx]) : 0;
          }
        }
      }
    }
  }
  if (identity) return;
  if (pp[0] == 0 && pp[1] == 2 && pp[2] == 1 && py == 16 && px == 16) {  // the JEPA loader's in-plane swap
    for (int64_t ez = 0; ez < pz; ++ez) transpose16x16(tmp + 256 * ez, out + 256 * ez);
    return;
  }
  const int64_t vstride[3] = {py * px, px, 1};  // scratch strides per voxel axis
  const int64_t n0 = patch[pp[0]], n1 = patch[pp[1]], n2 = patch[pp[2]];
  const int64_t s0 = vstride[pp[0]], s1 = vstride[pp[1]], s2 = vstride[pp[2]];
  for (int64_t i0 = 0; i0 < n0; ++i0)
    for (int64_t i1 = 0; i1 < n1; ++i1) {
      const uint8_t* r = tmp + i0 * s0 + i1 * s1;
      for (int64_t i2 = 0; i2 < n2; ++i2) *out++ = r[i2 * s2];
    }
}

// Where token t reads: its volume b, channel data, dims and original token coords.
struct TokenSource {
  const int32_t* p;
  const uint8_t* src;
  int64_t dims[3], tok[3];
  bool flipped[3];
};

inline TokenSource locate(at::TensorList volumes, const int32_t* coords, const int32_t* cu, const int32_t* params,
                          int64_t B, int64_t t) {
  TokenSource s;
  const int64_t b = std::upper_bound(cu, cu + B + 1, (int32_t)t) - cu - 1;
  s.p = params + b * kGatherParams;
  const at::Tensor& vol = volumes[b];
  for (int a = 0; a < 3; ++a) s.dims[a] = vol.size(1 + a);
  s.src = vol.data_ptr<uint8_t>() + kWindowChannel[s.p[12]] * s.dims[0] * s.dims[1] * s.dims[2];
  for (int k = 0; k < 3; ++k) {  // original token; a flip of output axis k mirrors crop axis perm[k]
    const int a = s.p[6 + k];
    s.flipped[a] = s.p[9 + k] != 0;
    s.tok[a] = s.p[a] + (s.flipped[a] ? s.p[3 + a] - 1 - coords[3 * t + k] : coords[3 * t + k]);
  }
  return s;
}

void gather_cpu_u8(at::TensorList volumes, const int32_t* coords, const int32_t* cu, const int32_t* params,
                   at::IntArrayRef patch, int64_t B, uint8_t* out) {
  const int64_t n = cu[B], P = patch[0] * patch[1] * patch[2];
  at::parallel_for(0, n, 16, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> tmp(P);
    constexpr int64_t kAhead = 2;  // prefetch the rows of token t + kAhead: a cold volume is latency-bound
    for (int64_t t = t0; t < t1; ++t) {
      if (t + kAhead < t1) {
        const TokenSource f = locate(volumes, coords, cu, params, B, t + kAhead);
        const int64_t z0 = f.tok[0] * patch[0], y0 = f.tok[1] * patch[1], x0 = f.tok[2] * patch[2];
        for (int64_t z = z0; z < std::min(z0 + patch[0], f.dims[0]); ++z)
          for (int64_t y = y0; y < std::min(y0 + patch[1], f.dims[1]); ++y)
            if (x0 < f.dims[2]) __builtin_prefetch(f.src + (z * f.dims[1] + y) * f.dims[2] + x0);
      }
      const TokenSource s = locate(volumes, coords, cu, params, B, t);
      uint8_t* dst = out + t * P;
      switch (s.p[12]) {
        case 2: gather_token_u8<2>(s.src, s.dims, s.tok, s.flipped, s.p + 13, patch, tmp.data(), dst); break;
        case 3: gather_token_u8<3>(s.src, s.dims, s.tok, s.flipped, s.p + 13, patch, tmp.data(), dst); break;
        default: gather_token_u8<0>(s.src, s.dims, s.tok, s.flipped, s.p + 13, patch, tmp.data(), dst);
      }
    }
  });
}

at::Tensor gather_tokens_cpu(at::TensorList volumes, const at::Tensor& coords, const at::Tensor& cu_seqlens,
                             const at::Tensor& params, const at::Tensor& table, at::IntArrayRef patch,
                             at::ScalarType dtype) {
  const at::Tensor cu = cu_seqlens.contiguous();  // read by raw pointer below (a strided view is common)
  check_args(volumes, coords, cu, params, table, patch, dtype);
  const int64_t B = volumes.size(), P = patch[0] * patch[1] * patch[2];
  const int32_t* c = cu.data_ptr<int32_t>();
  const int32_t* p = params.data_ptr<int32_t>();
  const int32_t* xyz = coords.data_ptr<int32_t>();
  check_values(volumes, coords, c, p, patch);
  at::Tensor out = at::empty({coords.size(0), P}, coords.options().dtype(dtype));
  if (dtype == at::kByte) {
    gather_cpu_u8(volumes, xyz, c, p, patch, B, out.data_ptr<uint8_t>());
    return out;
  }
  const float* lut = table.data_ptr<float>();
  if (dtype == at::kFloat) gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<float>());
  else if (dtype == at::kHalf) gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<at::Half>());
  else gather_cpu(volumes, xyz, c, p, lut, patch, B, out.data_ptr<at::BFloat16>());
  return out;
}

#ifdef NVFM_WITH_CUDA
at::Tensor gather_tokens_cuda(at::TensorList volumes, const at::Tensor& coords, const at::Tensor& cu_seqlens,
                              const at::Tensor& params, const at::Tensor& table, at::IntArrayRef patch,
                              at::ScalarType dtype) {
  const at::Tensor cu = cu_seqlens.contiguous();  // the kernel reads it by raw pointer
  check_args(volumes, coords, cu, params, table, patch, dtype);
  c10::cuda::CUDAGuard guard(coords.device());
  const int64_t B = volumes.size(), P = patch[0] * patch[1] * patch[2];
  const at::Tensor p_host = params.cpu(), cu_host = cu.cpu();
  check_values(volumes, coords, cu_host.data_ptr<int32_t>(), p_host.data_ptr<int32_t>(), patch);
  std::vector<GatherVolume> host(B);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& v = volumes[b];
    host[b] = {v.data_ptr<uint8_t>(), (int32_t)v.size(0), (int32_t)v.size(1), (int32_t)v.size(2), (int32_t)v.size(3)};
  }
  at::Tensor vols = at::empty({(int64_t)(B * sizeof(GatherVolume))}, at::kByte);
  if (B) std::memcpy(vols.data_ptr<uint8_t>(), host.data(), B * sizeof(GatherVolume));
  vols = vols.to(coords.device(), /*non_blocking=*/false);
  const int64_t n = coords.size(0);
  at::Tensor out = at::empty({n, P}, coords.options().dtype(dtype));
  const GatherOut ot = dtype == at::kFloat ? GatherOut::kFloat32 : dtype == at::kHalf ? GatherOut::kFloat16
                      : dtype == at::kByte ? GatherOut::kUInt8 : GatherOut::kBFloat16;
  const float* lut = dtype == at::kByte ? nullptr : table.data_ptr<float>();
  C10_CUDA_CHECK(launch_gather_tokens(reinterpret_cast<const GatherVolume*>(vols.data_ptr<uint8_t>()),
                                      params.data_ptr<int32_t>(), cu.data_ptr<int32_t>(), (int)B,
                                      coords.data_ptr<int32_t>(), n, lut, (int)patch[0],
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
