// ONNX Runtime custom-op library, domain `ai.vmamba`, opset 1: `SelectiveScan2D` (contract: docs/scan-op.md),
// `ChannelLayerNorm` and `LastAxisLayerNorm` (kernels/cpu/channel_layer_norm.h) and `BilinearResize`
// (kernels/cpu/bilinear_resize.h) (docs/scan-op.md, "Other ops"), all for the CPU provider.
//
// Built against the ORT 1.21 C/C++ headers (Debian's libonnxruntime-dev) and never linked against libonnxruntime:
// the C API is versioned and backward compatible, so the library loads in any ORT >= 1.21 (tested with 1.32).
// The CPU kernels thread through ORT's intra-op pool (KernelContext_ParallelFor), so they obey
// intra_op_num_threads and never compete with a second pool.
//
// Uses the classic Ort::CustomOpBase with the status-returning V2 entry points, so no C++ exception ever crosses
// into ORT; the CUDA kernel (a later change) registers as a second CustomOpBase with GetExecutionProviderType()
// returning "CUDAExecutionProvider", in add_cuda_ops() below.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../cpu/bilinear_resize.h"
#include "../cpu/channel_layer_norm.h"
#include "../cpu/selective_scan_2d.h"
#include "op_status.h"
#include "shape_inference.h"
#ifdef VMAMBA_WITH_CUDA
#include "cuda_op.h"
#endif

