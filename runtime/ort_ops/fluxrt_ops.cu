// fluxrt's ONNX Runtime custom-op library: the element-wise work of the FLUX transformer fused
// into four kernels, for the graph that `fluxrt export --attention ort-kernels` writes.
//
// Domain "fluxrt", version 1. All arithmetic in float32; inputs and outputs in T (float, float16,
// bfloat16 on CUDA; float on the CPU, where these kernels are the reference the CUDA ones are
// tested against).
//
//   NormRope(x0, bias0?, weight0?, x1?, bias1?, weight1?, cos?, sin?) -> y      attrs num_heads, epsilon
//     x0 [B, L0, H*D], x1 [B, L1, H*D] (joined after x0 along axis 1), bias [H*D], weight [D],
//     cos/sin float32 [L0+L1, D/2].  Per row and head: v = x + bias; with a weight,
//     v = v / sqrt(mean(v^2) + epsilon) * weight (RMS norm); with cos/sin, the pairs
//     (v[2i], v[2i+1]) rotate by the angle (cos[l, i], sin[l, i]) (FLUX's interleaved rotary).
//   AdaLayerNorm(x, scale, shift) -> y                                         attr epsilon
//     x [B, L, C], scale/shift [B, C] or [B, 1, C]: LayerNorm(x) * (1 + scale) + shift.
//   GatedResidual(residual, x, bias?, gate, x2?) -> y                          attr clamp
//     residual, x, x2 [B, L, C], bias [C], gate [B, C] or [B, 1, C]:
//     residual + gate * (x + x2 + bias), clamped to [-clamp, clamp] when clamp > 0.
//   BiasGelu(x, bias?) -> y
//     x [..., C], bias [C]: GELU with the tanh approximation of x + bias.
//
// FP8 (E4M3, "e4m3fn": max 448, no infinities). Quantizing v with a scale s gives the E4M3 value
// nearest v / s (ties to even), saturated to +-448 (NaN stays NaN): ONNX QuantizeLinear with a
// FLOAT8E4M3FN zero point and saturate=1. Scales are float32 and come in CPU memory.
//   Fp8Linear(x, x_scale, w, w_scale, bias) -> y
//     x E4M3 [..., K], x_scale [] or [1], w E4M3 [N, K] (one row per output feature), w_scale [N],
//     bias T [N]: y = (x . w^T) * x_scale * w_scale + bias, float32 accumulation, in bias's type T.
//     On CUDA: one cuBLASLt FP8 matrix product (Hopper or newer), the per-output-channel weight
//     scales and the bias applied in its epilogue; K and N multiples of 16; T bfloat16 or float16. The first call
//     of a shape times up to 16 of cuBLASLt's heuristic candidates and keeps the fastest (FLUXRT_FP8_AUTOTUNE=0:
//     the heuristic's first; inside a CUDA graph capture, always its first).                attr fast_accumulation
//     fast_accumulation 1 (default 0): on CUDA, cuBLASLt's FP8 fast accumulation (CUBLASLT_MATMUL_DESC_FAST_ACCUM:
//     the tensor cores' own accumulator throughout, never promoted to float32 on the way; faster, less exact, what
//     torchao's FP8 inference products use) where cuBLASLt has it for the shape, float32 accumulation where it has
//     not (on the H200: none for 64 rows by K = 12288). The CPU reference accumulates in float32 either way.
//   QuantizeFp8(x, scale) -> E4M3               x T [...]
//   AdaLayerNormFp8(x, scale, shift, quant_scale) -> E4M3     AdaLayerNorm, its output quantized
//   BiasGeluFp8(x, bias?, quant_scale) -> E4M3                 BiasGelu, its output quantized
//   NormRopeFp8(x0, ..., sin?, quant_scale) -> E4M3           NormRope, its output quantized
//   Fp8Attention(q, k, v, q_scale, k_scale, v_scale, o_scale, split?) -> o [, o1]   attrs num_heads, scale
//     q, k, v E4M3 [B, L, H*D]: o = softmax(q k^T * scale) v (scale 0: 1/sqrt(D)), each input dequantized by its
//     scale, written as E4M3 o / o_scale. The probabilities are themselves quantized, as E4M3 p * 448, before
//     they multiply v (what cuDNN's FP8 attention does); exp(s - max) is quantized, the division by the row sum
//     comes after the product. With split (int64 [2], CPU, summing to L) the output is cut along L into o
//     [B, split[0], H*D] and o1 [B, split[1], H*D]. On CUDA: cuDNN's FP8 attention (Hopper or newer).
//
// Column windows: NormRope(Fp8), BiasGelu(Fp8) and QuantizeFp8 take attributes column_start and column_count
// (default 0: the whole last axis). With column_count > 0 the op reads columns [column_start, column_start +
// column_count) of its x input(s) (x0 and x1 for NormRope), which may be wider: the products of several linears
// fused into one matrix product, each consumer reading its own columns in place. Outputs are contiguous.
//
// Built by runtime/ort_ops/build.py against ONNX Runtime's C API headers (ORT_API_VERSION >= 17).

#include <onnxruntime_c_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef FLUXRT_CPU_ONLY
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "fluxrt_cudnn.h"
#endif

namespace fluxrt_ops {  // kernel names carry it: profiles tell these kernels apart

constexpr uint32_t kOpVersion = 17;  // API and OrtCustomOp fields used here (CreateKernelV2, shape inference)
const OrtApi* g_api = nullptr;

struct Status {  // an OrtStatus* with a message naming the op
  static OrtStatusPtr error(const std::string& op, const std::string& msg) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("fluxrt." + op + ": " + msg).c_str());
  }
};

#define RETURN_IF(expr)                      \
  do {                                       \
    if (OrtStatusPtr _s = (expr)) return _s; \
  } while (0)

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

struct In {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  bool present() const { return data != nullptr || !shape.empty(); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.size() + i : i]; }
  int64_t size() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

OrtStatusPtr get_input(OrtKernelContext* ctx, size_t index, In* out) {
  size_t count = 0;
  RETURN_IF(g_api->KernelContext_GetInputCount(ctx, &count));
  if (index >= count) return nullptr;
  const OrtValue* value = nullptr;
  RETURN_IF(g_api->KernelContext_GetInput(ctx, index, &value));
  if (value == nullptr) return nullptr;  // omitted optional input
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatusPtr s = g_api->GetDimensionsCount(info, &rank);
  if (!s) {
    out->shape.resize(rank);
    s = g_api->GetDimensions(info, out->shape.data(), rank);
  }
  if (!s) s = g_api->GetTensorElementType(info, &out->type);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  RETURN_IF(s);
  void* data = nullptr;
  RETURN_IF(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->data = data;
  if (out->data == nullptr && out->size() != 0) out->shape.clear();
  return nullptr;
}

OrtStatusPtr get_output(OrtKernelContext* ctx, const std::vector<int64_t>& shape, void** data, size_t index = 0) {
  OrtValue* value = nullptr;
  RETURN_IF(g_api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &value));
  return g_api->GetTensorMutableData(value, data);
}

// ---- attributes ----------------------------------------------------------------------------------

float attr_float(const OrtKernelInfo* info, const char* name, float fallback) {
  float v = fallback;
  if (OrtStatusPtr s = g_api->KernelInfoGetAttribute_float(info, name, &v)) {
    g_api->ReleaseStatus(s);
    return fallback;
  }
  return v;
}

int64_t attr_int(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t v = fallback;
  if (OrtStatusPtr s = g_api->KernelInfoGetAttribute_int64(info, name, &v)) {
    g_api->ReleaseStatus(s);
    return fallback;
  }
  return v;
}

struct Attrs {
  int64_t num_heads = 0;
  float epsilon = 1e-6f;
  float clamp = 0.f;
  float scale = 0.f;  // Fp8Attention's softmax scale; 0: 1/sqrt(head size)
  int64_t col_start = 0, col_count = 0;  // the column window (see the top); count 0: the whole last axis
  int64_t fast_accum = 0;  // Fp8Linear's fast_accumulation
};

size_t element_size(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return 2;
    default: return 1;
  }
}

// x seen through the column window: its last axis cut to the window, its data pointer moved to the window's
// first column; *stride gets the elements between rows as stored. Without a window x stays and *stride is its
// last axis.
OrtStatusPtr window(const std::string& op, const char* name, const Attrs& a, In* x, int64_t* stride) {
  if (!x->present() || x->shape.empty()) {
    *stride = x->shape.empty() ? 1 : x->dim(-1);
    if (a.col_count > 0 && x->present()) return Status::error(op, std::string(name) + " is a scalar: no columns to window");
    return nullptr;
  }
  const int64_t width = x->dim(-1);
  *stride = width;
  if (a.col_count == 0 && a.col_start == 0) return nullptr;
  if (a.col_count <= 0 || a.col_start < 0 || a.col_start + a.col_count > width) {
    return Status::error(op, "column_start " + std::to_string(a.col_start) + " and column_count " +
                                 std::to_string(a.col_count) + " must give a non-empty window inside " + name +
                                 "'s last axis of " + std::to_string(width) + " (shape " + shape_str(x->shape) + ")");
  }
  x->data = static_cast<const char*>(x->data) + a.col_start * int64_t(element_size(x->type));
  x->shape.back() = a.col_count;
  return nullptr;
}

// The CPU kernels read contiguous rows: a windowed x is gathered into buf, and x points there.
void gather_window(In* x, int64_t stride, std::vector<float>* buf) {
  const int64_t C = x->shape.empty() ? 1 : x->dim(-1);
  if (!x->present() || stride == C) return;
  const int64_t rows = C ? x->size() / C : 0;
  buf->resize(rows * C);
  const float* src = static_cast<const float*>(x->data);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf->data() + r * C, src + r * stride, C * sizeof(float));
  x->data = buf->data();
}

// ---- shape checks shared by both devices ---------------------------------------------------------

struct NormRopeArgs {
  In x0, b0, w0, x1, b1, w1, cos, sin;
  int64_t B = 0, L0 = 0, L1 = 0, C = 0, H = 0, D = 0;
  int64_t s0 = 0, s1 = 0;  // row strides of x0 and x1 as stored (their width, or wider under a column window)
};

