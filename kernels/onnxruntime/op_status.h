// Error reporting shared by the library's ops (custom_op.cpp, cuda_op.cpp): a status that names the op, and a guard
// that turns any C++ exception into such a status, since none may cross into ONNX Runtime.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

namespace vmamba_ort {

inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// `op` as the message should name it, e.g. "SelectiveScan2D" or "SelectiveScan2D (CUDA)".
inline OrtStatus* op_status(OrtErrorCode code, const std::string& message, const std::string& op) {
  return Ort::GetApi().CreateStatus(code, (op + ": " + message).c_str());
}

// Runs `body` (which returns a status) and turns any exception into a status naming `op`.
template <typename Body>
OrtStatus* guarded_status(const std::string& op, Body&& body) {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return op_status(e.GetOrtErrorCode(), e.what(), op);
  } catch (const std::exception& e) {
    return op_status(ORT_FAIL, e.what(), op);
  } catch (...) {
    return op_status(ORT_FAIL, "unknown error", op);
  }
}

}  // namespace vmamba_ort