namespace {

constexpr const char* kDomain = "ai.vmamba";
constexpr const char* kOpName = "SelectiveScan2D";
constexpr const char* kInputNames[] = {"u", "delta", "A_logs", "B", "C", "D", "delta_bias", "dt_weight"};
constexpr size_t kNumInputs = 7;  // the op of docs/scan-op.md; an optional 8th, dt_weight, fuses the dt projection
// The CUDA library registers this CPU kernel beside its CUDA one, and ONNX Runtime requires every kernel of one op
// name to declare the same inputs: there it declares the 7 of the contract (cuda-onnxruntime graphs never fuse the
// dt projection, and its CUDA kernel has no such input).
#ifdef VMAMBA_WITH_CUDA
constexpr size_t kDeclaredInputs = kNumInputs;
#else
constexpr size_t kDeclaredInputs = kNumInputs + 1;
#endif

using vmamba_ort::shape_str;

OrtStatus* make_status(OrtErrorCode code, const std::string& message, const char* op = kOpName) {
  return vmamba_ort::op_status(code, message, std::string(op));
}

template <typename Body>
OrtStatus* guarded(const char* op, Body&& body) {
  return vmamba_ort::guarded_status(std::string(op), std::forward<Body>(body));
}

// Adapts the kernel's ParallelFor to ORT's intra-op pool.
struct PoolJob {
  void (*fn)(void*, int64_t);
  void* arg;
};

void ort_parallel_for(void* ctx, int64_t n, void (*fn)(void*, int64_t), void* arg) {
  PoolJob job{fn, arg};
  auto run = [](void* data, size_t i) {
    auto* j = static_cast<PoolJob*>(data);
    j->fn(j->arg, static_cast<int64_t>(i));
  };
  OrtStatus* status = Ort::GetApi().KernelContext_ParallelFor(static_cast<const OrtKernelContext*>(ctx), run,
                                                              static_cast<size_t>(n), 0, &job);
  if (status != nullptr) {  // no pool available: run on this thread (ORT runs all items or none)
    Ort::GetApi().ReleaseStatus(status);
    for (int64_t i = 0; i < n; ++i) fn(arg, i);
  }
}

struct SelectiveScan2DCpuKernel {
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(kOpName, [&] { return compute(context); });
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const size_t count = ctx.GetInputCount();
    if (count < kNumInputs || count > kDeclaredInputs || ctx.GetOutputCount() != 1) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "expects 7 inputs (u, delta, A_logs, B, C, D, delta_bias), an optional dt_weight, 1 output");
    }
    std::vector<Ort::ConstValue> inputs;
    std::vector<std::vector<int64_t>> shapes;
    for (size_t i = 0; i < count; ++i) {
      inputs.push_back(ctx.GetInput(i));
      if (!inputs.back()) {  // an optional input left empty
        inputs.pop_back();
        break;
      }
      auto info = inputs.back().GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("input '") + kInputNames[i] + "' must be float32");
      }
      shapes.push_back(info.GetShape());
    }
    if (inputs.size() < kNumInputs) return make_status(ORT_INVALID_ARGUMENT, "inputs 1 to 7 are required");
    const bool fused = inputs.size() == kNumInputs + 1;
    const auto& us = shapes[0];
    const auto& ds = shapes[1];
    if (us.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'u' must be (B, Di, H, W), got " + shape_str(us));
    }
    if (shapes[2].size() != 2) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'A_logs' must be (K*Di, N), got " + shape_str(shapes[2]));
    }
    const int64_t b = us[0], di = us[1], h = us[2], w = us[3], n = shapes[2][1];
    // With dt_weight (K, Di, R), input 1 is the dt projection's input flattened over the directions, (B, K*R, H, W),
    // as the x_proj convolution leaves it; without, delta itself, (B, K, Di, H, W).
    int64_t k = 0, rank = 0;
    if (fused) {
      const auto& ws = shapes[kNumInputs];
      if (ws.size() != 3 || ws[1] != di || ws[2] < 1) {
        return make_status(ORT_INVALID_ARGUMENT, "input 'dt_weight' must be (K, Di, R) with Di = " +
                                                     std::to_string(di) + " (from u), got " + shape_str(ws));
      }
      k = ws[0];
      rank = ws[2];
      if (ds != std::vector<int64_t>{b, k * rank, h, w}) {
        return make_status(ORT_INVALID_ARGUMENT, "with dt_weight, input 'delta' must be (B, K*R, H, W) = " +
                                                     shape_str({b, k * rank, h, w}) + ", got " + shape_str(ds));
      }
    } else {
      if (ds.size() != 5) {
        return make_status(ORT_INVALID_ARGUMENT, "input 'delta' must be (B, K, Di, H, W), got " + shape_str(ds));
      }
      k = ds[1];
    }
    const std::vector<std::vector<int64_t>> expected = {
        us, ds, {k * di, n}, {b, k, n, h, w}, {b, k, n, h, w}, {k * di}, {k * di}};
    for (size_t i = 1; i < kNumInputs; ++i) {
      if (shapes[i] != expected[i]) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("input '") + kInputNames[i] + "' must have shape " +
                                                     shape_str(expected[i]) + " (from u " + shape_str(us) +
                                                     " and delta " + shape_str(ds) + "), got " + shape_str(shapes[i]));
      }
    }
    if (fused && rank > (int64_t{1} << 20)) return make_status(ORT_INVALID_ARGUMENT, "dt_weight: R must be <= 2^20");
    const vmamba::ScanShape shape{b, k, di, n, h, w};
    if (const char* err = vmamba::check_scan_shape(shape)) return make_status(ORT_INVALID_ARGUMENT, err);

    auto output = ctx.GetOutput(0, us);
    auto f = [&](size_t i) { return inputs[i].GetTensorData<float>(); };
    const vmamba::ScanTensors tensors{f(0), f(1), f(2), f(3), f(4), f(5), f(6),
                                      output.GetTensorMutableData<float>(), fused ? f(kNumInputs) : nullptr, rank};
    if (const char* err = vmamba::selective_scan_2d_f32(tensors, shape, ort_parallel_for, context)) {
      return make_status(ORT_FAIL, err);
    }
    return nullptr;
  }
};

