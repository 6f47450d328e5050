// Shape inference for the library's ops. Declaring it lets ONNX Runtime infer every shape after our nodes, so a
// session with fixed input dimensions folds the shape arithmetic downstream into constants (the segmentation head's
// Resize sizes, which its CPU NCHWc transformer needs to run bilinear upsampling in the blocked layout; no Shape node
// left on the CPU of a CUDA graph). Written against the C API rather than Ort::ShapeInferContext, which reads shapes
// but not types (the CUDA ops are registered for float and float16).
//
// Most outputs have the type and shape of input 0 (the scan's u, the LayerNorms' X; both outputs of
// ResidualLayerNorm). TransposeLayerNorm moves axis 1 last (channel-first in, channels-last out) and
// DepthwiseConvSiLU moves the last axis to 1 (the reverse); their inferred shapes keep symbolic dimensions.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <string>
#include <utility>
#include <vector>

namespace vmamba_ort {

// OrtCustomOp::InferOutputShapeFn's type.
using InferShapeFn = OrtStatusPtr(ORT_API_CALL*)(const OrtCustomOp*, OrtShapeInferContext*);

// (N, C, d1, ..., dk) -> (N, d1, ..., dk, C): the order Transpose(perm = [0, 2, ..., k+1, 1]) gives.
template <typename Dim>
std::vector<Dim> channels_last(const std::vector<Dim>& shape) {
  std::vector<Dim> out(shape);
  if (shape.size() >= 2) {
    out.erase(out.begin() + 1);
    out.push_back(shape[1]);
  }
  return out;
}

// (N, d1, ..., dk, C) -> (N, C, d1, ..., dk): the reverse.
template <typename Dim>
std::vector<Dim> channels_first(const std::vector<Dim>& shape) {
  std::vector<Dim> out(shape);
  if (shape.size() >= 2) {
    out.pop_back();
    out.insert(out.begin() + 1, shape.back());
  }
  return out;
}

inline OrtStatusPtr ORT_API_CALL output_like_input0(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  // The context owns the input's info (Ort::ShapeInferContext releases it unfreed); the output's is copied.
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

inline OrtStatusPtr ORT_API_CALL outputs_like_input0(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
  for (size_t i = 0; i < op->GetOutputTypeCount(op); ++i) {
    if (OrtStatus* status = api.ShapeInferContext_SetOutputTypeShape(ctx, i, info)) return status;
  }
  return nullptr;
}

// Output 0: input 0's type, its dimensions (values and symbols) reordered by `reorder`.
template <typename Reorder>
OrtStatusPtr output_reordered(OrtShapeInferContext* ctx, Reorder reorder) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* in = nullptr;
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &in)) return status;
  ONNXTensorElementDataType type;
  size_t rank = 0;
  if (OrtStatus* status = api.GetTensorElementType(in, &type)) return status;
  if (OrtStatus* status = api.GetDimensionsCount(in, &rank)) return status;
  std::vector<int64_t> dims(rank);
  std::vector<const char*> symbols(rank);
  if (OrtStatus* status = api.GetDimensions(in, dims.data(), rank)) return status;
  if (OrtStatus* status = api.GetSymbolicDimensions(in, symbols.data(), rank)) return status;
  const std::vector<int64_t> out_dims = reorder(dims);
  const std::vector<const char*> out_symbols = reorder(symbols);
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* status = api.CreateTensorTypeAndShapeInfo(&out)) return status;
  OrtStatus* status = api.SetTensorElementType(out, type);
  if (status == nullptr) status = api.SetDimensions(out, out_dims.data(), out_dims.size());
  if (status == nullptr) status = api.SetSymbolicDimensions(out, const_cast<const char**>(out_symbols.data()), rank);
  if (status == nullptr) status = api.ShapeInferContext_SetOutputTypeShape(ctx, 0, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return status;
}

inline OrtStatusPtr ORT_API_CALL output_channels_last(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return output_reordered(ctx, [](const auto& shape) { return channels_last(shape); });
}

inline OrtStatusPtr ORT_API_CALL output_channels_first(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return output_reordered(ctx, [](const auto& shape) { return channels_first(shape); });
}

}  // namespace vmamba_ort
