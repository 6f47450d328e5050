// ONNX Runtime CUDA kernels of `ai.vmamba::SelectiveScan2D` (contract: docs/scan-op.md) and of the ops the
// cuda-onnxruntime graph is rewritten to: `SelectiveScan2DMerged`, `SelectiveScan2DPacked`, `LastAxisLayerNorm`,
// `ResidualLayerNorm`, `TransposeLayerNorm` (kernels/cuda/layer_norm.cuh), `DepthwiseConvSiLU`
// (kernels/cuda/depthwise_conv.cuh), `ScanProjections` and `NarrowPointwiseConv` (kernels/cuda/scan_projections.cuh),
// `DepthwiseConvProjections` (kernels/cuda/conv_projections.cuh), linked only into libvmamba_ort_cuda.so (custom_op.cpp
// compiled with -DVMAMBA_WITH_CUDA calls vmamba_cuda::add_ops from its add_cuda_ops hook). Compiled by g++ against the same ORT 1.21 headers; needs no CUDA header: the kernel is
// reached through its C launcher (kernels/cuda/*.cuh), the stream is ORT's, as a void*.
//
// Classic Ort::CustomOpBase with GetExecutionProviderType() = "CUDAExecutionProvider" (Debian's CPU-only headers
// lack the lite API's CUDA context): ORT hands the inputs and the output in GPU memory and the kernel queues on
// `KernelContext::GetGPUComputeStream()`. Two registrations of each op, float and float16 (all inputs and the output
// share the type, as the schema's T); ORT picks the one matching the node's types. Optional inputs are trailing
// (ResidualLayerNorm's X_bias, DepthwiseConvSiLU's bias).

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "../cuda/conv_projections.cuh"
#include "../cuda/depthwise_conv.cuh"
#include "../cuda/layer_norm.cuh"
#include "../cuda/scan_projections.cuh"
#include "../cuda/selective_scan_2d.cuh"
#include "cuda_op.h"
#include "op_status.h"
#include "shape_inference.h"

namespace vmamba_cuda {
namespace {

constexpr const char* kInputNames[] = {"u", "delta", "A_logs", "B", "C", "D", "delta_bias"};
constexpr size_t kNumInputs = 7;

using vmamba_ort::shape_str;

OrtStatus* make_status(OrtErrorCode code, const std::string& message, const char* op) {
  return vmamba_ort::op_status(code, message, std::string(op) + " (CUDA)");
}

template <typename Body>
OrtStatus* guarded(const char* op, Body&& body) {
  return vmamba_ort::guarded_status(std::string(op) + " (CUDA)", std::forward<Body>(body));
}

int kernel_dtype(ONNXTensorElementDataType type) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? VMAMBA_SCAN_F16 : VMAMBA_SCAN_F32;
}

// A launcher's result: null, or its message as a failed status naming the op.
OrtStatus* launched(const char* op, const char* err) {
  return err == nullptr ? nullptr : make_status(ORT_FAIL, err, op);
}

// What every CUDA kernel of the library shares: the registration's element type, and the status-returning entry ORT
// calls, with the input and output counts checked against the op's declaration and any exception turned into a status
// (Derived::compute does the rest).
template <typename Derived>
struct CudaKernel {
  ONNXTensorElementDataType type;
  explicit CudaKernel(ONNXTensorElementDataType t) : type(t) {}