struct SelectiveScan2DCpuOp : Ort::CustomOpBase<SelectiveScan2DCpuOp, SelectiveScan2DCpuKernel, true> {
  SelectiveScan2DCpuOp() {
    // The V1 entry points stay unused (WithStatus = true); fill them so no field of OrtCustomOp is garbage.
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = vmamba_ort::output_like_input0;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    try {
      *kernel = new SelectiveScan2DCpuKernel();
      return nullptr;
    } catch (...) {
      return make_status(ORT_FAIL, "could not create kernel");
    }
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return kDeclaredInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < kNumInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

constexpr float kDefaultEpsilon = 1e-5f;  // LayerNormalization's default

// ai.vmamba::ChannelLayerNorm: X (N, C, ...) normalised over axis 1 per position, times weight (C) plus bias (C).
// ai.vmamba::LastAxisLayerNorm (kLastAxis): X (..., C) normalised over its last axis, the channels-last form the int8
// graphs run between channels-last quantized convolutions (the same name as the CUDA library's op for its EP).
// Both: attribute epsilon; the kernel of kernels/cpu/channel_layer_norm.h (a last-axis norm is its pixels == 1 case).
template <bool kLastAxis>
struct LayerNormCpuKernel {
  static constexpr const char* kName = kLastAxis ? "LastAxisLayerNorm" : "ChannelLayerNorm";
  float epsilon = kDefaultEpsilon;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] { return compute(context); });
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != 3 || ctx.GetOutputCount() != 1) {
      return make_status(ORT_INVALID_ARGUMENT, "expects 3 inputs (X, weight, bias), 1 output", kName);
    }
    auto x = ctx.GetInput(0);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() < (kLastAxis ? 1u : 2u)) {
      return make_status(ORT_INVALID_ARGUMENT,
                         std::string("X must be ") + (kLastAxis ? "(..., C)" : "(N, C, ...)") + ", got " +
                             shape_str(shape),
                         kName);
    }
    int64_t outer = 1, pixels = 1;  // ChannelLayerNorm: (N, C, pixels); LastAxisLayerNorm: (rows, C, 1)
    const int64_t channels = kLastAxis ? shape.back() : shape[1];
    if (kLastAxis) {
      for (size_t i = 0; i + 1 < shape.size(); ++i) outer *= shape[i];
    } else {
      outer = shape[0];
      for (size_t i = 2; i < shape.size(); ++i) pixels *= shape[i];
    }
    const char* names[] = {"X", "weight", "bias"};
    const std::vector<std::vector<int64_t>> expected = {shape, {channels}, {channels}};
    for (size_t i = 0; i < 3; ++i) {
      auto info = ctx.GetInput(i).GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("input '") + names[i] + "' must be float32", kName);
      }
      if (info.GetShape() != expected[i]) {
        return make_status(ORT_INVALID_ARGUMENT,
                           std::string("input '") + names[i] + "' must have shape " + shape_str(expected[i]) +
                               " (from X " + shape_str(shape) + "), got " + shape_str(info.GetShape()),
                           kName);
      }
    }
    const vmamba::ChannelNormShape norm_shape{outer, channels, pixels};
    if (const char* err = vmamba::check_channel_norm_shape(norm_shape)) {
      return make_status(ORT_INVALID_ARGUMENT, err, kName);
    }
    auto y = ctx.GetOutput(0, shape);
    const vmamba::ChannelNormTensors tensors{x.GetTensorData<float>(), ctx.GetInput(1).GetTensorData<float>(),
                                             ctx.GetInput(2).GetTensorData<float>(), y.GetTensorMutableData<float>()};
    if (const char* err = vmamba::channel_layer_norm_f32(tensors, norm_shape, epsilon, ort_parallel_for, context)) {
      return make_status(ORT_FAIL, err, kName);
    }
    return nullptr;
  }
};

template <bool kLastAxis>
struct LayerNormCpuOp : Ort::CustomOpBase<LayerNormCpuOp<kLastAxis>, LayerNormCpuKernel<kLastAxis>, true> {
  using Kernel = LayerNormCpuKernel<kLastAxis>;

  LayerNormCpuOp() {
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = vmamba_ort::output_like_input0;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return guarded(Kernel::kName, [&]() -> OrtStatus* {
      auto created = std::make_unique<Kernel>();
      float epsilon = kDefaultEpsilon;
      // An absent attribute keeps the default (the status only says it is absent).
      if (OrtStatus* status = api.KernelInfoGetAttribute_float(info, "epsilon", &epsilon)) {
        api.ReleaseStatus(status);
        epsilon = kDefaultEpsilon;
      }
      if (!(epsilon >= 0.0f)) return make_status(ORT_INVALID_ARGUMENT, "epsilon must be >= 0", Kernel::kName);
      created->epsilon = epsilon;
      *kernel = created.release();
      return nullptr;
    });
  }

  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// ai.vmamba::BilinearResize: X (N, C, h, w) float32 and sizes (4) int64 = (N, C, H, W), as ONNX Resize's `sizes`
// input, to Y (N, C, H, W): Resize with mode "linear", coordinate_transformation_mode "half_pixel", no antialias,
// in NCHW (kernels/cpu/bilinear_resize.h says why).
struct BilinearResizeCpuKernel {
  static constexpr const char* kName = "BilinearResize";

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(kName, [&] { return compute(context); });
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != 2 || ctx.GetOutputCount() != 1) {
      return make_status(ORT_INVALID_ARGUMENT, "expects 2 inputs (X, sizes), 1 output", kName);
    }
    auto x = ctx.GetInput(0);
    auto sizes = ctx.GetInput(1);
    const auto x_info = x.GetTensorTypeAndShapeInfo();
    const auto shape = x_info.GetShape();
    if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || shape.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'X' must be float32 (N, C, H, W), got " + shape_str(shape),
                         kName);
    }
    const auto sizes_info = sizes.GetTensorTypeAndShapeInfo();
    if (sizes_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 || sizes_info.GetElementCount() != 4) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "input 'sizes' must be 4 int64 values (N, C, H, W), got shape " +
                             shape_str(sizes_info.GetShape()),
                         kName);
    }
    const int64_t* out = sizes.GetTensorData<int64_t>();
    const std::vector<int64_t> out_shape(out, out + 4);
    if (out_shape[0] != shape[0] || out_shape[1] != shape[1]) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "'sizes' " + shape_str(out_shape) + " must keep N and C of X " + shape_str(shape) +
                             ": only height and width are resized",
                         kName);
    }
    const vmamba::ResizeShape resize{shape[0] * shape[1], shape[2], shape[3], out_shape[2], out_shape[3]};
    if (const char* err = vmamba::check_resize_shape(resize)) {
      return make_status(ORT_INVALID_ARGUMENT, std::string(err) + ", got X " + shape_str(shape) + " and sizes " +
                                                   shape_str(out_shape),
                         kName);
    }
    auto y = ctx.GetOutput(0, out_shape);
    if (const char* err = vmamba::bilinear_resize_f32(x.GetTensorData<float>(), y.GetTensorMutableData<float>(),
                                                      resize, ort_parallel_for, context)) {
      return make_status(ORT_FAIL, err, kName);
    }
    return nullptr;
  }
};

