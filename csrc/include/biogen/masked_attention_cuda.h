// Host launchers of the CUDA masked gene attention (csrc/cuda/masked_attention.cu), declared without
// CUDA headers so bindings.cpp compiles with the host compiler. Pointers are tensor.data_ptr()
// values, strides are in elements (batch, head, row; the feature stride is 1), masks are (B, L)
// uint8 or 0 for "absent", `stream` is a cudaStream_t as an integer.
#pragma once
#include <cstdint>

namespace biogen::cuda {

// out: (B, H, L, D) contiguous, q's dtype; lse: (B, H, L) float32.
void masked_attention_fwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse,
                          uintptr_t key_padding_mask, uintptr_t known, int64_t B, int64_t H, int64_t L,
                          int64_t D, int64_t sqb, int64_t sqh, int64_t sql, int64_t skb, int64_t skh,
                          int64_t skl, int64_t svb, int64_t svh, int64_t svl, double scale, uintptr_t stream);

// dq, dk, dv: (B, H, L, D) contiguous float32; lse contiguous float32.
void masked_attention_bwd(int dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t grad_out,
                          uintptr_t lse, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t key_padding_mask,
                          uintptr_t known, int64_t B, int64_t H, int64_t L, int64_t D, int64_t sqb, int64_t sqh,
                          int64_t sql, int64_t skb, int64_t skh, int64_t skl, int64_t svb, int64_t svh,
                          int64_t svl, int64_t sob, int64_t soh, int64_t sol, int64_t sgb, int64_t sgh,
                          int64_t sgl, double scale, uintptr_t stream);

}  // namespace biogen::cuda