OrtStatusPtr check_norm_rope(const Attrs& a, NormRopeArgs* p) {
  const std::string op = "NormRope";
  if (p->x0.shape.size() != 3) return Status::error(op, "x0 must be [B, L, H*D], got " + shape_str(p->x0.shape));
  p->B = p->x0.dim(0), p->L0 = p->x0.dim(1), p->C = p->x0.dim(2), p->H = a.num_heads;
  if (p->H <= 0 || p->C % p->H) {
    return Status::error(op, "num_heads " + std::to_string(p->H) + " must be positive and divide the width " +
                                 std::to_string(p->C));
  }
  p->D = p->C / p->H;
  if (p->D % 2 || p->D > 512) {
    return Status::error(op, "head size " + std::to_string(p->D) + " must be even and at most 512");
  }
  if (p->x1.present()) {
    if (p->x1.shape.size() != 3 || p->x1.dim(0) != p->B || p->x1.dim(2) != p->C) {
      return Status::error(op, "x1 must be [" + std::to_string(p->B) + ", L1, " + std::to_string(p->C) +
                                   "] like x0, got " + shape_str(p->x1.shape));
    }
    p->L1 = p->x1.dim(1);
    if (p->w0.present() != p->w1.present()) {
      return Status::error(op, "weight0 and weight1 must both be given or both be omitted");
    }
  }
  for (const In* b : {&p->b0, &p->b1}) {
    if (b->present() && (b->shape.size() != 1 || b->dim(0) != p->C)) {
      return Status::error(op, "bias must be [" + std::to_string(p->C) + "], got " + shape_str(b->shape));
    }
  }
  for (const In* w : {&p->w0, &p->w1}) {
    if (w->present() && (w->shape.size() != 1 || w->dim(0) != p->D)) {
      return Status::error(op, "weight must be [" + std::to_string(p->D) + "] (one head), got " + shape_str(w->shape));
    }
  }
  if (p->cos.present() != p->sin.present()) return Status::error(op, "cos and sin must both be given or both be omitted");
  if (p->cos.present()) {
    std::vector<int64_t> want = {p->L0 + p->L1, p->D / 2};
    if (p->cos.shape != want || p->sin.shape != want) {
      return Status::error(op, "cos and sin must be " + shape_str(want) + ", got " + shape_str(p->cos.shape) + " and " +
                                   shape_str(p->sin.shape));
    }
    if (p->cos.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || p->sin.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      return Status::error(op, "cos and sin must be float32");
    }
  }
  return nullptr;
}

struct AdaNormArgs {
  In x, scale, shift;
  int64_t rows = 0, L = 0, C = 0;
};

OrtStatusPtr check_per_sample(const std::string& op, const char* name, const In& t, int64_t B, int64_t C) {
  bool ok = (t.shape.size() == 2 && t.dim(0) == B && t.dim(1) == C) ||
            (t.shape.size() == 3 && t.dim(0) == B && t.dim(1) == 1 && t.dim(2) == C);
  if (!ok) {
    return Status::error(op, std::string(name) + " must be [" + std::to_string(B) + ", " + std::to_string(C) +
                                 "] or [" + std::to_string(B) + ", 1, " + std::to_string(C) + "], got " +
                                 shape_str(t.shape));
  }
  return nullptr;
}

OrtStatusPtr check_ada_norm(AdaNormArgs* p) {
  const std::string op = "AdaLayerNorm";
  if (p->x.shape.size() != 3) return Status::error(op, "x must be [B, L, C], got " + shape_str(p->x.shape));
  p->L = p->x.dim(1), p->C = p->x.dim(2), p->rows = p->x.dim(0) * p->L;
  RETURN_IF(check_per_sample(op, "scale", p->scale, p->x.dim(0), p->C));
  return check_per_sample(op, "shift", p->shift, p->x.dim(0), p->C);
}

struct GatedArgs {
  In residual, x, bias, gate, x2;
  int64_t rows = 0, L = 0, C = 0;
};

OrtStatusPtr check_gated(GatedArgs* p) {
  const std::string op = "GatedResidual";
  if (p->residual.shape.size() != 3) {
    return Status::error(op, "residual must be [B, L, C], got " + shape_str(p->residual.shape));
  }
  if (p->x.shape != p->residual.shape) {
    return Status::error(op, "x must have the residual's shape " + shape_str(p->residual.shape) + ", got " +
                                 shape_str(p->x.shape));
  }
  if (p->x2.present() && p->x2.shape != p->residual.shape) {
    return Status::error(op, "x2 must have the residual's shape " + shape_str(p->residual.shape) + ", got " +
                                 shape_str(p->x2.shape));
  }
  p->L = p->residual.dim(1), p->C = p->residual.dim(2), p->rows = p->residual.dim(0) * p->L;
  if (p->bias.present() && (p->bias.shape.size() != 1 || p->bias.dim(0) != p->C)) {
    return Status::error(op, "bias must be [" + std::to_string(p->C) + "], got " + shape_str(p->bias.shape));
  }
  return check_per_sample(op, "gate", p->gate, p->residual.dim(0), p->C);
}

struct BiasGeluArgs {
  In x, bias;
  int64_t C = 0;
  int64_t stride = 0;  // x's row stride as stored (C, or wider under a column window)
};

OrtStatusPtr check_bias_gelu(BiasGeluArgs* p) {
  const std::string op = "BiasGelu";
  if (p->x.shape.empty()) return Status::error(op, "x must have at least one axis, got a scalar");
  p->C = p->x.dim(-1);
  if (p->bias.present() && (p->bias.shape.size() != 1 || p->bias.dim(0) != p->C)) {
    return Status::error(op, "bias must be [" + std::to_string(p->C) + "], got " + shape_str(p->bias.shape));
  }
  return nullptr;
}

// ---- FP8 arguments -----------------------------------------------------------------------------------

constexpr auto kE4M3 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT8E4M3FN;

// A quantization scale: a positive finite float32 scalar in CPU memory.
OrtStatusPtr read_scale(const std::string& op, const char* name, const In& t, float* out) {
  if (t.size() != 1 || t.shape.size() > 1) {
    return Status::error(op, std::string(name) + " must be a float32 scalar ([] or [1]), got " + shape_str(t.shape));
  }
  *out = *static_cast<const float*>(t.data);
  if (!(*out > 0.f) || !std::isfinite(*out)) {
    return Status::error(op, std::string(name) + " must be positive and finite, got " + std::to_string(*out));
  }
  return nullptr;
}

struct Fp8LinearArgs {
  In x, x_scale, w, w_scale, bias;
  float xs = 1.f;
  int64_t M = 0, K = 0, N = 0;
  bool fast_accum = false;  // the fast_accumulation attribute (CUDA only)
};

OrtStatusPtr check_fp8_linear(Fp8LinearArgs* p) {
  const std::string op = "Fp8Linear";
  if (p->x.shape.empty()) return Status::error(op, "x must be [..., K], got a scalar");
  if (p->w.shape.size() != 2) return Status::error(op, "w must be [N, K], got " + shape_str(p->w.shape));
  p->N = p->w.dim(0), p->K = p->w.dim(1);
  if (p->x.dim(-1) != p->K) {
    return Status::error(op, "x's last axis " + std::to_string(p->x.dim(-1)) + " must equal w's K = " +
                                 std::to_string(p->K) + " (w is " + shape_str(p->w.shape) + ")");
  }
  p->M = p->K ? p->x.size() / p->K : 0;
  if (p->w_scale.shape != std::vector<int64_t>{p->N}) {
    return Status::error(op, "w_scale must be [" + std::to_string(p->N) + "] (one per output feature), got " +
                                 shape_str(p->w_scale.shape));
  }
  if (p->bias.shape != std::vector<int64_t>{p->N}) {
    return Status::error(op, "bias must be [" + std::to_string(p->N) + "], got " + shape_str(p->bias.shape));
  }
  return read_scale(op, "x_scale", p->x_scale, &p->xs);
}

std::vector<int64_t> linear_shape(const Fp8LinearArgs& p) {
  std::vector<int64_t> s = p.x.shape;
  s.back() = p.N;
  return s;
}

struct Fp8AttentionArgs {
  In q, k, v, q_scale, k_scale, v_scale, o_scale, split;
  float qs = 1.f, ks = 1.f, vs = 1.f, os = 1.f, attn_scale = 1.f;
  int64_t B = 0, L = 0, C = 0, H = 0, D = 0, L0 = 0, L1 = 0;  // with split: L0 + L1 = L
};

OrtStatusPtr check_fp8_attention(const Attrs& a, Fp8AttentionArgs* p) {
  const std::string op = "Fp8Attention";
  if (p->q.shape.size() != 3) return Status::error(op, "q must be [B, L, H*D], got " + shape_str(p->q.shape));
  if (p->k.shape != p->q.shape || p->v.shape != p->q.shape) {
    return Status::error(op, "k and v must have q's shape " + shape_str(p->q.shape) + ", got " + shape_str(p->k.shape) +
                                 " and " + shape_str(p->v.shape));
  }
  p->B = p->q.dim(0), p->L = p->q.dim(1), p->C = p->q.dim(2), p->H = a.num_heads;
  if (p->H <= 0 || p->C % p->H) {
    return Status::error(op, "num_heads " + std::to_string(p->H) + " must be positive and divide the width " +
                                 std::to_string(p->C));
  }
  p->D = p->C / p->H;
  p->attn_scale = a.scale > 0.f ? a.scale : 1.f / std::sqrt(float(p->D));
  RETURN_IF(read_scale(op, "q_scale", p->q_scale, &p->qs));
  RETURN_IF(read_scale(op, "k_scale", p->k_scale, &p->ks));
  RETURN_IF(read_scale(op, "v_scale", p->v_scale, &p->vs));
  RETURN_IF(read_scale(op, "o_scale", p->o_scale, &p->os));
  p->L0 = p->L;
  if (p->split.present()) {
    const int64_t* s = static_cast<const int64_t*>(p->split.data);
    if (p->split.shape != std::vector<int64_t>{2} || s[0] < 0 || s[1] < 0 || s[0] + s[1] != p->L) {
      return Status::error(op, "split must be two non-negative lengths summing to L = " + std::to_string(p->L) +
                                   ", got " + (p->split.shape == std::vector<int64_t>{2}
                                                   ? "[" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + "]"
                                                   : "shape " + shape_str(p->split.shape)));
    }
    p->L0 = s[0], p->L1 = s[1];
  }
  return nullptr;
}

// ---- E4M3 on the host: the reference rounding -----------------------------------------------------

uint8_t e4m3_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint8_t sign = (u >> 24) & 0x80;
  if (std::isnan(f)) return sign | 0x7F;
  const float a = std::fabs(f);
  if (a >= 448.f) return sign | 0x7E;                         // saturate (infinities too)
  if (a < 0.015625f) return sign | uint8_t(std::nearbyint(a * 512.f));  // subnormals: steps of 2^-9; 8 is 2^-6
  int e = 0;
  std::frexp(a, &e);                                          // a = f * 2^e, f in [0.5, 1)
  int exponent = e - 1;                                       // a = 1.m * 2^exponent, exponent in [-6, 8]
  int q = int(std::nearbyint(std::ldexp(a, 3 - exponent)));   // 8..16, ties to even
  if (q == 16) q = 8, ++exponent;
  return sign | uint8_t((exponent + 7) << 3) | uint8_t(q - 8);
}

float e4m3_to_float(uint8_t b) {
  const int exponent = (b >> 3) & 0xF, mantissa = b & 7;
  float v;
  if (exponent == 15 && mantissa == 7) v = NAN;
  else if (exponent == 0) v = std::ldexp(float(mantissa), -9);
  else v = std::ldexp(1.f + mantissa / 8.f, exponent - 7);
  return (b & 0x80) ? -v : v;
}

void quantize_cpu(const float* x, int64_t n, float scale, uint8_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = e4m3_from_float(x[i] / scale);
}

