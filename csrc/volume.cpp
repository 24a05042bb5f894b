// Preprocessing kernels of nvfm/volume.py: the C++ CPU kernels and their torch.library
// registration. References (the specification): nvfm/volume.py `fill_holes_slices_reference`
// (scipy.ndimage labelling), `f16_raw_hist_reference` (numpy bincount) and `u16_lookup_reference`
// (numpy take). No CUDA kernels: preprocessing runs in CPU worker processes.
//
// fill_holes_slices(mask): per 2D slice of a (D, H, W) uint8/bool mask, in place, the result of
// scipy.ndimage.binary_fill_holes with 4-connected background: a pixel is 1 unless it is
// background (0) connected to the slice border through background. Per slice: the background
// beyond each row's outermost foreground pixels is outside at once, then a flood fill (explicit
// stack, no recursion) reaches the rest (see fill_slice). O(H W) per slice, one byte of scratch
// per pixel.
//
// u16_histogram(x): 65536-bin int64 histogram of the 16-bit patterns of an int16/uint16/
// float16 tensor (nvfm/volume.py reads float16 percentiles from it). numpy's bincount first
// widens every value to int64; this counts in place, four partial histograms to break the
// store-to-load dependency on repeated values.
//
// u16_lookup(x, lut, out): out = lut[x] with x's 16-bit patterns as indices (the MR float16 ->
// uint8 table of nvfm/volume.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace nvfm {
namespace {

// One slice: m (H, W) row-major, in place. seen/stack are caller-owned scratch.
// Step 1: in each row, the background left of the first and right of the last foreground pixel
// (all of a row without foreground) touches the border along the row: marked outside with
// memsets. Step 2: the rest of the background lies between foreground pixels of its row; any
// such pixel in the top or bottom row, or under or over an outside pixel, is a seed, and a
// pixel flood fill over the remaining background from the seeds finishes the job (for a head
// that is the concavities and holes only, a small part of the slice). Step 3: every pixel not outside becomes 1.
void fill_slice(uint8_t* __restrict m, int64_t H, int64_t W, std::vector<uint8_t>& seen,
                std::vector<int64_t>& lr, std::vector<int64_t>& stack) {
  seen.resize((size_t)(H * W));
  uint8_t* __restrict s = seen.data();
  lr.resize((size_t)(2 * H));
  for (int64_t r = 0; r < H; ++r) {
    const uint8_t* row = m + r * W;
    uint8_t* srow = s + r * W;
    int64_t L = 0, R = W - 1;
    while (L < W && !row[L]) ++L;
    if (L == W) {  // no foreground in this row
      std::memset(srow, 1, (size_t)W);
      lr[2 * r] = W, lr[2 * r + 1] = -1;
      continue;
    }
    while (!row[R]) --R;
    std::memset(srow, 1, (size_t)L);
    std::memset(srow + L, 0, (size_t)(R - L + 1));
    std::memset(srow + R + 1, 1, (size_t)(W - 1 - R));
    lr[2 * r] = L, lr[2 * r + 1] = R;
  }
  stack.clear();
  for (int64_t r = 0; r < H; ++r) {  // seeds: inner background on the border or next to outside above/below
    const int64_t row = r * W;
    for (int64_t c = lr[2 * r] + 1; c < lr[2 * r + 1]; ++c) {
      const int64_t i = row + c;
      if (m[i] || s[i]) continue;
      if (r == 0 || r + 1 == H || s[i - W] || s[i + W]) {  // top/bottom row: on the border
        s[i] = 1;
        stack.push_back(i);
      }
    }
  }
  while (!stack.empty()) {
    const int64_t i = stack.back();
    stack.pop_back();
    const int64_t r = i / W, c = i - r * W;
    const int64_t nb[4] = {r > 0 ? i - W : -1, r + 1 < H ? i + W : -1, c > 0 ? i - 1 : -1, c + 1 < W ? i + 1 : -1};
    for (int64_t j : nb)
      if (j >= 0 && !m[j] && !s[j]) {
        s[j] = 1;
        stack.push_back(j);
      }
  }
  for (int64_t i = 0; i < H * W; ++i) m[i] = (uint8_t)(s[i] ^ 1);
}

void fill_holes_slices_cpu(at::Tensor mask) {
  TORCH_CHECK(mask.device().is_cpu(), "fill_holes_slices: mask must be on the CPU");
  TORCH_CHECK(mask.dim() == 3, "fill_holes_slices: mask must be (D, H, W), got ", mask.dim(), " dims");
  TORCH_CHECK(mask.scalar_type() == at::kByte || mask.scalar_type() == at::kBool,
              "fill_holes_slices: mask must be uint8 or bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.is_contiguous(), "fill_holes_slices: mask must be contiguous (it is filled in place)");
  const int64_t D = mask.size(0), H = mask.size(1), W = mask.size(2);
  if (D == 0 || H == 0 || W == 0) return;
  uint8_t* p = reinterpret_cast<uint8_t*>(mask.data_ptr());  // bool is one byte, 0/1
  at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
    std::vector<uint8_t> seen;
    std::vector<int64_t> lr, stack;
    for (int64_t d = d0; d < d1; ++d) fill_slice(p + d * H * W, H, W, seen, lr, stack);
  });
}