  OrtStatus* ComputeV2(OrtKernelContext* context) {
    return guarded(Derived::kName, [&]() -> OrtStatus* {
      Ort::KernelContext ctx(context);
      const size_t inputs = ctx.GetInputCount();
      if (inputs < Derived::kRequiredInputs || inputs > Derived::kInputs || ctx.GetOutputCount() != Derived::kOutputs) {
        std::ostringstream want;
        want << "expects " << Derived::kRequiredInputs;
        if (Derived::kInputs > Derived::kRequiredInputs) want << " to " << Derived::kInputs;
        want << " inputs and " << Derived::kOutputs << " output(s)";
        return make_status(ORT_INVALID_ARGUMENT, want.str(), Derived::kName);
      }
      return static_cast<Derived*>(this)->compute(ctx);
    });
  }
};

// A scan kernel's inputs, and their shapes; every element type must be the registration's `type` (ORT matches the
// node's types against it; checked again so a mismatch names the input), and u (input 0) must be 4-D.
struct ScanInputs {
  std::vector<Ort::ConstValue> values;
  std::vector<std::vector<int64_t>> shapes;
};

OrtStatus* gather_inputs(Ort::KernelContext& ctx, const char* const* names, size_t count,
                         ONNXTensorElementDataType type, const char* op, ScanInputs& out) {
  for (size_t i = 0; i < count; ++i) {
    out.values.push_back(ctx.GetInput(i));
    auto info = out.values.back().GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != type) {
      return make_status(ORT_INVALID_ARGUMENT,
                         std::string("input '") + names[i] +
                             "' has another element type than 'u' (all must be float32 or all float16)",
                         op);
    }
    out.shapes.push_back(info.GetShape());
  }
  if (out.shapes[0].size() != 4) {
    return make_status(ORT_INVALID_ARGUMENT, "input 'u' must be (B, Di, H, W), got " + shape_str(out.shapes[0]), op);
  }
  return nullptr;
}

// Inputs 1.. against the shapes `expected` (derived from u and the inputs named in `from`).
OrtStatus* check_shapes(const char* const* names, const ScanInputs& in,
                        const std::vector<std::vector<int64_t>>& expected, const std::string& from, const char* op) {
  for (size_t i = 1; i < expected.size(); ++i) {
    if (in.shapes[i] != expected[i]) {
      return make_status(ORT_INVALID_ARGUMENT,
                         std::string("input '") + names[i] + "' must have shape " + shape_str(expected[i]) +
                             " (from u " + shape_str(in.shapes[0]) + from + "), got " + shape_str(in.shapes[i]),
                         op);
    }
  }
  return nullptr;
}

// SelectiveScan2D(u, delta, A_logs, B, C, D, delta_bias) -> y (docs/scan-op.md).
struct ScanCudaKernel : CudaKernel<ScanCudaKernel> {
  static constexpr const char* kName = "SelectiveScan2D";
  static constexpr size_t kInputs = kNumInputs, kRequiredInputs = kNumInputs, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_like_input0;
  ScanCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    ScanInputs in;
    if (OrtStatus* bad = gather_inputs(ctx, kInputNames, kNumInputs, type, kName, in)) return bad;
    const auto& shapes = in.shapes;
    const auto& inputs = in.values;
    const auto& us = shapes[0];
    const auto& ds = shapes[1];
    if (ds.size() != 5) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'delta' must be (B, K, Di, H, W), got " + shape_str(ds), kName);
    }
    if (shapes[2].size() != 2) {
      return make_status(ORT_INVALID_ARGUMENT, "input 'A_logs' must be (K*Di, N), got " + shape_str(shapes[2]), kName);
    }
    const int64_t b = us[0], di = us[1], h = us[2], w = us[3], k = ds[1], n = shapes[2][1];
    if (k != 4) return make_status(ORT_INVALID_ARGUMENT, "k (directions) must be 4", kName);
    const std::vector<std::vector<int64_t>> expected = {
        us, {b, k, di, h, w}, {k * di, n}, {b, k, n, h, w}, {b, k, n, h, w}, {k * di}, {k * di}};
    if (OrtStatus* bad = check_shapes(kInputNames, in, expected, " and delta " + shape_str(ds), kName)) return bad;
    auto output = ctx.GetOutput(0, us);
    const char* err = vmamba_selective_scan_2d_cuda(
        kernel_dtype(type), inputs[0].GetTensorRawData(), inputs[1].GetTensorRawData(), inputs[2].GetTensorRawData(),
        inputs[3].GetTensorRawData(), inputs[4].GetTensorRawData(), inputs[5].GetTensorRawData(),
        inputs[6].GetTensorRawData(), output.GetTensorMutableRawData(), b, di, n, h, w, ctx.GetGPUComputeStream());
    return launched(kName, err);
  }
};