// ---- CPU kernels (float32): the reference ----------------------------------------------------------

void norm_rope_cpu(const Attrs& a, const NormRopeArgs& p, float* y) {
  const int64_t L = p.L0 + p.L1;
  std::vector<float> v(p.D);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const bool first = l < p.L0;
      const float* x = static_cast<const float*>(first ? p.x0.data : p.x1.data) +
                       (b * (first ? p.L0 : p.L1) + (first ? l : l - p.L0)) * p.C;
      const float* bias = static_cast<const float*>(first ? p.b0.data : p.b1.data);
      const float* w = static_cast<const float*>(first ? p.w0.data : p.w1.data);
      for (int64_t h = 0; h < p.H; ++h) {
        double ss = 0;
        for (int64_t d = 0; d < p.D; ++d) {
          v[d] = x[h * p.D + d] + (bias ? bias[h * p.D + d] : 0.f);
          ss += double(v[d]) * v[d];
        }
        const float r = w ? 1.f / std::sqrt(float(ss / p.D) + a.epsilon) : 1.f;
        float* out = y + (b * L + l) * p.C + h * p.D;
        for (int64_t i = 0; i < p.D / 2; ++i) {
          float e = v[2 * i] * r * (w ? w[2 * i] : 1.f), o = v[2 * i + 1] * r * (w ? w[2 * i + 1] : 1.f);
          if (p.cos.data) {
            const float c = static_cast<const float*>(p.cos.data)[l * p.D / 2 + i];
            const float s = static_cast<const float*>(p.sin.data)[l * p.D / 2 + i];
            const float e2 = e * c - o * s;
            o = o * c + e * s;
            e = e2;
          }
          out[2 * i] = e, out[2 * i + 1] = o;
        }
      }
    }
}

void ada_norm_cpu(const Attrs& a, const AdaNormArgs& p, float* y) {
  const float* x = static_cast<const float*>(p.x.data);
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* row = x + r * p.C;
    const int64_t b = r / p.L;
    double mean = 0, var = 0;
    for (int64_t c = 0; c < p.C; ++c) mean += row[c];
    mean /= p.C;
    for (int64_t c = 0; c < p.C; ++c) var += (row[c] - mean) * (row[c] - mean);
    const float rstd = 1.f / std::sqrt(float(var / p.C) + a.epsilon);
    const float* sc = static_cast<const float*>(p.scale.data) + b * p.C;
    const float* sh = static_cast<const float*>(p.shift.data) + b * p.C;
    for (int64_t c = 0; c < p.C; ++c) y[r * p.C + c] = (row[c] - float(mean)) * rstd * (1.f + sc[c]) + sh[c];
  }
}

void gated_cpu(const Attrs& a, const GatedArgs& p, float* y) {
  const float* res = static_cast<const float*>(p.residual.data);
  const float* x = static_cast<const float*>(p.x.data);
  const float* x2 = static_cast<const float*>(p.x2.data);
  const float* bias = static_cast<const float*>(p.bias.data);
  const float* gate = static_cast<const float*>(p.gate.data);
  for (int64_t r = 0; r < p.rows; ++r) {
    const int64_t b = r / p.L;
    for (int64_t c = 0; c < p.C; ++c) {
      const int64_t i = r * p.C + c;
      float v = res[i] + gate[b * p.C + c] * (x[i] + (x2 ? x2[i] : 0.f) + (bias ? bias[c] : 0.f));
      if (a.clamp > 0) v = std::fmin(std::fmax(v, -a.clamp), a.clamp);
      y[i] = v;
    }
  }
}

void bias_gelu_cpu(const BiasGeluArgs& p, float* y) {
  const float* x = static_cast<const float*>(p.x.data);
  const float* bias = static_cast<const float*>(p.bias.data);
  const int64_t n = p.x.size();
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + (bias ? bias[i % p.C] : 0.f);
    y[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

// y[m, n] = sum_k x[m, k] w[n, k], float32 accumulation, then * x_scale * w_scale[n] + bias[n].
void fp8_linear_cpu(const Fp8LinearArgs& p, float* y) {
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = e4m3_to_float(uint8_t(i));
  const uint8_t* x = static_cast<const uint8_t*>(p.x.data);
  const uint8_t* w = static_cast<const uint8_t*>(p.w.data);
  const float* ws = static_cast<const float*>(p.w_scale.data);
  const float* bias = static_cast<const float*>(p.bias.data);
  std::vector<float> wf(p.N * p.K), xr(p.K);
  for (int64_t i = 0; i < p.N * p.K; ++i) wf[i] = lut[w[i]];
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t k = 0; k < p.K; ++k) xr[k] = lut[x[m * p.K + k]];
    for (int64_t n = 0; n < p.N; ++n) {
      const float* wr = wf.data() + n * p.K;
      float acc = 0.f;
      for (int64_t k = 0; k < p.K; ++k) acc += xr[k] * wr[k];
      y[m * p.N + n] = acc * p.xs * ws[n] + bias[n];
    }
  }
}

constexpr float kProbScale = 448.f;  // FP8 attention's probabilities are quantized as p * 448

// o [B, L, H*D] as E4M3, per (batch, head, query row) in float32 (see Fp8Attention at the top).
void fp8_attention_cpu(const Fp8AttentionArgs& p, uint8_t* o) {
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = e4m3_to_float(uint8_t(i));
  const uint8_t* q = static_cast<const uint8_t*>(p.q.data);
  const uint8_t* k = static_cast<const uint8_t*>(p.k.data);
  const uint8_t* v = static_cast<const uint8_t*>(p.v.data);
  const int64_t L = p.L, D = p.D, C = p.C;
  std::vector<float> kf(L * D), vf(L * D), qf(D), s(L), acc(D);
  const float score_scale = p.qs * p.ks * p.attn_scale;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h) {
      for (int64_t j = 0; j < L; ++j)
        for (int64_t d = 0; d < D; ++d) {
          kf[j * D + d] = lut[k[(b * L + j) * C + h * D + d]];
          vf[j * D + d] = lut[v[(b * L + j) * C + h * D + d]];
        }
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t d = 0; d < D; ++d) qf[d] = lut[q[(b * L + i) * C + h * D + d]];
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) {
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qf[d] * kf[j * D + d];
          s[j] = dot * score_scale;
          m = std::fmax(m, s[j]);
        }
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < L; ++j) {
          const float e = std::exp(s[j] - m);
          sum += e;
          const float p8 = e4m3_to_float(e4m3_from_float(e * kProbScale));
          for (int64_t d = 0; d < D; ++d) acc[d] += p8 * vf[j * D + d];
        }
        const float out_scale = p.vs / (kProbScale * sum * p.os);
        for (int64_t d = 0; d < D; ++d) o[(b * L + i) * C + h * D + d] = e4m3_from_float(acc[d] * out_scale);
      }
    }
}

// Rows [0, L0) of every batch item of x [B, L, C] (bytes) to y0 [B, L0, C], rows [L0, L) to y1.
void split_rows_cpu(const uint8_t* x, int64_t B, int64_t L, int64_t L0, int64_t C, uint8_t* y0, uint8_t* y1) {
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(y0 + b * L0 * C, x + b * L * C, L0 * C);
    std::memcpy(y1 + b * (L - L0) * C, x + (b * L + L0) * C, (L - L0) * C);
  }
}

// ---- CUDA kernels ----------------------------------------------------------------------------------

#ifndef FLUXRT_CPU_ONLY
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct Pair;  // two adjacent elements, one load
template <> struct Pair<float> { using type = float2; };
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };
__device__ __forceinline__ float2 to_f2(float2 v) { return v; }
__device__ __forceinline__ float2 to_f2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
template <typename T> __device__ __forceinline__ typename Pair<T>::type from_f2(float a, float b);
template <> __device__ __forceinline__ float2 from_f2<float>(float a, float b) { return make_float2(a, b); }
template <> __device__ __forceinline__ __half2 from_f2<__half>(float a, float b) { return __floats2half2_rn(a, b); }
template <> __device__ __forceinline__ __nv_bfloat162 from_f2<__nv_bfloat16>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr int kWarps = 8;  // warps per block: one row (or head row) per warp

// One warp per (b, l, head); each lane holds up to 8 pairs (head size <= 512).
template <typename T>
__global__ void norm_rope_kernel(const T* x0, const T* b0, const T* w0, const T* x1, const T* b1, const T* w1,
                                 const float* cos, const float* sin, T* y, int64_t B, int64_t L0, int64_t L1,
                                 int64_t H, int64_t D, float eps, int64_t s0, int64_t s1) {
  using P = typename Pair<T>::type;
  const int64_t L = L0 + L1;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= B * L * H) return;
  const int lane = threadIdx.x % 32;
  const int64_t h = row % H, bl = row / H, l = bl % L, b = bl / L;
  const bool first = l < L0;
  const T* x = (first ? x0 + (b * L0 + l) * s0 : x1 + (b * L1 + (l - L0)) * s1) + h * D;
  const T* bias = first ? b0 : b1;
  const T* w = first ? w0 : w1;
  const int pairs = int(D / 2);
  float e[8], o[8];
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int p = lane + 32 * k;
    e[k] = o[k] = 0.f;
    if (p < pairs) {
      float2 v = to_f2(reinterpret_cast<const P*>(x)[p]);
      if (bias) {
        const float2 bv = to_f2(reinterpret_cast<const P*>(bias + h * D)[p]);
        v.x += bv.x, v.y += bv.y;
      }
      e[k] = v.x, o[k] = v.y;
      ss += v.x * v.x + v.y * v.y;
    }
  }
  float r = 1.f;
  if (w) r = rsqrtf(warp_sum(ss) / float(D) + eps);
  T* out = y + (b * L + l) * H * D + h * D;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const int p = lane + 32 * k;
    if (p < pairs) {
      float ev = e[k] * r, ov = o[k] * r;
      if (w) {
        const float2 wv = to_f2(reinterpret_cast<const P*>(w)[p]);
        ev *= wv.x, ov *= wv.y;
      }
      if (cos) {
        const float c = cos[l * pairs + p], s = sin[l * pairs + p];
        const float e2 = ev * c - ov * s;
        ov = ov * c + ev * s;
        ev = e2;
      }
      reinterpret_cast<P*>(out)[p] = from_f2<T>(ev, ov);
    }
  }
}

// One warp per row: mean, then variance about the mean (the row stays in L1), then the output.
template <typename T>
__global__ void ada_norm_kernel(const T* x, const T* scale, const T* shift, T* y, int64_t rows, int64_t L,
                                int64_t C, float eps) {
  using P = typename Pair<T>::type;
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = r / L, pairs = C / 2;
  const P* row = reinterpret_cast<const P*>(x + r * C);
  float s = 0.f;
  for (int64_t p = lane; p < pairs; p += 32) {
    const float2 v = to_f2(row[p]);
    s += v.x + v.y;
  }
  const float mean = warp_sum(s) / float(C);
  float q = 0.f;
  for (int64_t p = lane; p < pairs; p += 32) {
    const float2 v = to_f2(row[p]);
    q += (v.x - mean) * (v.x - mean) + (v.y - mean) * (v.y - mean);
  }
  const float rstd = rsqrtf(warp_sum(q) / float(C) + eps);
  const P* sc = reinterpret_cast<const P*>(scale + b * C);
  const P* sh = reinterpret_cast<const P*>(shift + b * C);
  P* out = reinterpret_cast<P*>(y + r * C);
  for (int64_t p = lane; p < pairs; p += 32) {
    const float2 v = to_f2(row[p]), a = to_f2(sc[p]), t = to_f2(sh[p]);
    out[p] = from_f2<T>((v.x - mean) * rstd * (1.f + a.x) + t.x, (v.y - mean) * rstd * (1.f + a.y) + t.y);
  }
}