at::Tensor u16_histogram_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "u16_histogram: input must be on the CPU");
  TORCH_CHECK(x.element_size() == 2, "u16_histogram: input must have 16-bit elements, got ", x.scalar_type());
  const at::Tensor c = x.contiguous();
  const uint16_t* v = reinterpret_cast<const uint16_t*>(c.data_ptr());
  const int64_t n = c.numel();
  std::vector<int64_t> h(4 * 65536, 0);
  int64_t* h0 = h.data();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h0[v[i]];
    ++h0[65536 + v[i + 1]];
    ++h0[2 * 65536 + v[i + 2]];
    ++h0[3 * 65536 + v[i + 3]];
  }
  for (; i < n; ++i) ++h0[v[i]];
  at::Tensor out = at::empty({65536}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < 65536; ++b) o[b] = h0[b] + h0[65536 + b] + h0[2 * 65536 + b] + h0[3 * 65536 + b];
  return out;
}

// out[i] = lut[x[i]] for 16-bit x (bit patterns as indices) and a 65536-entry uint8 table, into
// a caller-owned uint8 tensor of x's shape. numpy's take first widens the indices to int64.
void u16_lookup_cpu(const at::Tensor& x, const at::Tensor& lut, at::Tensor out) {
  TORCH_CHECK(x.device().is_cpu() && lut.device().is_cpu() && out.device().is_cpu(), "u16_lookup: CPU tensors only");
  TORCH_CHECK(x.element_size() == 2, "u16_lookup: x must have 16-bit elements, got ", x.scalar_type());
  TORCH_CHECK(lut.scalar_type() == at::kByte && lut.numel() == 65536 && lut.is_contiguous(),
              "u16_lookup: lut must be a contiguous uint8 tensor of 65536 entries");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous() && out.numel() == x.numel(),
              "u16_lookup: out must be a contiguous uint8 tensor with x's number of elements");
  const at::Tensor c = x.contiguous();
  const uint16_t* v = reinterpret_cast<const uint16_t*>(c.data_ptr());
  const uint8_t* t = lut.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i) o[i] = t[v[i]];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nvfm, m) {
  m.def("fill_holes_slices(Tensor(a!) mask) -> ()");
  m.def("u16_histogram(Tensor x) -> Tensor");
  m.def("u16_lookup(Tensor x, Tensor lut, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(nvfm, CPU, m) {
  m.impl("fill_holes_slices", &fill_holes_slices_cpu);
  m.impl("u16_histogram", &u16_histogram_cpu);
  m.impl("u16_lookup", &u16_lookup_cpu);
}

}  // namespace nvfm
