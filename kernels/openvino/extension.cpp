// OpenVINO extension: the op `vmamba::SelectiveScan2D` (contract: docs/scan-op.md), computed by the shared CPU
// kernel (kernels/cpu) on OpenVINO's own TBB threads (ov::parallel_for), so the op obeys INFERENCE_NUM_THREADS and
// never starts a second thread pool (OpenMP in an extension fought OpenVINO's threads: FIELD-NOTES.md).
//
// One library serves every way a model reaches OpenVINO:
//   - IR (.xml/.bin): ov::OpExtension registers the op type `SelectiveScan2D`, opset `vmamba`, for reading IR back;
//   - ONNX: node `SelectiveScan2D` of domain `ai.vmamba` (what lowering/onnx_export.py writes) maps to the op;
//   - torch.export: the ExportedProgram op `vmamba.selective_scan_2d.default` maps to the op.
// Load it with `core.add_extension(path)` or `ov.convert_model(..., extension=path)`.
//
// Types and shapes beyond docs/scan-op.md, for OpenVINO's bf16 inference (lowering/openvino_ir.py): the data tensors
// u, delta, B, C and y may be bf16 (the parameters A_logs, D, delta_bias stay f32), so the CPU plugin feeds the op
// the bf16 its convolutions produce instead of converting every input to f32 and the output back; and delta, B and C
// may come flattened over the directions, (B, K*Di, H, W) and (B, K*N, H, W), the same memory as the 5-D forms, so
// the convolution outputs reach the op without a Reshape (which made the plugin reorder them to a planar layout once
// for the Reshape and once more for the op). And an optional 8th input, dt_weight (K, Di, R), fuses the dt projection
// (the grouped 1x1 convolution making delta from its (B, K*R, H, W) input) into the op: input 1 is then that input,
// 1/16 to 1/32 the size of delta, which is computed tile by tile in the kernel and never stored.
//
// Built by vmamba_export/build_kernels.py with g++ against the openvino wheel's headers; linked only against
// libopenvino and libtbb (the frontend extension classes used here are header-only over libopenvino), so a runtime
// that only reads IR needs no frontend library.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../cpu/selective_scan_2d.h"
#include "openvino/core/extension.hpp"
#include "openvino/core/op_extension.hpp"
#include "openvino/core/parallel.hpp"
#include "openvino/core/version.hpp"
#include "openvino/frontend/onnx/extension/op.hpp"
#include "openvino/frontend/pytorch/extension/op.hpp"
#include "openvino/op/op.hpp"

namespace vmamba_ov {

constexpr const char* kInputNames[] = {"u", "delta", "A_logs", "B", "C", "D", "delta_bias", "dt_weight"};
constexpr size_t kNumInputs = 7;  // the op of docs/scan-op.md; an 8th, dt_weight, fuses the dt projection
// u, delta (or the dt projection's input), B, C: f32 or bf16, like y; the rest are f32 parameters.
bool is_data_input(size_t i) { return i == 0 || i == 1 || i == 3 || i == 4; }

class SelectiveScan2D : public ov::op::Op {
 public:
  // Type name and opset written into the IR (<layer type="SelectiveScan2D" version="vmamba">).
  OPENVINO_OP("SelectiveScan2D", "vmamba");