// Pairs of elements, grid-stride: residual + gate * (x + x2 + bias).
template <typename T>
__global__ void gated_kernel(const T* res, const T* x, const T* x2, const T* bias, const T* gate, T* y, int64_t n_pairs,
                             int64_t L, int64_t C, float clamp) {
  using P = typename Pair<T>::type;
  const int64_t cp = C / 2;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_pairs; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % cp, b = i / cp / L;
    float2 v = to_f2(reinterpret_cast<const P*>(x)[i]);
    if (x2) {
      const float2 u = to_f2(reinterpret_cast<const P*>(x2)[i]);
      v.x += u.x, v.y += u.y;
    }
    if (bias) {
      const float2 u = to_f2(reinterpret_cast<const P*>(bias)[c]);
      v.x += u.x, v.y += u.y;
    }
    const float2 g = to_f2(reinterpret_cast<const P*>(gate)[b * cp + c]);
    const float2 h = to_f2(reinterpret_cast<const P*>(res)[i]);
    float a = h.x + g.x * v.x, d = h.y + g.y * v.y;
    if (clamp > 0.f) a = fminf(fmaxf(a, -clamp), clamp), d = fminf(fmaxf(d, -clamp), clamp);
    reinterpret_cast<P*>(y)[i] = from_f2<T>(a, d);
  }
}

// Eight adjacent elements, one 16-byte access (two for float): the memory-bound kernels' unit.
template <typename T> struct alignas(16) Vec8 { T v[8]; };

template <typename T> __device__ __forceinline__ void load8(const T* p, float* out) {
  const Vec8<T> a = *reinterpret_cast<const Vec8<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_f(a.v[i]);
}

template <typename T> __device__ __forceinline__ void store8(T* p, const float* in) {
  Vec8<T> a;
#pragma unroll
  for (int i = 0; i < 8; ++i) a.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec8<T>*>(p) = a;
}

// FP8 outputs: v / qscale to the nearest E4M3 value, saturated (the host's e4m3_from_float). The quotient is taken
// from the reciprocal, inv = 1 / qscale rounded on the host, and one FMA correction (Markstein's): q0 = v * inv,
// q = q0 + (v - q0 * qscale) * inv is v / qscale correctly rounded wherever the remainder does not underflow, and
// where it does (|v| < 2^-100) the E4M3 code is 0 either way; an infinite q0 (overflow or v infinite) saturates as
// the division's would. One multiply and two FMAs instead of an IEEE division per element: these kernels were
// bound by the division's reciprocal on the special-function units beside GELU's exponential. E4M3 pairs are
// converted by one instruction (cvt.rn.satfinite.e4m3x2.f32 on sm_89+), the first element in the low byte.
struct QScale {
  float s = 1.f, inv = 1.f;
};
inline QScale qscale_of(float s) { return QScale{s, 1.f / s}; }

__device__ __forceinline__ float div_by(float v, QScale q) {
  const float q0 = __fmul_rn(v, q.inv);
  return isinf(q0) ? q0 : __fmaf_rn(__fmaf_rn(-q0, q.s, v), q.inv, q0);
}
__device__ __forceinline__ uint8_t to_e4m3(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }

// One output element / eight adjacent ones, in O: T as computed, or uint8_t (E4M3) after / qscale.
template <typename O> __device__ __forceinline__ O out1(float v, QScale) { return from_f<O>(v); }
template <> __device__ __forceinline__ uint8_t out1<uint8_t>(float v, QScale q) { return to_e4m3(div_by(v, q)); }
template <typename O> __device__ __forceinline__ void out8(O* p, const float* in, QScale) { store8(p, in); }
template <> __device__ __forceinline__ void out8<uint8_t>(uint8_t* p, const float* in, QScale q) {
  uint2 packed;
  uint16_t* pairs = reinterpret_cast<uint16_t*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    pairs[i] = __nv_cvt_float2_to_fp8x2(make_float2(div_by(in[2 * i], q), div_by(in[2 * i + 1], q)), __NV_SATFINITE,
                                        __NV_E4M3);
  *reinterpret_cast<uint2*>(p) = packed;
}

// NormRope when the head size D is a multiple of 8 and D/8 divides 32: D/8 threads per head row,
// eight elements (four pairs) each; the row's sum of squares is reduced among those threads.
template <typename T, typename O = T>
__global__ void norm_rope_vec8_kernel(const T* x0, const T* b0, const T* w0, const T* x1, const T* b1, const T* w1,
                                      const float* cos, const float* sin, O* y, int64_t B, int64_t L0, int64_t L1,
                                      int64_t H, int D, float eps, int64_t s0, int64_t s1, QScale qscale = {}) {
  const int tpr = D / 8;  // threads per head row
  const int64_t L = L0 + L1;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / tpr;
  const int j = int(t % tpr);
  const bool active = row < B * L * H;
  const int64_t r = active ? row : 0;
  const int64_t h = r % H, bl = r / H, l = bl % L, b = bl / L;
  const bool first = l < L0;
  const T* x = (first ? x0 + (b * L0 + l) * s0 : x1 + (b * L1 + (l - L0)) * s1) + h * D + 8 * j;
  const T* bias = first ? b0 : b1;
  const T* w = first ? w0 : w1;
  float v[8], u[8];
  load8(x, v);
  if (bias) {
    load8(bias + h * D + 8 * j, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] += u[i];
  }
  if (w) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    for (int o = tpr / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float rr = rsqrtf(ss / float(D) + eps);
    load8(w + 8 * j, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] *= rr * u[i];
  }
  if (cos) {
    const float4 c = *reinterpret_cast<const float4*>(cos + l * (D / 2) + 4 * j);
    const float4 s = *reinterpret_cast<const float4*>(sin + l * (D / 2) + 4 * j);
    const float cc[4] = {c.x, c.y, c.z, c.w}, sn[4] = {s.x, s.y, s.z, s.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float e = v[2 * k], o = v[2 * k + 1];
      v[2 * k] = e * cc[k] - o * sn[k];
      v[2 * k + 1] = o * cc[k] + e * sn[k];
    }
  }
  if (active) out8(y + (b * L + l) * H * D + h * D + 8 * j, v, qscale);
}

// AdaLayerNorm when C is a multiple of 8: one warp per row, eight elements per access; the row
// is read three times (mean, variance about it, output), the last two from cache.
template <typename T, typename O = T>
__global__ void ada_norm_vec8_kernel(const T* x, const T* scale, const T* shift, O* y, int64_t rows, int64_t L,
                                     int64_t C, float eps, QScale qscale = {}) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = r / L;
  const T* row = x + r * C;
  float v[8], a[8], t[8];
  float s = 0.f;
  for (int64_t c = 8 * lane; c < C; c += 256) {
    load8(row + c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) s += v[i];
  }
  const float mean = warp_sum(s) / float(C);
  float q = 0.f;
  for (int64_t c = 8 * lane; c < C; c += 256) {
    load8(row + c, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) q += (v[i] - mean) * (v[i] - mean);
  }
  const float rstd = rsqrtf(warp_sum(q) / float(C) + eps);
  for (int64_t c = 8 * lane; c < C; c += 256) {
    load8(row + c, v);
    load8(scale + b * C + c, a);
    load8(shift + b * C + c, t);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (v[i] - mean) * rstd * (1.f + a[i]) + t[i];
    out8(y + r * C + c, v, qscale);
  }
}

// 0.5 v (1 + tanh(u)) written as v / (1 + exp(-2u)): one fast exponential and one fast division rather than
// tanhf's long polynomial (these kernels were ALU-bound on it); exp(-2u) = inf gives -0, as tanh's -1 does.
__device__ __forceinline__ float gelu_tanh(float v) {
  const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return __fdividef(v, 1.f + __expf(-2.f * u));
}

// BiasGelu: gelu_tanh(x + bias), eight elements per thread when C is a multiple of 8, else one.
template <typename T, typename O = T>
__global__ void bias_gelu_kernel(const T* x, const T* bias, O* y, int64_t n, int64_t C, bool vec8, int64_t xs,
                                 QScale qscale = {}) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec8) {
    float v[8], u[8];
    for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8; i < n; i += stride * 8) {
      load8(x + (xs == C ? i : i / C * xs + i % C), v);
      if (bias) {
        load8(bias + i % C, u);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] += u[k];
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = gelu_tanh(v[k]);
      out8(y + i, v, qscale);
    }
    return;
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    y[i] = out1<O>(gelu_tanh(to_f(x[xs == C ? i : i / C * xs + i % C]) + (bias ? to_f(bias[i % C]) : 0.f)), qscale);
  }
}

// QuantizeFp8: x / qscale to E4M3, eight elements per thread when n is a multiple of 8, else one. With a column
// window, x's rows of C elements lie xs apart.
template <typename T>
__global__ void quantize_kernel(const T* x, uint8_t* y, int64_t n, bool vec8, QScale qscale, int64_t C, int64_t xs) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  if (vec8) {
    float v[8];
    for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8; i < n; i += stride * 8) {
      load8(x + (xs == C ? i : i / C * xs + i % C), v);
      out8(y + i, v, qscale);
    }
    return;
  }
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = out1<uint8_t>(to_f(x[xs == C ? i : i / C * xs + i % C]), qscale);
}

__global__ void fill_kernel(float* p, int64_t n, float v) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) p[i] = v;
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

template <typename T> const T* ptr(const In& t) { return static_cast<const T*>(t.data); }

OrtStatusPtr cuda_status(const std::string& op) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return nullptr;
  return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, ("fluxrt." + op + ": CUDA launch failed: " + cudaGetErrorString(e)).c_str());
}

unsigned blocks_for(int64_t rows) { return unsigned((rows + kWarps - 1) / kWarps); }