struct BilinearResizeCpuOp : Ort::CustomOpBase<BilinearResizeCpuOp, BilinearResizeCpuKernel, true> {
  BilinearResizeCpuOp() {
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = nullptr;  // H and W come from a tensor's values; nothing reads the output after
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    return guarded(BilinearResizeCpuKernel::kName, [&]() -> OrtStatus* {
      *kernel = new BilinearResizeCpuKernel();
      return nullptr;
    });
  }

  const char* GetName() const { return BilinearResizeCpuKernel::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Registration hook for the CUDA kernel: only libvmamba_ort_cuda.so (compiled with -DVMAMBA_WITH_CUDA, linked with
// cuda_op.cpp and kernels/cuda) has it; libvmamba_ort.so stays free of any CUDA dependency.
void add_cuda_ops(Ort::CustomOpDomain& domain) {
#ifdef VMAMBA_WITH_CUDA
  vmamba_cuda::add_ops(domain);
#else
  (void)domain;
#endif
}

// The op objects and domains must outlive every session that uses them: static op, domains kept forever (a few
// hundred bytes per registration; releasing them at exit could run after ORT itself is gone).
SelectiveScan2DCpuOp& cpu_op() {
  static SelectiveScan2DCpuOp op;
  return op;
}

LayerNormCpuOp<false>& channel_norm_op() {
  static LayerNormCpuOp<false> op;
  return op;
}

LayerNormCpuOp<true>& last_axis_norm_op() {
  static LayerNormCpuOp<true> op;
  return op;
}

BilinearResizeCpuOp& resize_op() {
  static BilinearResizeCpuOp op;
  return op;
}

void keep_domain(Ort::CustomOpDomain&& domain) {
  static std::mutex mutex;
  static auto* domains = new std::vector<Ort::CustomOpDomain>();
  std::lock_guard<std::mutex> lock(mutex);
  domains->push_back(std::move(domain));
}

}  // namespace

// The instruction-set variant the CPU kernels run (kernels/cpu/isa_dispatch.h; VMAMBA_SCAN_ISA forces a lower one),
// for tests and bug reports: callable through ctypes without ONNX Runtime.
extern "C" __attribute__((visibility("default"))) const char* vmamba_ort_cpu_isa(void) {
  return vmamba::channel_norm_isa();
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // ORT older than the headers: report through the oldest API every version has
    const OrtApi* api1 = api_base->GetApi(1);
    return api1 ? api1->CreateStatus(ORT_FAIL, "libvmamba_ort needs onnxruntime >= 1.21") : nullptr;
  }
  Ort::InitApi(api);
  try {
    Ort::CustomOpDomain domain{kDomain};
    domain.Add(&cpu_op());
    domain.Add(&channel_norm_op());
    domain.Add(&last_axis_norm_op());
    domain.Add(&resize_op());
    add_cuda_ops(domain);
    Ort::UnownedSessionOptions(options).Add(domain);
    keep_domain(std::move(domain));
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
