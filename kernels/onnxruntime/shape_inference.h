// Shape inference for the library's ops, whose single output has the type and shape of input 0 (the scan's u, the
// LayerNorms' X). Declaring it lets ONNX Runtime infer every shape after our nodes, so a session with fixed input
// dimensions folds the shape arithmetic downstream into constants (the segmentation head's Resize sizes, which its
// CPU NCHWc transformer needs to run bilinear upsampling in the blocked layout; no Shape node left on the CPU of a
// CUDA graph). Written against the C API rather than Ort::ShapeInferContext, which reads shapes but not types (the
// CUDA ops are registered for float and float16).
#pragma once

#include <onnxruntime_cxx_api.h>

namespace vmamba_ort {

inline OrtStatusPtr ORT_API_CALL output_like_input0(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  // The context owns the input's info (Ort::ShapeInferContext releases it unfreed); the output's is copied.
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

}  // namespace vmamba_ort