template <typename T>
OrtStatusPtr norm_rope_cuda(cudaStream_t st, const Attrs& a, const NormRopeArgs& p, void* y) {
  const int64_t rows = p.B * (p.L0 + p.L1) * p.H;
  const bool vec8 = p.D % 8 == 0 && 32 % (p.D / 8) == 0 && p.s0 % 8 == 0 && p.s1 % 8 == 0 &&
                    aligned16({p.x0.data, p.b0.data, p.w0.data, p.x1.data, p.b1.data, p.w1.data, p.cos.data, p.sin.data, y});
  if (rows > 0 && vec8) {
    const int64_t threads = rows * (p.D / 8);
    norm_rope_vec8_kernel<T><<<unsigned((threads + 255) / 256), 256, 0, st>>>(
        ptr<T>(p.x0), ptr<T>(p.b0), ptr<T>(p.w0), ptr<T>(p.x1), ptr<T>(p.b1), ptr<T>(p.w1), ptr<float>(p.cos),
        ptr<float>(p.sin), static_cast<T*>(y), p.B, p.L0, p.L1, p.H, int(p.D), a.epsilon, p.s0, p.s1);
  } else if (rows > 0)
    norm_rope_kernel<T><<<blocks_for(rows), 32 * kWarps, 0, st>>>(
        ptr<T>(p.x0), ptr<T>(p.b0), ptr<T>(p.w0), ptr<T>(p.x1), ptr<T>(p.b1), ptr<T>(p.w1), ptr<float>(p.cos),
        ptr<float>(p.sin), static_cast<T*>(y), p.B, p.L0, p.L1, p.H, p.D, a.epsilon, p.s0, p.s1);
  return cuda_status("NormRope");
}

template <typename T>
OrtStatusPtr ada_norm_cuda(cudaStream_t st, const Attrs& a, const AdaNormArgs& p, void* y) {
  if (p.rows > 0 && p.C % 8 == 0 && aligned16({p.x.data, p.scale.data, p.shift.data, y}))
    ada_norm_vec8_kernel<T><<<blocks_for(p.rows), 32 * kWarps, 0, st>>>(ptr<T>(p.x), ptr<T>(p.scale), ptr<T>(p.shift),
                                                                         static_cast<T*>(y), p.rows, p.L, p.C, a.epsilon);
  else if (p.rows > 0)
    ada_norm_kernel<T><<<blocks_for(p.rows), 32 * kWarps, 0, st>>>(ptr<T>(p.x), ptr<T>(p.scale), ptr<T>(p.shift),
                                                                    static_cast<T*>(y), p.rows, p.L, p.C, a.epsilon);
  return cuda_status("AdaLayerNorm");
}

template <typename T>
OrtStatusPtr gated_cuda(cudaStream_t st, const Attrs& a, const GatedArgs& p, void* y) {
  const int64_t n_pairs = p.rows * p.C / 2;
  if (n_pairs > 0) {
    const int64_t blocks = std::min<int64_t>((n_pairs + 255) / 256, 132 * 32);
    gated_kernel<T><<<unsigned(blocks), 256, 0, st>>>(ptr<T>(p.residual), ptr<T>(p.x), ptr<T>(p.x2), ptr<T>(p.bias),
                                                      ptr<T>(p.gate), static_cast<T*>(y), n_pairs, p.L, p.C, a.clamp);
  }
  return cuda_status("GatedResidual");
}

template <typename T>
OrtStatusPtr bias_gelu_cuda(cudaStream_t st, const BiasGeluArgs& p, void* y) {
  const int64_t n = p.x.size();
  const bool vec8 = p.C % 8 == 0 && p.stride % 8 == 0 && aligned16({p.x.data, p.bias.data, y});
  const int64_t work = vec8 ? n / 8 : n;
  if (n > 0) {
    const int64_t blocks = std::min<int64_t>((work + 255) / 256, 132 * 32);
    bias_gelu_kernel<T><<<unsigned(blocks), 256, 0, st>>>(ptr<T>(p.x), ptr<T>(p.bias), static_cast<T*>(y), n, p.C, vec8,
                                                          p.stride);
  }
  return cuda_status("BiasGelu");
}

// ---- FP8 on CUDA -------------------------------------------------------------------------------------

unsigned grid_for(int64_t work) { return unsigned(std::max<int64_t>(1, std::min<int64_t>((work + 255) / 256, 132 * 32))); }

template <typename T>
OrtStatusPtr ada_norm_fp8_cuda(cudaStream_t st, const Attrs& a, const AdaNormArgs& p, float qscale, void* y) {
  if (p.rows > 0)
    ada_norm_vec8_kernel<T, uint8_t><<<blocks_for(p.rows), 32 * kWarps, 0, st>>>(
        ptr<T>(p.x), ptr<T>(p.scale), ptr<T>(p.shift), static_cast<uint8_t*>(y), p.rows, p.L, p.C, a.epsilon, qscale_of(qscale));
  return cuda_status("AdaLayerNormFp8");
}

template <typename T>
OrtStatusPtr bias_gelu_fp8_cuda(cudaStream_t st, const BiasGeluArgs& p, float qscale, void* y) {
  const int64_t n = p.x.size();
  const bool vec8 = p.C % 8 == 0 && p.stride % 8 == 0 && aligned16({p.x.data, p.bias.data}) &&
                    reinterpret_cast<uintptr_t>(y) % 8 == 0;
  if (n > 0)
    bias_gelu_kernel<T, uint8_t><<<grid_for(vec8 ? n / 8 : n), 256, 0, st>>>(
        ptr<T>(p.x), ptr<T>(p.bias), static_cast<uint8_t*>(y), n, p.C, vec8, p.stride, qscale_of(qscale));
  return cuda_status("BiasGeluFp8");
}

template <typename T>
OrtStatusPtr quantize_cuda(cudaStream_t st, const In& x, int64_t stride, float qscale, void* y) {
  const int64_t n = x.size();
  const int64_t C = x.shape.empty() ? 1 : x.dim(-1);
  const bool windowed = stride != C;
  const int64_t c = windowed ? C : n, xs = windowed ? stride : n;  // contiguous: one flat row
  const bool vec8 = c % 8 == 0 && xs % 8 == 0 && aligned16({x.data}) && reinterpret_cast<uintptr_t>(y) % 8 == 0;
  if (n > 0)
    quantize_kernel<T><<<grid_for(vec8 ? n / 8 : n), 256, 0, st>>>(ptr<T>(x), static_cast<uint8_t*>(y), n, vec8, qscale_of(qscale),
                                                                   c, xs);
  return cuda_status("QuantizeFp8");
}

OrtStatusPtr lt_status(cublasStatus_t s, const std::string& what) {
  if (s == CUBLAS_STATUS_SUCCESS) return nullptr;
  return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION,
                             ("fluxrt.Fp8Linear: " + what + " failed: " + cublasLtGetStatusString(s)).c_str());
}

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt's recommendation for Hopper

// One cuBLASLt handle per device and one workspace per (device, stream): kernels on one stream run
// in order, so they share it; two streams never do.
struct LtDevice {
  cublasLtHandle_t handle = nullptr;
  std::map<cudaStream_t, void*> workspace;
};

OrtStatusPtr lt_device(cudaStream_t st, cublasLtHandle_t* handle, void** workspace) {
  static std::mutex mu;
  static std::map<int, LtDevice> devices;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return cuda_status("Fp8Linear");
  std::lock_guard<std::mutex> lock(mu);
  LtDevice& d = devices[dev];
  if (!d.handle) RETURN_IF(lt_status(cublasLtCreate(&d.handle), "cublasLtCreate"));
  void*& ws = d.workspace[st];
  if (!ws && cudaMalloc(&ws, kWorkspaceBytes) != cudaSuccess) {
    ws = nullptr;
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, "fluxrt.Fp8Linear: could not allocate cuBLASLt's 32 MiB workspace");
  }
  *handle = d.handle, *workspace = ws;
  return nullptr;
}

// A matrix product planned for one row count M: descriptors, the heuristic's algorithm, and the
// activation's scale as a vector (cuBLASLt's per-channel scaling on Hopper scales both operands by
// vectors: the weights' per output feature, the activation's per row, here all x_scale).
struct LtPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  float* x_scales = nullptr;
  float x_scale = 0.f;  // the value x_scales holds
};

struct LtState {
  std::mutex mu;
  std::map<std::pair<int64_t, int>, LtPlan> plans;  // (M, output type)
  ~LtState() {
    for (auto& [key, p] : plans) {
      if (p.desc) cublasLtMatmulDescDestroy(p.desc);
      for (auto l : {p.a, p.b, p.c})
        if (l) cublasLtMatrixLayoutDestroy(l);
      // x_scales stays allocated: a CUDA graph captured with it may outlive this kernel
    }
  }
};

template <typename T> cudaDataType_t cuda_type();
template <> cudaDataType_t cuda_type<float>() { return CUDA_R_32F; }
template <> cudaDataType_t cuda_type<__half>() { return CUDA_R_16F; }
template <> cudaDataType_t cuda_type<__nv_bfloat16>() { return CUDA_R_16BF; }

constexpr int kCandidates = 16;  // cuBLASLt's heuristic's algorithms timed per new shape (FLUXRT_FP8_AUTOTUNE=0: its first)

