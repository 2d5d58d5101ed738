// glm::ErrorOf's codes: a stream a proxy reset with INTERNAL_ERROR is UNAVAILABLE (grpc_code
// INTERNAL); every other failure keeps gRPC's code. Exits with 1 on a failed check.
#include <iostream>
#include <string>
#include <vector>

#include "glm_error.h"

namespace {

int failures = 0;

void Check(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

}  // namespace

int main() {
  // What grpc-core reports for a stream Envoy cut after its reply began (the replica died).
  const std::string cut_message = "Received RST_STREAM with error code 2";
  glm::CallError cut = glm::ErrorOf(grpc::Status(grpc::StatusCode::INTERNAL, cut_message));
  Check(cut.code == grpc::StatusCode::UNAVAILABLE, "a cut stream is UNAVAILABLE");
  Check(cut.grpc_code == grpc::StatusCode::INTERNAL, "a cut stream keeps gRPC's INTERNAL");
  Check(cut.message == cut_message, "a cut stream keeps gRPC's message");

  // The server's own INTERNAL status (a bug), resets with other HTTP/2 codes, other failures.
  const std::vector<grpc::Status> others = {
      {grpc::StatusCode::INTERNAL, "an incident id"},
      {grpc::StatusCode::INTERNAL, "Received RST_STREAM with error code 0"},
      {grpc::StatusCode::INTERNAL, "Received RST_STREAM with error code 1"},
      {grpc::StatusCode::INTERNAL, "Received RST_STREAM with error code 22"},
      {grpc::StatusCode::RESOURCE_EXHAUSTED, "Received RST_STREAM with error code 11"},
      {grpc::StatusCode::UNAVAILABLE, "Socket closed"},
  };
  for (const grpc::Status& status : others) {
    glm::CallError error = glm::ErrorOf(status);
    Check(error.code == status.error_code() && error.grpc_code == status.error_code() &&
              error.message == status.error_message(),
          std::string("keeps its code: ") + glm::CodeName(status.error_code()) + ": " +
              status.error_message());
  }
  if (failures == 0) std::cout << "glm_error_test: all checks passed\n";
  return failures == 0 ? 0 : 1;
}