// SelectiveScan2DPacked(u, X, dt_weight, A_logs, D, delta_bias) -> y (docs/scan-op.md): the scan with its input
// projections in one tensor, X (B, 4 R + 8 N, H, W) = [dt-rank inputs | B | C] channels, as one 1 x 1 convolution
// writes them, and dt_weight (4, Di, R) the dt projection the kernel applies itself.
struct PackedScanCudaKernel : CudaKernel<PackedScanCudaKernel> {
  static constexpr const char* kName = "SelectiveScan2DPacked";
  static constexpr size_t kInputs = 6, kRequiredInputs = 6, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_like_input0;
  static constexpr const char* kNames[] = {"u", "X", "dt_weight", "A_logs", "D", "delta_bias"};
  PackedScanCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    ScanInputs in;
    if (OrtStatus* bad = gather_inputs(ctx, kNames, kInputs, type, kName, in)) return bad;
    const auto& shapes = in.shapes;
    const auto& inputs = in.values;
    const auto& us = shapes[0];
    if (shapes[2].size() != 3 || shapes[3].size() != 2) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "inputs 'dt_weight' and 'A_logs' must be (4, Di, R) and (4*Di, N), got " +
                             shape_str(shapes[2]) + " and " + shape_str(shapes[3]),
                         kName);
    }
    const int64_t b = us[0], di = us[1], h = us[2], w = us[3], rank = shapes[2][2], n = shapes[3][1];
    const std::vector<std::vector<int64_t>> expected = {
        us, {b, 4 * rank + 8 * n, h, w}, {4, di, rank}, {4 * di, n}, {4 * di}, {4 * di}};
    const std::string from = ", rank R = " + std::to_string(rank) + " and d_state N = " + std::to_string(n);
    if (OrtStatus* bad = check_shapes(kNames, in, expected, from, kName)) return bad;
    auto output = ctx.GetOutput(0, us);
    const char* err = vmamba_selective_scan_2d_packed_cuda(
        kernel_dtype(type), inputs[0].GetTensorRawData(), inputs[1].GetTensorRawData(), inputs[2].GetTensorRawData(),
        inputs[3].GetTensorRawData(), inputs[4].GetTensorRawData(), inputs[5].GetTensorRawData(),
        output.GetTensorMutableRawData(), b, di, n, rank, h, w, ctx.GetGPUComputeStream());
    return launched(kName, err);
  }
};

// SelectiveScan2DMerged(u, delta, X, A_logs, D, delta_bias) -> y (docs/scan-op.md): the scan reading its projections
// where two GEMMs of the graph wrote them: delta is the first 4 Di channels of `delta` (B, Cd, H*W) and B, C the last
// 8 N channels of X (B, Cx, H*W), B first; `delta` and X may be one tensor.
struct MergedScanCudaKernel : CudaKernel<MergedScanCudaKernel> {
  static constexpr const char* kName = "SelectiveScan2DMerged";
  static constexpr size_t kInputs = 6, kRequiredInputs = 6, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_like_input0;
  static constexpr const char* kNames[] = {"u", "delta", "X", "A_logs", "D", "delta_bias"};
  MergedScanCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    ScanInputs in;
    if (OrtStatus* bad = gather_inputs(ctx, kNames, kInputs, type, kName, in)) return bad;
    const auto& shapes = in.shapes;
    const auto& inputs = in.values;
    const auto& us = shapes[0];
    if (shapes[1].size() != 3 || shapes[2].size() != 3 || shapes[3].size() != 2) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "inputs 'delta', 'X' and 'A_logs' must be (B, Cd, H*W), (B, Cx, H*W) and (4*Di, N), got " +
                             shape_str(shapes[1]) + ", " + shape_str(shapes[2]) + " and " + shape_str(shapes[3]),
                         kName);
    }
    const int64_t b = us[0], di = us[1], h = us[2], w = us[3], n = shapes[3][1];
    const int64_t delta_channels = shapes[1][1], x_channels = shapes[2][1];
    if (delta_channels < 4 * di || x_channels < 8 * n) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "'delta' needs at least 4*Di = " + std::to_string(4 * di) +
                             " channels and 'X' at least 8*N = " + std::to_string(8 * n) + ", got " +
                             shape_str(shapes[1]) + " and " + shape_str(shapes[2]),
                         kName);
    }
    const std::vector<std::vector<int64_t>> expected = {
        us, {b, delta_channels, h * w}, {b, x_channels, h * w}, {4 * di, n}, {4 * di}, {4 * di}};
    const std::string from = " and d_state N = " + std::to_string(n);
    if (OrtStatus* bad = check_shapes(kNames, in, expected, from, kName)) return bad;
    auto output = ctx.GetOutput(0, us);
    const char* err = vmamba_selective_scan_2d_merged_cuda(
        kernel_dtype(type), inputs[0].GetTensorRawData(), inputs[1].GetTensorRawData(), delta_channels,
        inputs[2].GetTensorRawData(), x_channels, inputs[3].GetTensorRawData(), inputs[4].GetTensorRawData(),
        inputs[5].GetTensorRawData(), output.GetTensorMutableRawData(), b, di, n, h, w, ctx.GetGPUComputeStream());
    return launched(kName, err);
  }
};