// The fastest of the heuristic's candidates on this product, timed on the stream with the call's own operands (y is
// overwritten by the call right after). Not inside a CUDA graph capture: there the heuristic's first is taken.
int fastest(cublasLtHandle_t handle, const LtPlan& plan, const cublasLtMatmulHeuristicResult_t* results, int found,
            const Fp8LinearArgs& p, void* y, void* workspace, cudaStream_t st) {
  const char* env = std::getenv("FLUXRT_FP8_AUTOTUNE");
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(st, &capturing);
  if (found < 2 || capturing != cudaStreamCaptureStatusNone || (env && std::strcmp(env, "0") == 0)) return 0;
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess) return cudaGetLastError(), 0;
  if (cudaEventCreate(&stop) != cudaSuccess) return cudaEventDestroy(start), cudaGetLastError(), 0;
  const float alpha = 1.f, beta = 0.f;
  int best = 0;
  float best_ms = INFINITY;
  for (int i = 0; i < found; ++i) {
    auto run = [&] {
      return cublasLtMatmul(handle, plan.desc, &alpha, p.w.data, plan.a, p.x.data, plan.b, &beta, y, plan.c, y, plan.c,
                            &results[i].algo, workspace, kWorkspaceBytes, st);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; an algorithm that fails is not a candidate
    cudaEventRecord(start, st);
    bool ok = true;
    for (int r = 0; r < 3 && ok; ++r) ok = run() == CUBLAS_STATUS_SUCCESS;
    cudaEventRecord(stop, st);
    float ms = INFINITY;
    if (ok && cudaEventSynchronize(stop) == cudaSuccess && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess &&
        ms < best_ms) {
      best_ms = ms, best = i;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaGetLastError();  // a failed candidate leaves nothing behind for the next launch to report
  return best;
}

OrtStatusPtr make_plan(cublasLtHandle_t handle, const Fp8LinearArgs& p, cudaDataType_t out, cudaStream_t st,
                       LtPlan* plan, void* y, void* workspace) {
  const std::string shape = "an FP8 product of " + std::to_string(p.M) + "x" + std::to_string(p.K) + " by " +
                            std::to_string(p.K) + "x" + std::to_string(p.N);
  RETURN_IF(lt_status(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate"));
  const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
  const cublasLtMatmulMatrixScale_t vec = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
  const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
  auto set = [&](cublasLtMatmulDescAttributes_t attr, const void* v, size_t size) {
    return lt_status(cublasLtMatmulDescSetAttribute(plan->desc, attr, v, size), "setting a matmul attribute");
  };
  // column-major view: y^T [N, M] = (w [N, K]) . (x^T [K, M]); w is K x N column-major, transposed
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof n));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &vec, sizeof vec));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec, sizeof vec));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out, sizeof out));
  const int8_t fast = p.fast_accum ? 1 : 0;
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast));
  // the heuristic wants the scale and bias pointers set (they are set again before every product)
  const int64_t rows = std::max<int64_t>(p.M, 1);
  if (cudaMalloc(&plan->x_scales, rows * sizeof(float)) != cudaSuccess) return cuda_status("Fp8Linear");
  fill_kernel<<<grid_for(rows), 256, 0, st>>>(plan->x_scales, rows, p.xs);
  plan->x_scale = p.xs;
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p.w_scale.data, sizeof(void*)));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &plan->x_scales, sizeof(void*)));
  RETURN_IF(set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias.data, sizeof(void*)));
  RETURN_IF(lt_status(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_8F_E4M3, p.K, p.N, p.K), "layout"));
  RETURN_IF(lt_status(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_8F_E4M3, p.K, p.M, p.K), "layout"));
  RETURN_IF(lt_status(cublasLtMatrixLayoutCreate(&plan->c, out, p.N, p.M, p.N), "layout"));
  cublasLtMatmulPreference_t pref = nullptr;
  RETURN_IF(lt_status(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate"));
  const size_t ws = kWorkspaceBytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
  cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
  int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c, pref,
                                                    kCandidates, results, &found);
  if (p.fast_accum && (s != CUBLAS_STATUS_SUCCESS || found == 0)) {
    // cuBLASLt has fast accumulation for some shapes only (on the H200 none for 64 rows by K = 12288): this product
    // accumulates in float32, as the op's documentation says
    const int8_t exact = 0;
    RETURN_IF(set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, &exact, sizeof exact));
    found = 0;
    s = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->c, plan->c, pref, kCandidates,
                                       results, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
    int dev = 0, major = 0, minor = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    return g_api->CreateStatus(
        ORT_NOT_IMPLEMENTED,
        ("fluxrt.Fp8Linear: cuBLASLt " + std::to_string(cublasLtGetVersion()) + " has no algorithm for " + shape +
         " with per-channel (outer vector) scales on this GPU (compute capability " + std::to_string(major) + "." +
         std::to_string(minor) + "; " + cublasLtGetStatusString(s) +
         "): FP8 linears need a Hopper (sm_90) or newer GPU and CUDA 12.9 or newer")
            .c_str());
  }
  plan->algo = results[fastest(handle, *plan, results, found, p, y, workspace, st)].algo;
  return cuda_status("Fp8Linear");
}

template <typename T>
OrtStatusPtr fp8_linear_cuda(cudaStream_t st, LtState& state, const Fp8LinearArgs& p, void* y) {
  if (std::is_same<T, float>::value) {
    return Status::error("Fp8Linear", "float32 output is not supported on CUDA (cuBLASLt's FP8 products with "
                                      "per-channel scales write bfloat16 or float16): quantize a bf16 or fp16 export "
                                      "for CUDA; an fp32 FP8 export runs on the CPU");
  }
  if (p.M == 0 || p.N == 0) return nullptr;
  if (p.K % 16 || p.N % 16) {
    return Status::error("Fp8Linear", "on CUDA, K and N must be multiples of 16 (cuBLASLt's FP8 layouts), got K = " +
                                          std::to_string(p.K) + ", N = " + std::to_string(p.N));
  }
  cublasLtHandle_t handle;
  void* workspace;
  RETURN_IF(lt_device(st, &handle, &workspace));
  std::lock_guard<std::mutex> lock(state.mu);  // one kernel object may run on several threads
  const cudaDataType_t out = cuda_type<T>();
  LtPlan& plan = state.plans[{p.M, int(out)}];
  if (!plan.desc) {
    OrtStatusPtr s = make_plan(handle, p, out, st, &plan, y, workspace);
    if (s) {
      state.plans.erase({p.M, int(out)});
      return s;
    }
  } else if (plan.x_scale != p.xs) {  // a scale fed at run time rather than stored in the graph
    fill_kernel<<<grid_for(p.M), 256, 0, st>>>(plan.x_scales, p.M, p.xs);
    plan.x_scale = p.xs;
  }
  const void* w_scale = p.w_scale.data;
  const void* bias = p.bias.data;
  RETURN_IF(lt_status(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale,
                                                     sizeof w_scale), "setting the weight scales"));
  RETURN_IF(lt_status(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &plan.x_scales,
                                                     sizeof plan.x_scales), "setting the activation scales"));
  RETURN_IF(lt_status(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias),
                      "setting the bias"));
  const float alpha = 1.f, beta = 0.f;
  RETURN_IF(lt_status(cublasLtMatmul(handle, plan.desc, &alpha, p.w.data, plan.a, p.x.data, plan.b, &beta, y, plan.c, y,
                                     plan.c, &plan.algo, workspace, kWorkspaceBytes, st),
                      "cublasLtMatmul"));
  return cuda_status("Fp8Linear");
}

template <typename T>
OrtStatusPtr norm_rope_fp8_cuda(cudaStream_t st, const Attrs& a, const NormRopeArgs& p, float qscale, void* y) {
  const int64_t rows = p.B * (p.L0 + p.L1) * p.H;
  const bool vec8 = p.D % 8 == 0 && 32 % (p.D / 8) == 0 && p.s0 % 8 == 0 && p.s1 % 8 == 0 &&
                    aligned16({p.x0.data, p.b0.data, p.w0.data, p.x1.data, p.b1.data, p.w1.data, p.cos.data, p.sin.data}) &&
                    reinterpret_cast<uintptr_t>(y) % 8 == 0;
  if (!vec8) {
    return Status::error("NormRopeFp8", "on CUDA, the head size must be a multiple of 8 that divides 256 (got " +
                                            std::to_string(p.D) + "), the rows and column window start on multiples "
                                            "of 8 elements and the tensors 16-byte aligned");
  }
  if (rows > 0) {
    const int64_t threads = rows * (p.D / 8);
    norm_rope_vec8_kernel<T, uint8_t><<<unsigned((threads + 255) / 256), 256, 0, st>>>(
        ptr<T>(p.x0), ptr<T>(p.b0), ptr<T>(p.w0), ptr<T>(p.x1), ptr<T>(p.b1), ptr<T>(p.w1), ptr<float>(p.cos),
        ptr<float>(p.sin), static_cast<uint8_t*>(y), p.B, p.L0, p.L1, p.H, int(p.D), a.epsilon, p.s0, p.s1, qscale_of(qscale));
  }
  return cuda_status("NormRopeFp8");
}

// cuDNN reads its scales from device memory: descale q, k, v, descale P, scale P, scale o; then amax P, amax o.
__global__ void attention_scales_kernel(float* d, float qs, float ks, float vs, float os) {
  d[0] = qs, d[1] = ks, d[2] = vs, d[3] = 1.f / kProbScale, d[4] = kProbScale, d[5] = 1.f / os;
}

// One kernel object's device memory: its scales, and with a split the whole output before it is cut. Both stay
// allocated after the kernel is gone: a CUDA graph captured with them may outlive it.
struct AttnState {
  std::mutex mu;
  float* scales = nullptr;
  float set[4] = {0.f, 0.f, 0.f, 0.f};  // the q, k, v, o scales `scales` holds
  void* whole = nullptr;
  int64_t whole_bytes = 0;
};

OrtStatusPtr attention_error(const std::string& msg) {
  return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, ("fluxrt.Fp8Attention: " + msg).c_str());
}

OrtStatusPtr fp8_attention_cuda(cudaStream_t st, AttnState& s, const Fp8AttentionArgs& p, void* y0, void* y1) {
  if (p.B * p.L * p.C == 0) return nullptr;
  std::lock_guard<std::mutex> lock(s.mu);
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(st, &capturing);
  const bool in_capture = capturing != cudaStreamCaptureStatusNone;
  if (!s.scales) {
    if (in_capture) return attention_error("first run inside a CUDA graph capture; run once before capturing");
    if (cudaMalloc(&s.scales, 8 * sizeof(float)) != cudaSuccess) return attention_error("could not allocate its scales");
  }
  const float want[4] = {p.qs, p.ks, p.vs, p.os};
  if (!std::equal(want, want + 4, s.set)) {
    attention_scales_kernel<<<1, 1, 0, st>>>(s.scales, p.qs, p.ks, p.vs, p.os);
    std::copy(want, want + 4, s.set);
  }
  void* target = y0;
  const bool split = y1 != nullptr;
  if (split) {
    const int64_t bytes = p.B * p.L * p.C;
    if (s.whole_bytes < bytes) {
      if (in_capture) return attention_error("its buffer would grow inside a CUDA graph capture; run once before capturing");
      if (s.whole) cudaFree(s.whole);  // growth happens outside capture, so no captured graph uses the old one
      s.whole = nullptr, s.whole_bytes = 0;
      if (cudaMalloc(&s.whole, bytes) != cudaSuccess) return attention_error("could not allocate its output buffer");
      s.whole_bytes = bytes;
    }
    target = s.whole;
  }
  const std::string err = fluxrt_cudnn::fp8_attention(st, p.B, p.L, p.H, p.D, p.attn_scale, p.q.data, p.k.data, p.v.data,
                                                      target, s.scales, s.scales + 6);
  if (!err.empty()) return attention_error(err);
  if (split) {
    const char* whole = static_cast<const char*>(s.whole);
    if (p.L0 && cudaMemcpy2DAsync(y0, p.L0 * p.C, whole, p.L * p.C, p.L0 * p.C, p.B, cudaMemcpyDeviceToDevice, st))
      return cuda_status("Fp8Attention");
    if (p.L1 && cudaMemcpy2DAsync(y1, p.L1 * p.C, whole + p.L0 * p.C, p.L * p.C, p.L1 * p.C, p.B,
                                  cudaMemcpyDeviceToDevice, st))
      return cuda_status("Fp8Attention");
  }
  return cuda_status("Fp8Attention");
}
#endif  // FLUXRT_CPU_ONLY

// ---- ONNX Runtime glue -----------------------------------------------------------------------------

enum class Kind {
  NormRope, AdaLayerNorm, GatedResidual, BiasGelu, Fp8Linear, QuantizeFp8, AdaLayerNormFp8, BiasGeluFp8, NormRopeFp8,
  Fp8Attention
};

struct Op : OrtCustomOp {
  Kind kind;
  const char* name;
  const char* provider;  // "CPUExecutionProvider" or "CUDAExecutionProvider"
  ONNXTensorElementDataType type;      // the element type T the kernel computes in
  ONNXTensorElementDataType out_type;  // T, or E4M3 for the quantizers
  std::vector<ONNXTensorElementDataType> inputs;
  std::vector<bool> optional;
  std::vector<bool> on_host;  // scales: read by the host, so kept in CPU memory
  size_t outputs = 1;         // the ones after the first are optional
};

