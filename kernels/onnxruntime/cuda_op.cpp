// ONNX Runtime CUDA kernels of `ai.vmamba::SelectiveScan2D` (contract: docs/scan-op.md) and of
// `ai.vmamba::LastAxisLayerNorm` (kernels/cuda/layer_norm.cuh; the cuda-onnxruntime graph's LayerNorms), linked only into
// libvmamba_ort_cuda.so (custom_op.cpp compiled with -DVMAMBA_WITH_CUDA calls vmamba_cuda::add_ops from its
// add_cuda_ops hook). Compiled by g++ against the same ORT 1.21 headers; needs no CUDA header: the kernel is reached
// through its C launcher (kernels/cuda/*.cuh), the stream is ORT's, as a void*.
//
// Classic Ort::CustomOpBase with GetExecutionProviderType() = "CUDAExecutionProvider" (Debian's CPU-only headers
// lack the lite API's CUDA context): ORT hands the inputs and the output in GPU memory and the kernel queues on
// `KernelContext::GetGPUComputeStream()`. Two registrations of each op, float and float16 (all inputs and the output
// share the type, as the schema's T); ORT picks the one matching the node's types.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/layer_norm.cuh"
#include "../cuda/selective_scan_2d.cuh"
#include "cuda_op.h"
#include "op_status.h"
#include "shape_inference.h"

namespace vmamba_cuda {
namespace {

constexpr const char* kOpName = "SelectiveScan2D";
constexpr const char* kLayerNormName = "LastAxisLayerNorm";
constexpr const char* kInputNames[] = {"u", "delta", "A_logs", "B", "C", "D", "delta_bias"};
constexpr size_t kNumInputs = 7;

using vmamba_ort::shape_str;

OrtStatus* make_status(OrtErrorCode code, const std::string& message, const char* op = kOpName) {
  return vmamba_ort::op_status(code, message, std::string(op) + " (CUDA)");
}

template <typename Body>
OrtStatus* guarded(const char* op, Body&& body) {
  return vmamba_ort::guarded_status(std::string(op) + " (CUDA)", std::forward<Body>(body));
}

int kernel_dtype(ONNXTensorElementDataType type) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? VMAMBA_SCAN_F16 : VMAMBA_SCAN_F32;
}

struct ScanCudaKernel {
  ONNXTensorElementDataType type;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(kOpName, [&] { return compute(context); });
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != kNumInputs || ctx.GetOutputCount() != 1) {
      return make_status(ORT_INVALID_ARGUMENT, "expects 7 inputs (u, delta, A_logs, B, C, D, delta_bias), 1 output");
    }
    std::vector<Ort::ConstValue> inputs;
    std::vector<std::vector<int64_t>> shapes;
    for (size_t i = 0; i < kNumInputs; ++i) {
      inputs.push_back(ctx.GetInput(i));
      auto info = inputs.back().GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != type) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("input '") + kInputNames[i] +
                                                     "' has another element type than 'u' (all must be float32 or "
                                                     "all float16)");
      }
      shapes.push_back(info.GetShape());
    }
    const auto& us = shapes[0];
    const auto& ds = shapes[1];
    if (us.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'u' must be (B, Di, H, W), got " + shape_str(us));
    }
    if (ds.size() != 5) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'delta' must be (B, K, Di, H, W), got " + shape_str(ds));
    }
    if (shapes[2].size() != 2) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'A_logs' must be (K*Di, N), got " + shape_str(shapes[2]));
    }
    const int64_t b = us[0], di = us[1], h = us[2], w = us[3], k = ds[1], n = shapes[2][1];
    if (k != 4) return make_status(ORT_INVALID_ARGUMENT, "k (directions) must be 4");
    const std::vector<std::vector<int64_t>> expected = {
        us, {b, k, di, h, w}, {k * di, n}, {b, k, n, h, w}, {b, k, n, h, w}, {k * di}, {k * di}};
    for (size_t i = 1; i < kNumInputs; ++i) {
      if (shapes[i] != expected[i]) {
        return make_status(ORT_INVALID_ARGUMENT, std::string("input '") + kInputNames[i] + "' must have shape " +
                                                     shape_str(expected[i]) + " (from u " + shape_str(us) +
                                                     " and delta " + shape_str(ds) + "), got " + shape_str(shapes[i]));
      }
    }
    auto output = ctx.GetOutput(0, us);
    const char* err = vmamba_selective_scan_2d_cuda(
        kernel_dtype(type), inputs[0].GetTensorRawData(), inputs[1].GetTensorRawData(), inputs[2].GetTensorRawData(),
        inputs[3].GetTensorRawData(), inputs[4].GetTensorRawData(), inputs[5].GetTensorRawData(),
        inputs[6].GetTensorRawData(), output.GetTensorMutableRawData(), b, di, n, h, w, ctx.GetGPUComputeStream());
    if (err != nullptr) return make_status(ORT_FAIL, err);
    return nullptr;
  }
};