// The inputs that must have shape (width,) (a norm's scale and bias, a fused bias), named in the error.
OrtStatus* check_params(const char* op, const std::vector<std::pair<const char*, Ort::ConstValue>>& params,
                        int64_t width, const std::vector<int64_t>& x_shape) {
  const std::vector<int64_t> want = {width};
  for (const auto& [name, value] : params) {
    const auto got = value.GetTensorTypeAndShapeInfo().GetShape();
    if (got != want) {
      return make_status(ORT_INVALID_ARGUMENT,
                         std::string(name) + " must have shape " + shape_str(want) + " (X is " + shape_str(x_shape) +
                             "), got " + shape_str(got),
                         op);
    }
  }
  return nullptr;
}

// The LayerNorm kernels' state: the op's epsilon attribute (and the type, as every kernel).
template <typename Derived>
struct NormCudaKernel : CudaKernel<Derived> {
  float epsilon;
  NormCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo& info)
      : CudaKernel<Derived>(t), epsilon(info.GetAttribute<float>("epsilon")) {}
};

// LastAxisLayerNorm(X, scale, bias) -> Y, attribute epsilon: LayerNormalization over the last axis of X.
struct LayerNormCudaKernel : NormCudaKernel<LayerNormCudaKernel> {
  static constexpr const char* kName = "LastAxisLayerNorm";
  static constexpr size_t kInputs = 3, kRequiredInputs = 3, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_like_input0;
  using NormCudaKernel::NormCudaKernel;

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), scale = ctx.GetInput(1), bias = ctx.GetInput(2);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty()) return make_status(ORT_INVALID_ARGUMENT, "X must have at least one axis", kName);
    const int64_t width = shape.back();
    if (OrtStatus* bad = check_params(kName, {{"scale", scale}, {"bias", bias}}, width, shape)) return bad;
    const int64_t rows = width ? x.GetTensorTypeAndShapeInfo().GetElementCount() / width : 0;
    auto y = ctx.GetOutput(0, shape);
    return launched(kName, vmamba_layer_norm_cuda(kernel_dtype(type), x.GetTensorRawData(), scale.GetTensorRawData(),
                                                  bias.GetTensorRawData(), y.GetTensorMutableRawData(), rows, width,
                                                  epsilon, ctx.GetGPUComputeStream()));
  }
};

