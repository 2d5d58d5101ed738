// The failure of a glm-api call, as the C++ client reports it.
#ifndef GLM_API_CLIENTS_CPP_GLM_ERROR_H_
#define GLM_API_CLIENTS_CPP_GLM_ERROR_H_

#include <grpcpp/grpcpp.h>

#include <string>

namespace glm {

// A call that ended with a status other than OK.
//
// One failure has another code than gRPC's: a stream its peer reset with HTTP/2's INTERNAL_ERROR,
// which gRPC reports as INTERNAL, is UNAVAILABLE here. That reset is how Envoy ends a call whose
// reply had begun when the server behind it was lost; over a direct connection the same loss is
// UNAVAILABLE already. The call may be made again; grpc_code keeps INTERNAL.
struct CallError {
  // The status code, e.g. grpc::StatusCode::NOT_FOUND.
  grpc::StatusCode code;
  // The code gRPC reported: code, except for a stream cut as above.
  grpc::StatusCode grpc_code;
  // The status message the server (or the gRPC runtime) gave.
  std::string message;
};

// Whether status is a stream that a proxy cut with HTTP/2's INTERNAL_ERROR.
bool CutByProxy(const grpc::Status& status);

// The error of a call that gRPC ended with status (not OK).
CallError ErrorOf(const grpc::Status& status);

// The canonical name of a gRPC status code, e.g. "NOT_FOUND".
const char* CodeName(grpc::StatusCode code);

}  // namespace glm

#endif  // GLM_API_CLIENTS_CPP_GLM_ERROR_H_
