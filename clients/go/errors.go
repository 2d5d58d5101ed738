package glm

import (
	"regexp"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// peerReset is how grpc-go's transport words a stream its peer reset (an HTTP/2 RST_STREAM)
// before the call's status came (internal/transport/http2_client.go, handleRSTStream: "stream
// terminated by RST_STREAM with error code: %v" of golang.org/x/net/http2's ErrCode name).
var peerReset = regexp.MustCompile(`\bstream terminated by RST_STREAM with error code: INTERNAL_ERROR\b`)

// cutByProxy tells whether st is a stream that a proxy reset with HTTP/2's INTERNAL_ERROR, which
// grpc-go reports as codes.Internal: how Envoy ends a call whose reply had begun when the server
// behind it was lost.
func cutByProxy(st *status.Status) bool {
	return st.Code() == codes.Internal && peerReset.MatchString(st.Message())
}

// StreamCutError is the error of a call whose stream a proxy cut after the reply began (Envoy,
// when the server replica behind it dies): gRPC reports it as Internal, the client as Unavailable,
// as gRPC itself does when a direct connection breaks. The call may be made again; the responses
// already received stand. status.Code and status.FromError see Unavailable; GRPCCode and
// errors.Unwrap give gRPC's own error.
type StreamCutError struct {
	err error
	st  *status.Status
}

func (e *StreamCutError) Error() string {
	return "rpc error: code = " + codes.Unavailable.String() + " desc = " + e.st.Message()
}

// GRPCStatus is the status the client reports: Unavailable, with gRPC's message.
func (e *StreamCutError) GRPCStatus() *status.Status {
	return status.New(codes.Unavailable, e.st.Message())
}

// Unwrap gives the error gRPC returned.
func (e *StreamCutError) Unwrap() error { return e.err }

// reported is err as the client returns it: a stream cut by a proxy becomes a StreamCutError,
// every other error (nil included) is returned as it is.
func reported(err error) error {
	if st, ok := status.FromError(err); ok && err != nil && cutByProxy(st) {
		return &StreamCutError{err: err, st: st}
	}
	return err
}

// GRPCCode is the code gRPC reported for err: status.Code(err), except for a StreamCutError,
// whose gRPC code is Internal.
func GRPCCode(err error) codes.Code {
	if cut, ok := err.(*StreamCutError); ok {
		return cut.st.Code()
	}
	return status.Code(err)
}