// ResidualLayerNorm(X, R, scale, bias[, X_bias]) -> (Y, S), attribute epsilon: S = X (+ X_bias) + R, Y the
// LayerNorm of S over the last axis (the residual Add(s) of a VMamba block fused into the norm after them).
struct ResidualLayerNormCudaKernel : NormCudaKernel<ResidualLayerNormCudaKernel> {
  static constexpr const char* kName = "ResidualLayerNorm";
  static constexpr size_t kInputs = 5, kRequiredInputs = 4, kOutputs = 2;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::outputs_like_input0;
  using NormCudaKernel::NormCudaKernel;

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), residual = ctx.GetInput(1), scale = ctx.GetInput(2), bias = ctx.GetInput(3);
    Ort::ConstValue x_bias{nullptr};
    if (ctx.GetInputCount() > 4) x_bias = ctx.GetInput(4);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty()) return make_status(ORT_INVALID_ARGUMENT, "X must have at least one axis", kName);
    if (residual.GetTensorTypeAndShapeInfo().GetShape() != shape) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "R must have X's shape " + shape_str(shape) + ", got " +
                             shape_str(residual.GetTensorTypeAndShapeInfo().GetShape()),
                         kName);
    }
    const int64_t width = shape.back();
    std::vector<std::pair<const char*, Ort::ConstValue>> params = {{"scale", scale}, {"bias", bias}};
    if (x_bias) params.emplace_back("X_bias", x_bias);
    if (OrtStatus* bad = check_params(kName, params, width, shape)) return bad;
    const int64_t rows = width ? x.GetTensorTypeAndShapeInfo().GetElementCount() / width : 0;
    auto y = ctx.GetOutput(0, shape);
    auto sum = ctx.GetOutput(1, shape);
    return launched(kName, vmamba_residual_layer_norm_cuda(
                               kernel_dtype(type), x.GetTensorRawData(), residual.GetTensorRawData(),
                               x_bias ? x_bias.GetTensorRawData() : nullptr, scale.GetTensorRawData(),
                               bias.GetTensorRawData(), y.GetTensorMutableRawData(), sum.GetTensorMutableRawData(),
                               rows, width, epsilon, ctx.GetGPUComputeStream()));
  }
};

// TransposeLayerNorm(X, scale, bias) -> Y, attribute epsilon: X (N, C, d1, ..., dk) channel-first, Y (N, d1, ..., dk,
// C), LastAxisLayerNorm(Transpose(X, [0, 2, ..., k+1, 1])) in one kernel.
struct TransposeLayerNormCudaKernel : NormCudaKernel<TransposeLayerNormCudaKernel> {
  static constexpr const char* kName = "TransposeLayerNorm";
  static constexpr size_t kInputs = 3, kRequiredInputs = 3, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_channels_last;
  using NormCudaKernel::NormCudaKernel;

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), scale = ctx.GetInput(1), bias = ctx.GetInput(2);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() < 2) {
      return make_status(ORT_INVALID_ARGUMENT, "X must be (N, C, ...) with at least two axes, got " + shape_str(shape),
                         kName);
    }
    if (OrtStatus* bad = check_params(kName, {{"scale", scale}, {"bias", bias}}, shape[1], shape)) return bad;
    int64_t positions = 1;
    for (size_t i = 2; i < shape.size(); ++i) positions *= shape[i];
    auto y = ctx.GetOutput(0, vmamba_ort::channels_last(shape));
    return launched(kName, vmamba_transpose_layer_norm_cuda(kernel_dtype(type), x.GetTensorRawData(),
                                                            scale.GetTensorRawData(), bias.GetTensorRawData(),
                                                            y.GetTensorMutableRawData(), shape[0], shape[1], positions,
                                                            epsilon, ctx.GetGPUComputeStream()));
  }
};

