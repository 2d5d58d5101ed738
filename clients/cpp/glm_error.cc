#include "glm_error.h"

#include <regex>

namespace glm {
namespace {

// How grpc-core's chttp2 transport words a stream its peer reset before the call's status came
// (frame_rst_stream.cc: "Received RST_STREAM with error code " and the HTTP/2 code as a number).
const std::regex& PeerReset() {
  static const std::regex pattern(R"(\bReceived RST_STREAM with error code (\d+)\b)");
  return pattern;
}

// HTTP/2's INTERNAL_ERROR: the code Envoy resets a stream with when it must end it after the reply
// began, e.g. because the server behind it died.
constexpr int kHttp2InternalError = 2;

}  // namespace

bool CutByProxy(const grpc::Status& status) {
  if (status.error_code() != grpc::StatusCode::INTERNAL) return false;
  std::smatch reset;
  const std::string& message = status.error_message();
  return std::regex_search(message, reset, PeerReset()) &&
         reset[1].str() == std::to_string(kHttp2InternalError);
}

CallError ErrorOf(const grpc::Status& status) {
  grpc::StatusCode code =
      CutByProxy(status) ? grpc::StatusCode::UNAVAILABLE : status.error_code();
  return CallError{code, status.error_code(), status.error_message()};
}

const char* CodeName(grpc::StatusCode code) {
  static const char* kNames[] = {
      "OK",        "CANCELLED",         "UNKNOWN",      "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
      "NOT_FOUND", "ALREADY_EXISTS",    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",   "INTERNAL",
      "UNAVAILABLE", "DATA_LOSS",       "UNAUTHENTICATED"};
  int index = static_cast<int>(code);
  return index >= 0 && index <= 16 ? kNames[index] : "UNKNOWN";
}

}  // namespace glm