struct Kernel {
  const Op* op;
  Attrs attrs;
#ifndef FLUXRT_CPU_ONLY
  LtState lt;  // Fp8Linear's cuBLASLt plans
  AttnState attn;  // Fp8Attention's device memory
#endif
};

// Even widths only: the CUDA kernels move two elements per access.
OrtStatusPtr check_even(const std::string& op, int64_t width) {
  if (width % 2) return Status::error(op, "the last axis must have an even size, got " + std::to_string(width));
  return nullptr;
}

// The CPU kernels compute in float32; the FP8 ones quantize that result.
OrtStatusPtr quantized_output(OrtKernelContext* ctx, const std::vector<int64_t>& shape, const std::vector<float>& v,
                              float qscale) {
  void* y = nullptr;
  RETURN_IF(get_output(ctx, shape, &y));
  quantize_cpu(v.data(), int64_t(v.size()), qscale, static_cast<uint8_t*>(y));
  return nullptr;
}

OrtStatusPtr check_vec8(const std::string& op, int64_t width) {
  if (width % 8) {
    return Status::error(op, "on CUDA, the last axis must be a multiple of 8, got " + std::to_string(width));
  }
  return nullptr;
}

#ifdef FLUXRT_CPU_ONLY
#define LAUNCH(fn, ...) return Status::error(op.name, "this build has no CUDA kernels")
#else
// The CUDA launcher for the op's element type.
template <typename F> OrtStatusPtr by_type(ONNXTensorElementDataType t, F&& launch) {
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return launch(__half{});
  if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16) return launch(__nv_bfloat16{});
  return launch(float{});
}
#define LAUNCH(fn, ...) \
  return by_type(op.type, [&](auto tag) { return fn<decltype(tag)>(static_cast<cudaStream_t>(stream), __VA_ARGS__, y); })
#endif

bool windowed(Kind kind) {
  return kind == Kind::NormRope || kind == Kind::NormRopeFp8 || kind == Kind::BiasGelu || kind == Kind::BiasGeluFp8 ||
         kind == Kind::QuantizeFp8;
}

// NormRope's x0 and x1 through the column window; on the CPU gathered into contiguous rows.
OrtStatusPtr norm_rope_window(const std::string& op, const Attrs& a, NormRopeArgs* p, bool cuda, std::vector<float>* b0,
                              std::vector<float>* b1) {
  RETURN_IF(window(op, "x0", a, &p->x0, &p->s0));
  RETURN_IF(window(op, "x1", a, &p->x1, &p->s1));
  if (!p->x1.present()) p->s1 = p->s0;
  if (!cuda) {
    gather_window(&p->x0, p->s0, b0);
    gather_window(&p->x1, p->s1, b1);
    p->s0 = p->x0.shape.empty() ? 0 : p->x0.dim(-1);
    p->s1 = p->x1.present() ? p->x1.dim(-1) : p->s0;
  }
  return nullptr;
}

OrtStatusPtr bias_gelu_window(const std::string& op, const Attrs& a, BiasGeluArgs* p, bool cuda, std::vector<float>* buf) {
  RETURN_IF(window(op, "x", a, &p->x, &p->stride));
  if (!cuda) {
    gather_window(&p->x, p->stride, buf);
    p->stride = p->x.shape.empty() ? 1 : p->x.dim(-1);
  }
  return nullptr;
}

OrtStatusPtr compute(const Kernel& k, OrtKernelContext* ctx) {
  const Op& op = *k.op;
  std::vector<In> in(op.inputs.size());
  for (size_t i = 0; i < in.size(); ++i) RETURN_IF(get_input(ctx, i, &in[i]));
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i].present() && !op.optional[i]) {
      return Status::error(op.name, "input " + std::to_string(i) + " is required");
    }
  }
  void* stream = nullptr;
  const bool cuda = std::strcmp(op.provider, "CUDAExecutionProvider") == 0;
  if (cuda) RETURN_IF(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  void* y = nullptr;
  if ((k.attrs.col_start || k.attrs.col_count) && !windowed(op.kind)) {
    return Status::error(op.name, "takes no column window (column_start/column_count are for NormRope, NormRopeFp8, "
                                  "BiasGelu, BiasGeluFp8 and QuantizeFp8)");
  }
  switch (op.kind) {
    case Kind::NormRope: {
      NormRopeArgs p{in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7]};
      std::vector<float> buf0, buf1;
      RETURN_IF(norm_rope_window(op.name, k.attrs, &p, cuda, &buf0, &buf1));
      RETURN_IF(check_norm_rope(k.attrs, &p));
      RETURN_IF(get_output(ctx, {p.B, p.L0 + p.L1, p.C}, &y));
      if (!cuda) return norm_rope_cpu(k.attrs, p, static_cast<float*>(y)), nullptr;
      LAUNCH(norm_rope_cuda, k.attrs, p);
    }
    case Kind::AdaLayerNorm: {
      AdaNormArgs p{in[0], in[1], in[2]};
      RETURN_IF(check_ada_norm(&p));
      RETURN_IF(check_even(op.name, p.C));
      RETURN_IF(get_output(ctx, p.x.shape, &y));
      if (!cuda) return ada_norm_cpu(k.attrs, p, static_cast<float*>(y)), nullptr;
      LAUNCH(ada_norm_cuda, k.attrs, p);
    }
    case Kind::GatedResidual: {
      GatedArgs p{in[0], in[1], in[2], in[3], in[4]};
      RETURN_IF(check_gated(&p));
      RETURN_IF(check_even(op.name, p.C));
      RETURN_IF(get_output(ctx, p.residual.shape, &y));
      if (!cuda) return gated_cpu(k.attrs, p, static_cast<float*>(y)), nullptr;
      LAUNCH(gated_cuda, k.attrs, p);
    }
    case Kind::BiasGelu: {
      BiasGeluArgs p{in[0], in[1]};
      std::vector<float> buf;
      RETURN_IF(bias_gelu_window(op.name, k.attrs, &p, cuda, &buf));
      RETURN_IF(check_bias_gelu(&p));
      RETURN_IF(get_output(ctx, p.x.shape, &y));
      if (!cuda) return bias_gelu_cpu(p, static_cast<float*>(y)), nullptr;
      LAUNCH(bias_gelu_cuda, p);
    }
    case Kind::Fp8Linear: {
      Fp8LinearArgs p{in[0], in[1], in[2], in[3], in[4]};
      if (k.attrs.fast_accum != 0 && k.attrs.fast_accum != 1) {
        return Status::error(op.name, "fast_accumulation must be 0 or 1, got " + std::to_string(k.attrs.fast_accum));
      }
      p.fast_accum = k.attrs.fast_accum == 1;
      RETURN_IF(check_fp8_linear(&p));
      RETURN_IF(get_output(ctx, linear_shape(p), &y));
      if (!cuda) return fp8_linear_cpu(p, static_cast<float*>(y)), nullptr;
#ifndef FLUXRT_CPU_ONLY
      LtState& lt = const_cast<Kernel&>(k).lt;
#endif
      LAUNCH(fp8_linear_cuda, lt, p);
    }
    case Kind::QuantizeFp8: {
      float qs = 1.f;
      int64_t stride = 0;
      std::vector<float> buf;
      RETURN_IF(read_scale(op.name, "scale", in[1], &qs));
      RETURN_IF(window(op.name, "x", k.attrs, &in[0], &stride));
      RETURN_IF(get_output(ctx, in[0].shape, &y));
      if (!cuda) {
        gather_window(&in[0], stride, &buf);
        return quantize_cpu(static_cast<const float*>(in[0].data), in[0].size(), qs, static_cast<uint8_t*>(y)), nullptr;
      }
      LAUNCH(quantize_cuda, in[0], stride, qs);
    }
    case Kind::AdaLayerNormFp8: {
      AdaNormArgs p{in[0], in[1], in[2]};
      float qs = 1.f;
      RETURN_IF(check_ada_norm(&p));
      RETURN_IF(read_scale(op.name, "quant_scale", in[3], &qs));
      if (!cuda) {
        std::vector<float> v(p.x.size());
        ada_norm_cpu(k.attrs, p, v.data());
        return quantized_output(ctx, p.x.shape, v, qs);
      }
      RETURN_IF(check_vec8(op.name, p.C));
      RETURN_IF(get_output(ctx, p.x.shape, &y));
      LAUNCH(ada_norm_fp8_cuda, k.attrs, p, qs);
    }
    case Kind::NormRopeFp8: {
      NormRopeArgs p{in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7]};
      float qs = 1.f;
      std::vector<float> buf0, buf1;
      RETURN_IF(norm_rope_window(op.name, k.attrs, &p, cuda, &buf0, &buf1));
      RETURN_IF(check_norm_rope(k.attrs, &p));
      RETURN_IF(read_scale(op.name, "quant_scale", in[8], &qs));
      const std::vector<int64_t> shape = {p.B, p.L0 + p.L1, p.C};
      if (!cuda) {
        std::vector<float> v(p.B * (p.L0 + p.L1) * p.C);
        norm_rope_cpu(k.attrs, p, v.data());
        return quantized_output(ctx, shape, v, qs);
      }
      RETURN_IF(get_output(ctx, shape, &y));
      LAUNCH(norm_rope_fp8_cuda, k.attrs, p, qs);
    }
    case Kind::Fp8Attention: {
      Fp8AttentionArgs p{in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7]};
      RETURN_IF(check_fp8_attention(k.attrs, &p));
      size_t outputs = 0;
      RETURN_IF(g_api->KernelContext_GetOutputCount(ctx, &outputs));
      const bool split = p.split.present();
      if (split != (outputs == 2)) {
        return Status::error(op.name, split ? "with split, the node must have two outputs"
                                            : "without split, the node must have one output");
      }
      void* y1 = nullptr;
      RETURN_IF(get_output(ctx, {p.B, p.L0, p.C}, &y));
      if (split) RETURN_IF(get_output(ctx, {p.B, p.L1, p.C}, &y1, 1));
      if (!cuda) {
        std::vector<uint8_t> whole(split ? p.B * p.L * p.C : 0);
        fp8_attention_cpu(p, split ? whole.data() : static_cast<uint8_t*>(y));
        if (split) split_rows_cpu(whole.data(), p.B, p.L, p.L0, p.C, static_cast<uint8_t*>(y), static_cast<uint8_t*>(y1));
        return nullptr;
      }
#ifdef FLUXRT_CPU_ONLY
      return Status::error(op.name, "this build has no CUDA kernels");
#else
      return fp8_attention_cuda(static_cast<cudaStream_t>(stream), const_cast<Kernel&>(k).attn, p, y, y1);
