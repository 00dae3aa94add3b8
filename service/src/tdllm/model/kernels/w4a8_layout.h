// The layout of our int4 weights (`pack4`), shared by the AVX-512 VNNI kernel (w4a8_avx512.cpp)
// and the AVX2 one (int_avx2.cpp): codes packed output-major in blocks of 64 outputs and, within
// a block, group by group: [N/64][K/32] of 1280 bytes, the group's codes (4 x 256 bytes: eight
// inputs of 64 outputs, a byte holding inputs i and i + 4 of one output), then its 64 scales and
// 64 offsets as fp16 (w = q * scale + offset, q in 0..15). The symmetric form (Q4_0's grid, w =
// (q - 8) * scale) leaves the offsets out: 1152 bytes a group, 10% fewer bytes a decode step
// reads; the AVX2 kernel reads both, the AVX-512 one the first only. Portable C++ only: each
// library compiles it with its own flags, so everything here has internal linkage (an anonymous
// namespace) and one library's copy never stands in for the other's.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;                       // outputs a block
constexpr int64_t kGroup = 32;                       // inputs sharing a scale and an offset
constexpr int64_t kCodeBytes = kBlock * kGroup / 2;  // 1024: a block's codes for one group
constexpr int64_t kGroupBytes = kCodeBytes + 2 * kBlock * 2;  // + 64 fp16 scales, 64 offsets
constexpr int64_t kSymmetricGroupBytes = kCodeBytes + kBlock * 2;  // + 64 fp16 scales

// codes [N, K] u8 in 0..15, scales and offsets [N, K/32] fp32 (w = q * scale + offset) ->
// [ceil(N/64), K/32, 1280] u8; outputs past N are zero. `offsets` undefined: the symmetric form
// (w = (q - 8) * scale), [.., 1152] u8. The caller checks that the scales and offsets fit fp16
// (w4a8_ops.check_fp16: a one-line error, not an infinity stored)
at::Tensor pack4(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.size(1) % kGroup == 0,
              "codes: [N, K] uint8, K a multiple of 32");
  const int64_t n = codes.size(0), k = codes.size(1), groups = k / kGroup;
  const bool symmetric = !offsets.defined();
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK((symmetric && t == &offsets) ||
                (t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == n &&
                 t->size(1) == groups), "scales, offsets: [N, K/32] fp32");
  const at::Tensor c = codes.contiguous(), s = scales.contiguous();
  const at::Tensor f = symmetric ? s : offsets.contiguous();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t group_bytes = symmetric ? kSymmetricGroupBytes : kGroupBytes;
  at::Tensor packed = at::zeros({blocks, groups, group_bytes}, at::kByte);
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const float *sp = s.data_ptr<float>(), *fp = f.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* dst = out + (b * groups + g) * group_bytes;
        auto* halves_out = reinterpret_cast<c10::Half*>(dst + kCodeBytes);
        for (int64_t i = 0; i < kBlock && b * kBlock + i < n; ++i) {
          const int64_t row = b * kBlock + i;
          const uint8_t* src = cp + row * k + g * kGroup;
          for (int o = 0; o < 4; ++o)
            for (int t = 0; t < 4; ++t)
              dst[o * 256 + i * 4 + t] = static_cast<uint8_t>(
                  (src[o * 8 + t] & 0x0F) | (src[o * 8 + 4 + t] & 0x0F) << 4);
          halves_out[i] = c10::Half(sp[row * groups + g]);
          if (!symmetric) halves_out[kBlock + i] = c10::Half(fp[row * groups + g]);
        }
      }
    }
  });
  return packed;
}

// packed (either form) -> (codes [n, k] u8, scales [n, k/32] fp32, offsets [n, k/32] fp32; the
// symmetric form's are -8 scale): for checks
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpack4(const at::Tensor& packed, int64_t n,
                                                        int64_t k) {
  const int64_t groups = k / kGroup, group_bytes = packed.size(-1);
  TORCH_CHECK(packed.dim() == 3 && packed.size(0) * kBlock >= n && packed.size(1) == groups &&
              (group_bytes == kGroupBytes || group_bytes == kSymmetricGroupBytes),
              "packed: from pack4");
  const bool symmetric = group_bytes == kSymmetricGroupBytes;
  at::Tensor codes = at::empty({n, k}, at::kByte);
  at::Tensor scales = at::empty({n, groups}, at::kFloat), offsets = at::empty_like(scales);
  const at::Tensor p = packed.contiguous();
  const uint8_t* src = p.data_ptr<uint8_t>();
  uint8_t* c = codes.data_ptr<uint8_t>();
  float *s = scales.data_ptr<float>(), *f = offsets.data_ptr<float>();
  for (int64_t row = 0; row < n; ++row) {
    const int64_t b = row / kBlock, i = row % kBlock;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* grp = src + (b * groups + g) * group_bytes;
      uint8_t* dst = c + row * k + g * kGroup;
      for (int o = 0; o < 4; ++o)
        for (int t = 0; t < 4; ++t) {
          const uint8_t byte = grp[o * 256 + i * 4 + t];
          dst[o * 8 + t] = byte & 0x0F;
          dst[o * 8 + 4 + t] = byte >> 4;
        }
      const auto* h = reinterpret_cast<const c10::Half*>(grp + kCodeBytes);
      s[row * groups + g] = static_cast<float>(h[i]);
      f[row * groups + g] =
          symmetric ? -8 * s[row * groups + g] : static_cast<float>(h[kBlock + i]);
    }
  }
  return {codes, scales, offsets};
}

// whether `packed` is a layout of `n` outputs and `k` inputs whose groups of 64 outputs x 32
// inputs take `group_bytes` each (the form a product reads)
inline bool holds(const at::Tensor& packed, int64_t n, int64_t k, int64_t group_bytes) {
  return packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
         packed.size(0) * kBlock >= n && packed.size(1) * kGroup == k &&
         packed.size(2) == group_bytes;
}

// The checks and shapes around a product: x [..., K] fp32 or bf16 times the packed weights, y
// [..., n] in x's dtype. `rows(in, lda, m, out)` is the kernel's, for T = float or uint16_t
// (bf16 bits). Taking any leading shape and either dtype saves a decode step's reshapes and
// casts around each call (~8 a layer).
// `group_bytes`: a block's bytes per group in the layout (kGroupBytes for int4's).
template <typename Rows>
at::Tensor product_with(const at::Tensor& x, const at::Tensor& packed, int64_t n, int64_t k,
                        int64_t group_bytes, const Rows& rows_of) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == k && k % kGroup == 0 &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: [..., K] fp32 or bf16, K a multiple of 32");
  TORCH_CHECK(holds(packed, n, k, group_bytes), "packed: from its pack");
  at::Tensor rows = x.reshape({-1, k});  // a view where it can be
  if (rows.stride(1) != 1) rows = rows.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t m = rows.size(0);
  if (m == 0) return y;
  if (x.scalar_type() == at::kFloat)
    rows_of(rows.data_ptr<float>(), rows.stride(0), m, y.data_ptr<float>());
  else
    rows_of(reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>()), rows.stride(0), m,
            reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

}  // namespace