// DepthwiseConvSiLU(X, W[, bias]) -> Y: X (N, H, W, C) channels-last, W (C, 1, 3, 3), Y (N, C, H, W) =
// SiLU(Conv(Transpose(X, [0, 3, 1, 2]), W, bias, group C, pads 1, strides 1)) in one kernel.
struct DepthwiseConvSiLUCudaKernel : CudaKernel<DepthwiseConvSiLUCudaKernel> {
  static constexpr const char* kName = "DepthwiseConvSiLU";
  static constexpr size_t kInputs = 3, kRequiredInputs = 2, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::output_channels_first;
  DepthwiseConvSiLUCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), weight = ctx.GetInput(1);
    Ort::ConstValue bias{nullptr};
    if (ctx.GetInputCount() > 2) bias = ctx.GetInput(2);
    const auto shape = x.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "X must be (N, H, W, C), got " + shape_str(shape), kName);
    }
    const int64_t channels = shape[3];
    const std::vector<int64_t> want = {channels, 1, 3, 3};
    if (weight.GetTensorTypeAndShapeInfo().GetShape() != want) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "W must have shape " + shape_str(want) + " (X is " + shape_str(shape) + "), got " +
                             shape_str(weight.GetTensorTypeAndShapeInfo().GetShape()),
                         kName);
    }
    if (bias) {
      if (OrtStatus* bad = check_params(kName, {{"bias", bias}}, channels, shape)) return bad;
    }
    auto y = ctx.GetOutput(0, vmamba_ort::channels_first(shape));
    return launched(kName, vmamba_depthwise_conv_silu_cuda(kernel_dtype(type), x.GetTensorRawData(),
                                                           weight.GetTensorRawData(),
                                                           bias ? bias.GetTensorRawData() : nullptr,
                                                           y.GetTensorMutableRawData(), shape[0], shape[1], shape[2],
                                                           channels, ctx.GetGPUComputeStream()));
  }
};

// ScanProjections(u, W_x, dt_weight) -> (delta, B, C): u (N, Di, H, W), W_x (4 R + 8 S, Di) (rows: the dt ranks of
// the four directions, then B, then C), dt_weight (4, Di, R); delta (N, 4, Di, H, W), B and C (N, 4, S, H, W), the
// inputs SelectiveScan2D takes (kernels/cuda/scan_projections.cuh).
struct ScanProjectionsCudaKernel : CudaKernel<ScanProjectionsCudaKernel> {
  static constexpr const char* kName = "ScanProjections";
  static constexpr size_t kInputs = 3, kRequiredInputs = 3, kOutputs = 3;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::scan_projection_outputs;
  ScanProjectionsCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto u = ctx.GetInput(0), w_x = ctx.GetInput(1), dt_weight = ctx.GetInput(2);
    const auto us = u.GetTensorTypeAndShapeInfo().GetShape();
    const auto ws = w_x.GetTensorTypeAndShapeInfo().GetShape();
    const auto ds = dt_weight.GetTensorTypeAndShapeInfo().GetShape();
    if (us.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "u must be (N, Di, H, W), got " + shape_str(us), kName);
    }
    if (ds.size() != 3 || ds[0] != 4 || ds[1] != us[1] || ds[2] < 1) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "dt_weight must be (4, Di, R) with Di = " + std::to_string(us[1]) + " (u is " +
                             shape_str(us) + "), got " + shape_str(ds),
                         kName);
    }
    const int64_t rank = ds[2];
    if (ws.size() != 2 || ws[1] != us[1] || ws[0] <= 4 * rank || (ws[0] - 4 * rank) % 8 != 0) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "W_x must be (4 R + 8 S, Di) with R = " + std::to_string(rank) + ", Di = " +
                             std::to_string(us[1]) + " and S >= 1, got " + shape_str(ws),
                         kName);
    }
    const int64_t d_state = (ws[0] - 4 * rank) / 8;
    auto delta = ctx.GetOutput(0, {us[0], 4, us[1], us[2], us[3]});
    auto b = ctx.GetOutput(1, {us[0], 4, d_state, us[2], us[3]});
    auto c = ctx.GetOutput(2, {us[0], 4, d_state, us[2], us[3]});
    return launched(kName, vmamba_scan_projections_cuda(
                               kernel_dtype(type), u.GetTensorRawData(), w_x.GetTensorRawData(),
                               dt_weight.GetTensorRawData(), delta.GetTensorMutableRawData(),
                               b.GetTensorMutableRawData(), c.GetTensorMutableRawData(), us[0], us[1], rank, d_state,
                               us[2] * us[3], ctx.GetGPUComputeStream()));
  }
};

