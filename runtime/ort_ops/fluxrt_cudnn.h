// fluxrt's ONNX Runtime op library, the part that calls cuDNN: FP8 attention (Fp8Attention's CUDA
// kernel) through the cuDNN frontend's graph API. Host code only, compiled by the C++ compiler apart
// from fluxrt_ops.cu; cuDNN is opened at run time (the frontend's dynamic loading), so the library
// loads without it and only Fp8Attention on CUDA needs it.
#pragma once

#include <cstdint>
#include <string>

namespace fluxrt_cudnn {

// o = softmax(q k^T * attn_scale) v for E4M3 q, k, v, o laid out [B, L, H*D] (row-major, heads
// interleaved), on `stream`. `scales` is device memory: descale q, k, v, descale P, scale P, scale o
// (o is written as its value times scale o); `amax` (device, 2 floats) receives max |P| and max |o|.
// Returns "" on success, else what failed.
std::string fp8_attention(void* stream, int64_t B, int64_t L, int64_t H, int64_t D, float attn_scale, const void* q,
                          const void* k, const void* v, void* o, const float* scales, float* amax);

}  // namespace fluxrt_cudnn