  SelectiveScan2D() = default;
  explicit SelectiveScan2D(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

  void validate_and_infer_types() override {
    const size_t count = get_input_size();
    NODE_VALIDATION_CHECK(this, count == kNumInputs || count == kNumInputs + 1,
                          "SelectiveScan2D expects 7 inputs (u, delta, A_logs, B, C, D, delta_bias) or 8 "
                          "(+ dt_weight), got ", count);
    const auto type = get_input_element_type(0);
    NODE_VALIDATION_CHECK(this, type.is_dynamic() || type == ov::element::f32 || type == ov::element::bf16,
                          "input 'u' must be f32 or bf16, got ", type);
    for (size_t i = 1; i < count; ++i) {
      const auto other = get_input_element_type(i);
      if (is_data_input(i)) {
        NODE_VALIDATION_CHECK(this, other.is_dynamic() || type.is_dynamic() || other == type, "input '",
                              kInputNames[i], "' has element type ", other, ", input 'u' has ", type);
      } else {
        NODE_VALIDATION_CHECK(this, other.is_dynamic() || other == ov::element::f32, "input '", kInputNames[i],
                              "' must be f32, got ", other);
      }
    }
    const auto& u = get_input_partial_shape(0);
    const auto& delta = get_input_partial_shape(1);
    NODE_VALIDATION_CHECK(this, u.rank().compatible(4), "input 'u' must be (B, Di, H, W), got ", u);
    if (count == kNumInputs) {
      NODE_VALIDATION_CHECK(this, delta.rank().compatible(5) || delta.rank().compatible(4),
                            "input 'delta' must be (B, K, Di, H, W) or (B, K*Di, H, W), got ", delta);
    } else {
      NODE_VALIDATION_CHECK(this, delta.rank().compatible(4), "with dt_weight, input 1 must be (B, K*R, H, W), got ",
                            delta);
      NODE_VALIDATION_CHECK(this, get_input_partial_shape(7).rank().compatible(3),
                            "input 'dt_weight' must be (K, Di, R), got ", get_input_partial_shape(7));
    }
    NODE_VALIDATION_CHECK(this, get_input_partial_shape(2).rank().compatible(2), "input 'A_logs' must be (K*Di, N)");
    // y has the shape of u (docs/scan-op.md); batch, height and width stay dynamic when u's are.
    set_output_type(0, type, u);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
    return std::make_shared<SelectiveScan2D>(new_args);  // validate_and_infer_types checks the count
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }  // no attributes

  bool has_evaluate() const override {
    // OpenVINO's CPU plugin keeps an extension op in the precisions its inputs declare, inserting converts where
    // its neighbours run in another (checked in tests/test_openvino.py).
    const auto type = get_input_element_type(0);
    if (type != ov::element::f32 && type != ov::element::bf16) return false;
    for (size_t i = 1; i < get_input_size(); ++i) {
      if (get_input_element_type(i) != (is_data_input(i) ? type : ov::element::f32)) return false;
    }
    return true;
  }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const size_t count = inputs.size();
    OPENVINO_ASSERT((count == kNumInputs || count == kNumInputs + 1) && outputs.size() == 1,
                    "SelectiveScan2D: expects 7 or 8 inputs, 1 output");
    const ov::element::Type type = inputs[0].get_element_type();
    OPENVINO_ASSERT(type == ov::element::f32 || type == ov::element::bf16,
                    "SelectiveScan2D: input 'u' must be f32 or bf16, got ", type);
    for (size_t i = 1; i < count; ++i) {
      const ov::element::Type want = is_data_input(i) ? type : ov::element::f32;
      OPENVINO_ASSERT(inputs[i].get_element_type() == want, "SelectiveScan2D: input '", kInputNames[i], "' must be ",
                      want, ", got ", inputs[i].get_element_type());
    }
    const ov::Shape& us = inputs[0].get_shape();
    const ov::Shape& ds = inputs[1].get_shape();
    const ov::Shape& as = inputs[2].get_shape();
    OPENVINO_ASSERT(us.size() == 4, "SelectiveScan2D: input 'u' must be (B, Di, H, W), got ", us);
    OPENVINO_ASSERT(ds.size() == 5 || ds.size() == 4,
                    "SelectiveScan2D: input 'delta' must be (B, K, Di, H, W) or (B, K*Di, H, W), got ", ds);
    OPENVINO_ASSERT(as.size() == 2 && us[1] > 0 && as[0] % us[1] == 0,
                    "SelectiveScan2D: input 'A_logs' must be (K*Di, N), got ", as, " for u ", us);
    const size_t b = us[0], di = us[1], h = us[2], w = us[3], k = as[0] / di, n = as[1];
    const bool fused = count == kNumInputs + 1;
    const ov::Shape& ws = inputs[fused ? 7 : 0].get_shape();
    OPENVINO_ASSERT(!fused || (ws.size() == 3 && ws[0] == k && ws[1] == di && ws[2] >= 1),
                    "SelectiveScan2D: input 'dt_weight' must be (", k, ", ", di, ", R), got ", ws);
    const size_t rank = fused ? ws[2] : 0;
    // delta, B and C all 5-D or all flattened over the directions (same memory either way); with dt_weight, input 1
    // is the dt projection's input, flattened, and so are B and C.
    const bool flat = ds.size() == 4;
    auto planes = [&](size_t c) { return flat ? ov::Shape{b, k * c, h, w} : ov::Shape{b, k, c, h, w}; };
    const std::vector<ov::Shape> expected = {us, planes(fused ? rank : di), {k * di, n}, planes(n), planes(n),
                                             {k * di}, {k * di}};
    for (size_t i = 1; i < kNumInputs; ++i) {
      OPENVINO_ASSERT(inputs[i].get_shape() == expected[i], "SelectiveScan2D: input '", kInputNames[i],
                      "' must have shape ", expected[i], " (from u ", us, ", A_logs ", as, " and delta ", ds,
                      "), got ", inputs[i].get_shape());
    }
    const vmamba::ScanShape shape{static_cast<int64_t>(b), static_cast<int64_t>(k), static_cast<int64_t>(di),
                                  static_cast<int64_t>(n), static_cast<int64_t>(h), static_cast<int64_t>(w)};
    if (const char* err = vmamba::check_scan_shape(shape)) OPENVINO_THROW("SelectiveScan2D: ", err);

    outputs[0].set_shape(us);  // output shapes are dynamic until the inputs are known
    auto f = [&](size_t i) { return inputs[i].data<const float>(); };
    const float* dt_weight = fused ? f(7) : nullptr;
    const char* err = nullptr;
    if (type == ov::element::bf16) {
      // ov::bfloat16 is a 16-bit wrapper of the same bits the kernel reads as uint16_t.
      auto h = [&](size_t i) { return reinterpret_cast<const uint16_t*>(inputs[i].data<const ov::bfloat16>()); };
      const vmamba::ScanTensorsBf16 tensors{h(0), h(1), f(2), h(3), h(4), f(5), f(6),
                                            reinterpret_cast<uint16_t*>(outputs[0].data<ov::bfloat16>()), dt_weight,
                                            static_cast<int64_t>(rank)};
      err = vmamba::selective_scan_2d_bf16(tensors, shape, ov_parallel_for, nullptr);
    } else {
      const vmamba::ScanTensors tensors{f(0), f(1), f(2), f(3), f(4), f(5), f(6), outputs[0].data<float>(),
                                        dt_weight, static_cast<int64_t>(rank)};
      err = vmamba::selective_scan_2d_f32(tensors, shape, ov_parallel_for, nullptr);
    }
    if (err != nullptr) OPENVINO_THROW("SelectiveScan2D: ", err);
    return true;
  }