struct ScanCudaOp : Ort::CustomOpBase<ScanCudaOp, ScanCudaKernel, true> {
  explicit ScanCudaOp(ONNXTensorElementDataType t) : type(t) {
    // The V1 entry points stay unused (WithStatus = true); fill them so no field of OrtCustomOp is garbage.
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = vmamba_ort::output_like_input0;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    try {
      *kernel = new ScanCudaKernel{type};
      return nullptr;
    } catch (...) {
      return make_status(ORT_FAIL, "could not create kernel");
    }
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type; }

  ONNXTensorElementDataType type;
};

// LastAxisLayerNorm(X, scale, bias) -> Y, attribute epsilon: LayerNormalization over the last axis of X.
struct LayerNormCudaKernel {
  ONNXTensorElementDataType type;
  float epsilon;

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(kLayerNormName, [&] { return compute(context); });
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    if (ctx.GetInputCount() != 3 || ctx.GetOutputCount() != 1) {
      return make_status(ORT_INVALID_ARGUMENT, "expects 3 inputs (X, scale, bias) and 1 output", kLayerNormName);
    }
    auto x = ctx.GetInput(0), scale = ctx.GetInput(1), bias = ctx.GetInput(2);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty()) return make_status(ORT_INVALID_ARGUMENT, "X must have at least one axis", kLayerNormName);
    const int64_t width = shape.back();
    const std::vector<int64_t> param_shape = {width};
    for (auto* p : {&scale, &bias}) {
      if (p->GetTensorTypeAndShapeInfo().GetShape() != param_shape) {
        return make_status(ORT_INVALID_ARGUMENT,
                           "scale and bias must have shape " + shape_str(param_shape) + " (X is " + shape_str(shape) +
                               "), got " + shape_str(p->GetTensorTypeAndShapeInfo().GetShape()),
                           kLayerNormName);
      }
    }
    const int64_t rows = width ? x.GetTensorTypeAndShapeInfo().GetElementCount() / width : 0;
    auto y = ctx.GetOutput(0, shape);
    const char* err =
        vmamba_layer_norm_cuda(kernel_dtype(type), x.GetTensorRawData(), scale.GetTensorRawData(),
                               bias.GetTensorRawData(), y.GetTensorMutableRawData(), rows, width, epsilon,
                               ctx.GetGPUComputeStream());
    if (err != nullptr) return make_status(ORT_FAIL, err, kLayerNormName);
    return nullptr;
  }
};

struct LayerNormCudaOp : Ort::CustomOpBase<LayerNormCudaOp, LayerNormCudaKernel, true> {
  explicit LayerNormCudaOp(ONNXTensorElementDataType t) : type(t) {
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = vmamba_ort::output_like_input0;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded(kLayerNormName, [&]() -> OrtStatus* {
      const float epsilon = Ort::ConstKernelInfo(info).GetAttribute<float>("epsilon");
      *kernel = new LayerNormCudaKernel{type, epsilon};
      return nullptr;
    });
  }

  const char* GetName() const { return kLayerNormName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type; }

  ONNXTensorElementDataType type;
};

}  // namespace

void add_ops(Ort::CustomOpDomain& domain) {
  // Static: the op objects must outlive every session (see custom_op.cpp).
  static ScanCudaOp f32_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static ScanCudaOp f16_op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  static LayerNormCudaOp f32_norm(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static LayerNormCudaOp f16_norm(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&f32_op);
  domain.Add(&f16_op);
  domain.Add(&f32_norm);
  domain.Add(&f16_norm);
}

}  // namespace vmamba_cuda