// DepthwiseConvProjections(X, W, W_x, dt_weight[, bias]) -> (u, delta, B, C): X (N, H, W, Di) channels-last, W (Di,
// 1, 3, 3), u (N, Di, H, W) = DepthwiseConvSiLU(X, W, bias), and delta, B, C = ScanProjections(u, W_x, dt_weight), in
// one kernel (kernels/cuda/conv_projections.cuh).
struct DepthwiseConvProjectionsCudaKernel : CudaKernel<DepthwiseConvProjectionsCudaKernel> {
  static constexpr const char* kName = "DepthwiseConvProjections";
  static constexpr size_t kInputs = 5, kRequiredInputs = 4, kOutputs = 4;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::conv_projection_outputs;
  DepthwiseConvProjectionsCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), weight = ctx.GetInput(1), w_x = ctx.GetInput(2), dt_weight = ctx.GetInput(3);
    Ort::ConstValue bias{nullptr};
    if (ctx.GetInputCount() > 4) bias = ctx.GetInput(4);
    const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const auto ws = w_x.GetTensorTypeAndShapeInfo().GetShape();
    const auto ds = dt_weight.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "X must be (N, H, W, Di), got " + shape_str(xs), kName);
    }
    const int64_t di = xs[3];
    const std::vector<int64_t> want = {di, 1, 3, 3};
    if (weight.GetTensorTypeAndShapeInfo().GetShape() != want) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "W must have shape " + shape_str(want) + " (X is " + shape_str(xs) + "), got " +
                             shape_str(weight.GetTensorTypeAndShapeInfo().GetShape()),
                         kName);
    }
    if (bias) {
      if (OrtStatus* bad = check_params(kName, {{"bias", bias}}, di, xs)) return bad;
    }
    if (ds.size() != 3 || ds[0] != 4 || ds[1] != di || ds[2] < 1) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "dt_weight must be (4, Di, R) with Di = " + std::to_string(di) + " (X is " + shape_str(xs) +
                             "), got " + shape_str(ds),
                         kName);
    }
    const int64_t rank = ds[2];
    if (ws.size() != 2 || ws[1] != di || ws[0] <= 4 * rank || (ws[0] - 4 * rank) % 8 != 0) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "W_x must be (4 R + 8 S, Di) with R = " + std::to_string(rank) + ", Di = " +
                             std::to_string(di) + " and S >= 1, got " + shape_str(ws),
                         kName);
    }
    const int64_t d_state = (ws[0] - 4 * rank) / 8;
    auto u = ctx.GetOutput(0, vmamba_ort::channels_first(xs));
    auto delta = ctx.GetOutput(1, {xs[0], 4, di, xs[1], xs[2]});
    auto b = ctx.GetOutput(2, {xs[0], 4, d_state, xs[1], xs[2]});
    auto c = ctx.GetOutput(3, {xs[0], 4, d_state, xs[1], xs[2]});
    return launched(kName, vmamba_depthwise_conv_projections_cuda(
                               kernel_dtype(type), x.GetTensorRawData(), weight.GetTensorRawData(),
                               bias ? bias.GetTensorRawData() : nullptr, w_x.GetTensorRawData(),
                               dt_weight.GetTensorRawData(), u.GetTensorMutableRawData(),
                               delta.GetTensorMutableRawData(), b.GetTensorMutableRawData(),
                               c.GetTensorMutableRawData(), xs[0], xs[1], xs[2], di, rank, d_state,
                               ctx.GetGPUComputeStream()));
  }
};