 private:
  // Adapts the kernel's ParallelFor callback to OpenVINO's TBB arena: the CPU plugin calls evaluate inside the arena
  // sized by INFERENCE_NUM_THREADS, and ov::parallel_for spreads the items over that arena's threads.
  static void ov_parallel_for(void*, int64_t n, void (*fn)(void*, int64_t), void* arg) {
    ov::parallel_for(n, [&](int64_t i) { fn(arg, i); });
  }
};

}  // namespace vmamba_ov

#define VMAMBA_STR2(x) #x
#define VMAMBA_STR(x) VMAMBA_STR2(x)

// The OpenVINO release whose headers this library was compiled against ("2026.4.1"). The library links the
// versioned libopenvino.so.<YYYYMP>, so it loads only in that release; the lowering records this string in the
// artifact and the runtime loader compares it with the installed OpenVINO before loading anything.
extern "C" __attribute__((visibility("default"))) const char* vmamba_openvino_version() {
  return VMAMBA_STR(OPENVINO_VERSION_MAJOR) "." VMAMBA_STR(OPENVINO_VERSION_MINOR) "." VMAMBA_STR(
      OPENVINO_VERSION_PATCH);
}

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<vmamba_ov::SelectiveScan2D>>(),
    std::make_shared<ov::frontend::onnx::OpExtension<vmamba_ov::SelectiveScan2D>>("SelectiveScan2D", "ai.vmamba"),
    std::make_shared<ov::frontend::pytorch::OpExtension<vmamba_ov::SelectiveScan2D>>(
        "vmamba.selective_scan_2d.default"),
}));