#endif
    }
    case Kind::BiasGeluFp8: {
      BiasGeluArgs p{in[0], in[1]};
      float qs = 1.f;
      std::vector<float> buf;
      RETURN_IF(bias_gelu_window(op.name, k.attrs, &p, cuda, &buf));
      RETURN_IF(check_bias_gelu(&p));
      RETURN_IF(read_scale(op.name, "quant_scale", in[2], &qs));
      if (!cuda) {
        std::vector<float> v(p.x.size());
        bias_gelu_cpu(p, v.data());
        return quantized_output(ctx, p.x.shape, v, qs);
      }
      RETURN_IF(get_output(ctx, p.x.shape, &y));
      LAUNCH(bias_gelu_fp8_cuda, p, qs);
    }
  }
  return Status::error(op.name, "unknown op");
}

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp* base, const OrtApi*, const OrtKernelInfo* info, void** out) {
  auto* k = new Kernel{static_cast<const Op*>(base), {}};
  k->attrs.num_heads = attr_int(info, "num_heads", 0);
  k->attrs.epsilon = attr_float(info, "epsilon", 1e-6f);
  k->attrs.clamp = attr_float(info, "clamp", 0.f);
  k->attrs.scale = attr_float(info, "scale", 0.f);
  k->attrs.col_start = attr_int(info, "column_start", 0);
  k->attrs.col_count = attr_int(info, "column_count", 0);
  k->attrs.fast_accum = attr_int(info, "fast_accumulation", 0);
  *out = k;
  return nullptr;
}

OrtStatusPtr ORT_API_CALL compute_kernel(void* kernel, OrtKernelContext* ctx) {
  try {
    return compute(*static_cast<Kernel*>(kernel), ctx);
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_RUNTIME_EXCEPTION, (std::string("fluxrt: ") + e.what()).c_str());
  }
}

void ORT_API_CALL destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

// Dims and symbolic names of an input's shape, false where the input is absent or has no rank.
bool input_dims(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType* type, std::vector<int64_t>* dims,
                std::vector<std::string>* names) {
  size_t count = 0;
  if (OrtStatusPtr s = g_api->ShapeInferContext_GetInputCount(ctx, &count)) return g_api->ReleaseStatus(s), false;
  if (index >= count) return false;
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatusPtr s = g_api->ShapeInferContext_GetInputTypeShape(ctx, index, &info)) {
    return g_api->ReleaseStatus(s), false;  // an omitted optional input
  }
  size_t rank = 0;
  OrtStatusPtr s = g_api->GetTensorElementType(info, type);
  if (!s) s = g_api->GetDimensionsCount(info, &rank);
  std::vector<const char*> raw(rank, nullptr);
  dims->assign(rank, 0);
  if (!s) s = g_api->GetDimensions(info, dims->data(), rank);
  if (!s) s = g_api->GetSymbolicDimensions(info, raw.data(), rank);
  if (s) return g_api->ReleaseStatus(s), false;
  names->clear();
  for (auto n : raw) names->push_back(n ? n : "");
  return rank > 0;
}

// The output has input 0's type and shape, but for NormRope's joined axis: L0 + L1, as a number
// when both are known, else as the symbolic name "L0+L1" (equal names, equal lengths).
OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp* base, OrtShapeInferContext* ctx) {
  const Op* op = static_cast<const Op*>(base);
  ONNXTensorElementDataType type, type1;
  std::vector<int64_t> dims, dims1;
  std::vector<std::string> names, names1;
  if (!input_dims(ctx, 0, &type, &dims, &names)) return nullptr;  // nothing known to pass on
  if (op->kind == Kind::Fp8Attention && input_dims(ctx, 7, &type1, &dims1, &names1)) {
    return nullptr;  // cut along L by split's values: lengths known only at run time
  }
  if ((op->kind == Kind::NormRope || op->kind == Kind::NormRopeFp8) && dims.size() == 3 && input_dims(ctx, 3, &type1, &dims1, &names1) &&
      dims1.size() == 3) {
    if (dims[1] >= 0 && dims1[1] >= 0) {
      dims[1] += dims1[1];
      names[1] = "";
    } else {
      auto part = [](int64_t d, const std::string& n) { return d >= 0 ? std::to_string(d) : (n.empty() ? "?" : n); };
      names[1] = part(dims[1], names[1]) + "+" + part(dims1[1], names1[1]);
      dims[1] = -1;
    }
  }
  if (windowed(op->kind)) {  // a column window's width
    const OrtOpAttr* attr = nullptr;
    int64_t count = 0;
    size_t size = 0;
    OrtStatusPtr s = g_api->ShapeInferContext_GetAttribute(ctx, "column_count", &attr);
    if (!s && attr) s = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &count, sizeof count, &size);
    if (s) g_api->ReleaseStatus(s);  // no such attribute: no window
    else if (count > 0) dims.back() = count, names.back() = "";
  }
  if (op->kind == Kind::Fp8Linear) {  // [..., K] -> [..., N], in bias's type
    std::vector<int64_t> w_dims;
    std::vector<std::string> w_names;
    ONNXTensorElementDataType w_type;
    if (!input_dims(ctx, 2, &w_type, &w_dims, &w_names) || w_dims.size() != 2 || !input_dims(ctx, 4, &type, &dims1, &names1)) {
      return nullptr;
    }
    dims.back() = w_dims[0];
    names.back() = w_names[0];
  } else if (op->out_type == kE4M3) {
    type = kE4M3;
  }
  std::vector<const char*> ptrs;
  for (auto& n : names) ptrs.push_back(n.c_str());
  OrtTensorTypeAndShapeInfo* out = nullptr;
  RETURN_IF(g_api->CreateTensorTypeAndShapeInfo(&out));
  OrtStatusPtr s = g_api->SetTensorElementType(out, type);
  if (!s) s = g_api->SetDimensions(out, dims.data(), dims.size());
  if (!s) s = g_api->SetSymbolicDimensions(out, ptrs.data(), ptrs.size());
  if (!s) s = g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  g_api->ReleaseTensorTypeAndShapeInfo(out);
  return s;
}

Op make_op(Kind kind, const char* name, const char* provider, ONNXTensorElementDataType t) {
  Op op{};
  op.version = kOpVersion;
  op.kind = kind, op.name = name, op.provider = provider, op.type = t, op.out_type = t;
  const auto F = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  switch (kind) {
    case Kind::NormRope:
      op.inputs = {t, t, t, t, t, t, F, F};
      op.optional = {false, true, true, true, true, true, true, true};
      break;
    case Kind::AdaLayerNorm:
      op.inputs = {t, t, t};
      op.optional = {false, false, false};
      break;
    case Kind::GatedResidual:
      op.inputs = {t, t, t, t, t};
      op.optional = {false, false, true, false, true};
      break;
    case Kind::BiasGelu:
      op.inputs = {t, t};
      op.optional = {false, true};
      break;
    case Kind::Fp8Linear:
      op.inputs = {kE4M3, F, kE4M3, F, t};
      op.optional = {false, false, false, false, false};
      op.on_host = {false, true, false, false, false};
      break;
    case Kind::QuantizeFp8:
      op.inputs = {t, F};
      op.optional = {false, false};
      op.on_host = {false, true};
      op.out_type = kE4M3;
      break;
    case Kind::AdaLayerNormFp8:
      op.inputs = {t, t, t, F};
      op.optional = {false, false, false, false};
      op.on_host = {false, false, false, true};
      op.out_type = kE4M3;
      break;
    case Kind::BiasGeluFp8:
      op.inputs = {t, t, F};
      op.optional = {false, true, false};
      op.on_host = {false, false, true};
      op.out_type = kE4M3;
      break;
    case Kind::NormRopeFp8:
      op.inputs = {t, t, t, t, t, t, F, F, F};
      op.optional = {false, true, true, true, true, true, true, true, false};
      op.on_host = {false, false, false, false, false, false, false, false, true};
      op.out_type = kE4M3;
      break;
    case Kind::Fp8Attention:  // no T: E4M3 in and out
      op.inputs = {kE4M3, kE4M3, kE4M3, F, F, F, F, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64};
      op.optional = {false, false, false, false, false, false, false, true};
      op.on_host = {false, false, false, true, true, true, true, true};
      op.out_type = kE4M3;
      op.outputs = 2;
      break;
  }
  op.on_host.resize(op.inputs.size(), false);
  op.CreateKernel = nullptr;
  op.KernelCompute = nullptr;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.KernelDestroy = destroy_kernel;
  op.GetName = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->name; };
  op.GetExecutionProviderType = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->provider; };
  op.GetInputTypeCount = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->inputs.size(); };
  op.GetInputType = [](const OrtCustomOp* o, size_t i) { return static_cast<const Op*>(o)->inputs[i]; };
  op.GetOutputTypeCount = [](const OrtCustomOp* o) { return static_cast<const Op*>(o)->outputs; };
  op.GetOutputType = [](const OrtCustomOp* o, size_t) { return static_cast<const Op*>(o)->out_type; };
  op.GetInputCharacteristic = [](const OrtCustomOp* o, size_t i) {
    return static_cast<const Op*>(o)->optional[i] ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t i) {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetInputMemoryType = [](const OrtCustomOp* o, size_t i) {
    return static_cast<const Op*>(o)->on_host[i] ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.InferOutputShapeFn = infer_shape;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return 1; };
  return op;
}

std::vector<Op>& registry() {
  static std::vector<Op> ops = [] {
    std::vector<Op> v;
    const std::pair<Kind, const char*> kinds[] = {
        {Kind::NormRope, "NormRope"}, {Kind::AdaLayerNorm, "AdaLayerNorm"}, {Kind::GatedResidual, "GatedResidual"},
        {Kind::BiasGelu, "BiasGelu"}, {Kind::Fp8Linear, "Fp8Linear"}, {Kind::QuantizeFp8, "QuantizeFp8"},
        {Kind::AdaLayerNormFp8, "AdaLayerNormFp8"}, {Kind::BiasGeluFp8, "BiasGeluFp8"},
        {Kind::NormRopeFp8, "NormRopeFp8"}, {Kind::Fp8Attention, "Fp8Attention"}};
    for (auto& [kind, name] : kinds) {
      v.push_back(make_op(kind, name, "CPUExecutionProvider", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
#ifndef FLUXRT_CPU_ONLY
      for (auto t : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                     ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16}) {
        if (kind == Kind::Fp8Attention && t != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) continue;  // one kernel: no T
        v.push_back(make_op(kind, name, "CUDAExecutionProvider", t));
      }
#endif
    }
    return v;
  }();
  return ops;
}

}  // namespace fluxrt_ops

using namespace fluxrt_ops;

extern "C" {

// Registers the domain "fluxrt" on the session options (SessionOptions.register_custom_ops_library).
__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                const OrtApiBase* base) {
  g_api = base->GetApi(kOpVersion);
  if (g_api == nullptr) return nullptr;  // cannot even report: this ONNX Runtime predates API 17
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF(g_api->CreateCustomOpDomain("fluxrt", &domain));
  for (Op& op : registry()) RETURN_IF(g_api->CustomOpDomain_Add(domain, &op));
  return g_api->AddCustomOpDomain(options, domain);
}

// "cuda" when the CUDA kernels were compiled in, "cpu" otherwise (read by runtime/ort_ops.py).
__attribute__((visibility("default"))) const char* FluxrtOpsDevices() {
#ifdef FLUXRT_CPU_ONLY
  return "cpu";
#else
  return "cpu,cuda";
#endif
}
}