// NarrowPointwiseConv(X, W) -> Y: X (N, C, H, W), W (M, C, 1, 1), Y (N, M, H, W) = Conv(X, W) (1 x 1, no bias) on the
// CUDA cores, for few output channels (a packed scan's X; kernels/cuda/scan_projections.cuh).
struct NarrowPointwiseConvCudaKernel : CudaKernel<NarrowPointwiseConvCudaKernel> {
  static constexpr const char* kName = "NarrowPointwiseConv";
  static constexpr size_t kInputs = 2, kRequiredInputs = 2, kOutputs = 1;
  static constexpr vmamba_ort::InferShapeFn kInferShape = vmamba_ort::narrow_conv_output;
  NarrowPointwiseConvCudaKernel(ONNXTensorElementDataType t, const Ort::ConstKernelInfo&) : CudaKernel(t) {}

  OrtStatus* compute(Ort::KernelContext& ctx) {
    auto x = ctx.GetInput(0), weight = ctx.GetInput(1);
    const auto xs = x.GetTensorTypeAndShapeInfo().GetShape();
    const auto ws = weight.GetTensorTypeAndShapeInfo().GetShape();
    if (xs.size() != 4) {
      return make_status(ORT_INVALID_ARGUMENT, "X must be (N, C, H, W), got " + shape_str(xs), kName);
    }
    if (ws.size() != 4 || ws[1] != xs[1] || ws[2] != 1 || ws[3] != 1) {
      return make_status(ORT_INVALID_ARGUMENT,
                         "W must be (M, " + std::to_string(xs[1]) + ", 1, 1) (X is " + shape_str(xs) + "), got " +
                             shape_str(ws),
                         kName);
    }
    auto y = ctx.GetOutput(0, {xs[0], ws[0], xs[2], xs[3]});
    return launched(kName, vmamba_narrow_pointwise_conv_cuda(kernel_dtype(type), x.GetTensorRawData(),
                                                             weight.GetTensorRawData(), y.GetTensorMutableRawData(),
                                                             xs[0], xs[1], ws[0], xs[2] * xs[3],
                                                             ctx.GetGPUComputeStream()));
  }
};

// The float / float16 registration of one CUDA kernel: every input and output of the op's type `T`, inputs from
// Kernel::kRequiredInputs on optional, errors and exceptions turned into statuses that name the op.
template <typename Kernel>
struct CudaOp : Ort::CustomOpBase<CudaOp<Kernel>, Kernel, true> {
  explicit CudaOp(ONNXTensorElementDataType t) : type(t) {
    // The V1 entry points stay unused (WithStatus = true); fill them so no field of OrtCustomOp is garbage.
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
    OrtCustomOp::InferOutputShapeFn = Kernel::kInferShape;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded(Kernel::kName, [&]() -> OrtStatus* {
      *kernel = new Kernel(type, Ort::ConstKernelInfo(info));
      return nullptr;
    });
  }

  const char* GetName() const { return Kernel::kName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  size_t GetInputTypeCount() const { return Kernel::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index < Kernel::kRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return Kernel::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type; }

  ONNXTensorElementDataType type;
};

template <typename Kernel>
void add_float_and_half(Ort::CustomOpDomain& domain) {
  // Static: the op objects must outlive every session (see custom_op.cpp).
  static CudaOp<Kernel> f32(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  static CudaOp<Kernel> f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  domain.Add(&f32);
  domain.Add(&f16);
}

}  // namespace

void add_ops(Ort::CustomOpDomain& domain) {
  add_float_and_half<ScanCudaKernel>(domain);
  add_float_and_half<PackedScanCudaKernel>(domain);
  add_float_and_half<MergedScanCudaKernel>(domain);
  add_float_and_half<LayerNormCudaKernel>(domain);
  add_float_and_half<ResidualLayerNormCudaKernel>(domain);
  add_float_and_half<TransposeLayerNormCudaKernel>(domain);
  add_float_and_half<DepthwiseConvSiLUCudaKernel>(domain);
  add_float_and_half<ScanProjectionsCudaKernel>(domain);
  add_float_and_half<NarrowPointwiseConvCudaKernel>(domain);
  add_float_and_half<DepthwiseConvProjectionsCudaKernel>(domain);
}

}  // namespace vmamba_cuda
