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

constexpr const char* kInputNames[] = {"u", "delta", "A_logs", "B", "C", "D", "delta_bias"};
constexpr size_t kNumInputs = 7;

class SelectiveScan2D : public ov::op::Op {
 public:
  // Type name and opset written into the IR (<layer type="SelectiveScan2D" version="vmamba">).
  OPENVINO_OP("SelectiveScan2D", "vmamba");

  SelectiveScan2D() = default;
  explicit SelectiveScan2D(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

  void validate_and_infer_types() override {
    NODE_VALIDATION_CHECK(this, get_input_size() == kNumInputs,
                          "SelectiveScan2D expects 7 inputs (u, delta, A_logs, B, C, D, delta_bias), got ",
                          get_input_size());
    const auto type = get_input_element_type(0);
    for (size_t i = 1; i < kNumInputs; ++i) {
      const auto other = get_input_element_type(i);
      NODE_VALIDATION_CHECK(this, other.is_dynamic() || type.is_dynamic() || other == type, "input '",
                            kInputNames[i], "' has element type ", other, ", input 'u' has ", type);
    }
    const auto& u = get_input_partial_shape(0);
    const auto& delta = get_input_partial_shape(1);
    NODE_VALIDATION_CHECK(this, u.rank().compatible(4), "input 'u' must be (B, Di, H, W), got ", u);
    NODE_VALIDATION_CHECK(this, delta.rank().compatible(5), "input 'delta' must be (B, K, Di, H, W), got ", delta);
    NODE_VALIDATION_CHECK(this, get_input_partial_shape(2).rank().compatible(2), "input 'A_logs' must be (K*Di, N)");
    // y has the shape of u (docs/scan-op.md); batch, height and width stay dynamic when u's are.
    set_output_type(0, type, u);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& new_args) const override {
    check_new_args_count(this, new_args);
    return std::make_shared<SelectiveScan2D>(new_args);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }  // no attributes

  bool has_evaluate() const override {
    // The kernel is float32 only; OpenVINO's CPU plugin keeps an extension op in the precision it declares here,
    // inserting converts around it under a bf16 inference precision (checked in tests/test_openvino.py).
    for (size_t i = 0; i < get_input_size(); ++i) {
      if (get_input_element_type(i) != ov::element::f32) return false;
    }
    return true;
  }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    OPENVINO_ASSERT(inputs.size() == kNumInputs && outputs.size() == 1, "SelectiveScan2D: expects 7 inputs, 1 output");
    for (size_t i = 0; i < kNumInputs; ++i) {
      OPENVINO_ASSERT(inputs[i].get_element_type() == ov::element::f32, "SelectiveScan2D: input '", kInputNames[i],
                      "' must be f32, got ", inputs[i].get_element_type());
    }
    const ov::Shape& us = inputs[0].get_shape();
    const ov::Shape& ds = inputs[1].get_shape();
    OPENVINO_ASSERT(us.size() == 4, "SelectiveScan2D: input 'u' must be (B, Di, H, W), got ", us);
    OPENVINO_ASSERT(ds.size() == 5, "SelectiveScan2D: input 'delta' must be (B, K, Di, H, W), got ", ds);
    OPENVINO_ASSERT(inputs[2].get_shape().size() == 2, "SelectiveScan2D: input 'A_logs' must be (K*Di, N), got ",
                    inputs[2].get_shape());
    const size_t b = us[0], di = us[1], h = us[2], w = us[3], k = ds[1], n = inputs[2].get_shape()[1];
    const std::vector<ov::Shape> expected = {us, {b, k, di, h, w}, {k * di, n}, {b, k, n, h, w}, {b, k, n, h, w},
                                             {k * di}, {k * di}};
    for (size_t i = 1; i < kNumInputs; ++i) {
      OPENVINO_ASSERT(inputs[i].get_shape() == expected[i], "SelectiveScan2D: input '", kInputNames[i],
                      "' must have shape ", expected[i], " (from u ", us, " and delta ", ds, "), got ",
                      inputs[i].get_shape());
    }
    const vmamba::ScanShape shape{static_cast<int64_t>(b), static_cast<int64_t>(k), static_cast<int64_t>(di),
                                  static_cast<int64_t>(n), static_cast<int64_t>(h), static_cast<int64_t>(w)};
    if (const char* err = vmamba::check_scan_shape(shape)) OPENVINO_THROW("SelectiveScan2D: ", err);

    outputs[0].set_shape(us);  // output shapes are dynamic until the inputs are known
    auto f = [&](size_t i) { return inputs[i].data<const float>(); };
    const vmamba::ScanTensors tensors{f(0), f(1), f(2), f(3), f(4), f(5), f(6), outputs[0].data<float>()};
    if (const char* err = vmamba::selective_scan_2d_f32(tensors, shape, ov_parallel_for, nullptr)) {
      OPENVINO_THROW("SelectiveScan2D: ", err);
    }
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
