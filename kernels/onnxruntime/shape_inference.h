// Shape inference for the library's ops. Declaring it lets ONNX Runtime infer every shape after our nodes, so a
// session with fixed input dimensions folds the shape arithmetic downstream into constants (the segmentation head's
// Resize sizes, which its CPU NCHWc transformer needs to run bilinear upsampling in the blocked layout; no Shape node
// left on the CPU of a CUDA graph). Written against the C API rather than Ort::ShapeInferContext, which reads shapes
// but not types (the CUDA ops are registered for float and float16).
//
// Most outputs have the type and shape of input 0 (the scan's u, the LayerNorms' X; both outputs of
// ResidualLayerNorm). TransposeLayerNorm moves axis 1 last (channel-first in, channels-last out) and
// DepthwiseConvSiLU moves the last axis to 1 (the reverse); ScanProjections makes the scan's delta, B and C from u and
// its weights, DepthwiseConvProjections u (as DepthwiseConvSiLU) and then the same three; NarrowPointwiseConv takes its
// channel count from the weight. Inferred shapes keep symbolic dimensions.
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

// Input `index`'s element type, dimensions and symbols ("" where a dimension has a value).
inline OrtStatusPtr input_dims(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType& type,
                               std::vector<int64_t>& dims, std::vector<const char*>& symbols) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* in = nullptr;
  size_t rank = 0;
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, index, &in)) return status;
  if (OrtStatus* status = api.GetTensorElementType(in, &type)) return status;
  if (OrtStatus* status = api.GetDimensionsCount(in, &rank)) return status;
  dims.assign(rank, 0);
  symbols.assign(rank, nullptr);
  if (OrtStatus* status = api.GetDimensions(in, dims.data(), rank)) return status;
  return api.GetSymbolicDimensions(in, symbols.data(), rank);
}

// Output `index`: `type`, `dims` with `symbols` (same length).
inline OrtStatusPtr set_output(OrtShapeInferContext* ctx, size_t index, ONNXTensorElementDataType type,
                               const std::vector<int64_t>& dims, const std::vector<const char*>& symbols) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* out = nullptr;
  if (OrtStatus* status = api.CreateTensorTypeAndShapeInfo(&out)) return status;
  OrtStatus* status = api.SetTensorElementType(out, type);
  if (status == nullptr) status = api.SetDimensions(out, dims.data(), dims.size());
  if (status == nullptr) {
    status = api.SetSymbolicDimensions(out, const_cast<const char**>(symbols.data()), symbols.size());
  }
  if (status == nullptr) status = api.ShapeInferContext_SetOutputTypeShape(ctx, index, out);
  api.ReleaseTensorTypeAndShapeInfo(out);
  return status;
}

// Output 0: input 0's type, its dimensions (values and symbols) reordered by `reorder`.
template <typename Reorder>
OrtStatusPtr output_reordered(OrtShapeInferContext* ctx, Reorder reorder) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> dims;
  std::vector<const char*> symbols;
  if (OrtStatus* status = input_dims(ctx, 0, type, dims, symbols)) return status;
  return set_output(ctx, 0, type, reorder(dims), reorder(symbols));
}

inline OrtStatusPtr ORT_API_CALL output_channels_last(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return output_reordered(ctx, [](const auto& shape) { return channels_last(shape); });
}

inline OrtStatusPtr ORT_API_CALL output_channels_first(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  return output_reordered(ctx, [](const auto& shape) { return channels_first(shape); });
}

// delta (B, 4, Di, H, W), B and C (B, 4, N, H, W) as outputs `first` to `first` + 2, from u's dimensions (B, Di, H, W)
// and the weights W_x (4 R + 8 N, Di) and dt_weight (4, Di, R), inputs `w_x` and `w_x` + 1: u's batch and spatial
// dimensions (values or symbols), N from the weights' rows.
inline OrtStatusPtr set_projection_outputs(OrtShapeInferContext* ctx, const char* op, ONNXTensorElementDataType type,
                                           const std::vector<int64_t>& u, const std::vector<const char*>& u_symbols,
                                           size_t w_x, size_t first) {
  ONNXTensorElementDataType weight_type;
  std::vector<int64_t> rows, dt;
  std::vector<const char*> unused;
  if (OrtStatus* status = input_dims(ctx, w_x, weight_type, rows, unused)) return status;
  if (OrtStatus* status = input_dims(ctx, w_x + 1, weight_type, dt, unused)) return status;
  if (u.size() != 4 || rows.size() != 2 || dt.size() != 3) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
                                      (std::string(op) + ": u must be 4-D, W_x 2-D and dt_weight 3-D").c_str());
  }
  const int64_t n_state = rows[0] > 0 && dt[2] > 0 ? (rows[0] - 4 * dt[2]) / 8 : -1;
  const std::vector<const char*> symbols = {u_symbols[0], "", u_symbols[1], u_symbols[2], u_symbols[3]};
  const std::vector<const char*> bc_symbols = {u_symbols[0], "", "", u_symbols[2], u_symbols[3]};
  if (OrtStatus* status = set_output(ctx, first, type, {u[0], 4, u[1], u[2], u[3]}, symbols)) return status;
  for (size_t i = first + 1; i < first + 3; ++i) {
    if (OrtStatus* status = set_output(ctx, i, type, {u[0], 4, n_state, u[2], u[3]}, bc_symbols)) return status;
  }
  return nullptr;
}

// ScanProjections(u (B, Di, H, W), W_x, dt_weight) -> delta, B, C (set_projection_outputs).
inline OrtStatusPtr ORT_API_CALL scan_projection_outputs(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> u;
  std::vector<const char*> u_symbols;
  if (OrtStatus* status = input_dims(ctx, 0, type, u, u_symbols)) return status;
  return set_projection_outputs(ctx, "ScanProjections", type, u, u_symbols, 1, 0);
}

// DepthwiseConvProjections(X (B, H, W, Di), W, W_x, dt_weight[, bias]) -> u (B, Di, H, W), then delta, B, C from u's
// dimensions (set_projection_outputs).
inline OrtStatusPtr ORT_API_CALL conv_projection_outputs(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  ONNXTensorElementDataType type;
  std::vector<int64_t> x;
  std::vector<const char*> x_symbols;
  if (OrtStatus* status = input_dims(ctx, 0, type, x, x_symbols)) return status;
  const auto u = channels_first(x);
  const auto u_symbols = channels_first(x_symbols);
  if (OrtStatus* status = set_output(ctx, 0, type, u, u_symbols)) return status;
  return set_projection_outputs(ctx, "DepthwiseConvProjections", type, u, u_symbols, 2, 1);
}

// NarrowPointwiseConv(X (N, C, H, W), W (M, C, 1, 1)) -> Y (N, M, H, W): X's dimensions, M from the weight.
inline OrtStatusPtr ORT_API_CALL narrow_conv_output(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  ONNXTensorElementDataType type, weight_type;
  std::vector<int64_t> x, w;
  std::vector<const char*> symbols, unused;
  if (OrtStatus* status = input_dims(ctx, 0, type, x, symbols)) return status;
  if (OrtStatus* status = input_dims(ctx, 1, weight_type, w, unused)) return status;
  if (x.size() != 4 || w.size() != 4) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, "NarrowPointwiseConv: X and W must be 4-D");
  }
  x[1] = w[0];
  symbols[1] = "";
  return set_output(ctx, 0, type, x, symbols);
}

}  // namespace vmamba_ort
