// See fluxrt_cudnn.h. One cuDNN handle per device; one built graph per (device, shape); one workspace
// per (device, stream), grown outside CUDA graph capture only.
#include "fluxrt_cudnn.h"

#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cudnn_frontend.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>

namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;  // the frontend's dynamic loading reads cuDNN's symbols from here
}

namespace fluxrt_cudnn {
namespace fe = cudnn_frontend;
using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

namespace {

std::mutex g_mu;

// cuDNN 9 as loaded in this process (ONNX Runtime's CUDA provider loads it), else by its soname.
std::string open_cudnn() {
  if (fe::cudnn_dlhandle) return "";
  for (const char* name : {"libcudnn.so.9", "libcudnn.so"}) {
    void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    if (!h) h = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (h) {
      fe::cudnn_dlhandle = h;
      return "";
    }
  }
  const char* err = dlerror();
  return std::string("cuDNN 9 (libcudnn.so.9) could not be opened (") + (err ? err : "not found") +
         "): FP8 attention on CUDA needs cuDNN 9.1 or newer, e.g. pip install nvidia-cudnn-cu13, on the library path";
}

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  TensorPtr q, k, v, o, dq, dk, dv, ds, ss, so, amax_s, amax_o;
  int64_t workspace = 0;
};

std::string fe_error(fe::error_t e, const std::string& what) {
  return "cuDNN " + what + " failed: " + e.get_message();
}

std::string build(cudnnHandle_t handle, int64_t B, int64_t L, int64_t H, int64_t D, float attn_scale, Plan* p) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(fe::DataType_t::FP8_E4M3)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  const std::vector<int64_t> dims{B, H, L, D}, strides{L * H * D, D, H * D, 1};  // [B, L, H, D] in memory
  auto tensor = [&](const char* name) {
    return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_dim(dims).set_stride(strides));
  };
  auto scalar = [&](const char* name) {
    return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1})
                         .set_data_type(fe::DataType_t::FLOAT));
  };
  p->q = tensor("q"), p->k = tensor("k"), p->v = tensor("v");
  p->dq = scalar("descale_q"), p->dk = scalar("descale_k"), p->dv = scalar("descale_v");
  p->ds = scalar("descale_s"), p->ss = scalar("scale_s"), p->so = scalar("scale_o");
  auto options = fe::graph::SDPA_fp8_attributes().set_name("fluxrt_fp8_attention").set_is_inference(true)
                     .set_attn_scale(attn_scale);
  auto [o, stats, amax_s, amax_o] = g->sdpa_fp8(p->q, p->k, p->v, p->dq, p->dk, p->dv, p->ds, p->ss, p->so, options);
  (void)stats;
  o->set_output(true).set_dim(dims).set_stride(strides);
  for (auto& a : {amax_s, amax_o})
    a->set_output(true).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}).set_data_type(fe::DataType_t::FLOAT);
  p->o = o, p->amax_s = amax_s, p->amax_o = amax_o;
  if (auto e = g->validate(); e.is_bad()) return fe_error(e, "validation of the FP8 attention graph");
  if (auto e = g->build_operation_graph(handle); e.is_bad()) return fe_error(e, "build_operation_graph");
  if (auto e = g->create_execution_plans({fe::HeurMode_t::A}); e.is_bad()) return fe_error(e, "create_execution_plans");
  if (auto e = g->check_support(handle); e.is_bad()) return fe_error(e, "check_support");
  if (auto e = g->build_plans(handle); e.is_bad()) return fe_error(e, "build_plans");
  if (auto e = g->get_workspace_size(p->workspace); e.is_bad()) return fe_error(e, "get_workspace_size");
  p->graph = g;
  return "";
}

struct Workspace {
  void* data = nullptr;
  int64_t size = 0;
};

}  // namespace

std::string fp8_attention(void* stream, int64_t B, int64_t L, int64_t H, int64_t D, float attn_scale, const void* q,
                          const void* k, const void* v, void* o, const float* scales, float* amax) {
  static std::map<int, cudnnHandle_t> handles;
  static std::map<std::tuple<int, int64_t, int64_t, int64_t, int64_t, float>, Plan> plans;
  static std::map<std::pair<int, void*>, Workspace> workspaces;
  std::lock_guard<std::mutex> lock(g_mu);
  std::string err = open_cudnn();
  if (!err.empty()) return err;
  const size_t version = fe::detail::get_backend_version();
  if (version < 90100) return "cuDNN " + std::to_string(version) + " is loaded; FP8 attention needs cuDNN 9.1 or newer";
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "cudaGetDevice failed";
  auto st = static_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(st, &capturing);
  const bool in_capture = capturing != cudaStreamCaptureStatusNone;
  cudnnHandle_t& handle = handles[dev];
  if (!handle) {
    if (in_capture) return "the first FP8 attention on a device ran inside a CUDA graph capture; run once before capturing";
    if (fe::detail::create_handle(&handle) != CUDNN_STATUS_SUCCESS) {
      handle = nullptr;
      return "cudnnCreate failed";
    }
  }
  if (fe::detail::set_stream(handle, st) != CUDNN_STATUS_SUCCESS) return "cudnnSetStream failed";
  const auto key = std::make_tuple(dev, B, L, H, D, attn_scale);
  auto found = plans.find(key);
  if (found == plans.end()) {
    if (in_capture) return "a new FP8 attention shape inside a CUDA graph capture; run each shape once before capturing";
    Plan plan;
    err = build(handle, B, L, H, D, attn_scale, &plan);
    if (!err.empty()) {
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
      return err + " (cuDNN " + std::to_string(version) + ", compute capability " + std::to_string(major) + "." +
             std::to_string(minor) + ", B " + std::to_string(B) + ", L " + std::to_string(L) + ", H " +
             std::to_string(H) + ", D " + std::to_string(D) + "; cuDNN's FP8 attention needs Hopper or newer)";
    }
    found = plans.emplace(key, std::move(plan)).first;
  }
  Plan& p = found->second;
  Workspace& ws = workspaces[{dev, stream}];
  if (ws.size < p.workspace) {
    if (in_capture) return "FP8 attention's workspace would grow inside a CUDA graph capture; run once before capturing";
    if (ws.data) cudaFree(ws.data);  // nothing captured uses it yet: growth happens outside capture only
    ws = Workspace{};
    if (cudaMalloc(&ws.data, p.workspace) != cudaSuccess) return "could not allocate cuDNN's workspace";
    ws.size = p.workspace;
  }
  std::unordered_map<TensorPtr, void*> pack = {
      {p.q, const_cast<void*>(q)}, {p.k, const_cast<void*>(k)}, {p.v, const_cast<void*>(v)}, {p.o, o},
      {p.dq, const_cast<float*>(scales)}, {p.dk, const_cast<float*>(scales + 1)},
      {p.dv, const_cast<float*>(scales + 2)}, {p.ds, const_cast<float*>(scales + 3)},
      {p.ss, const_cast<float*>(scales + 4)}, {p.so, const_cast<float*>(scales + 5)},
      {p.amax_s, amax}, {p.amax_o, amax + 1}};
  if (auto e = p.graph->execute(handle, pack, ws.data); e.is_bad()) return fe_error(e, "execution of FP8 attention");
  return "";
}

}  // namespace fluxrt_cudnn
