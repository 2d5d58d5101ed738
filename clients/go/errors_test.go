package glm

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"glm-api/clients/go/glmv1"
)

// fakePeer serves Chat over plaintext HTTP/2: one empty message, then the ending the prompt names.
// A handler that panics with http.ErrAbortHandler makes x/net/http2's server reset the stream with
// INTERNAL_ERROR (handlerPanicRST), which is what Envoy sends when the server behind it dies.
func fakePeer(t *testing.T) string {
	t.Helper()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := new(strings.Builder)
		buf := make([]byte, 4096)
		for {
			n, err := r.Body.Read(buf)
			body.Write(buf[:n])
			if err != nil {
				break
			}
		}
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
		w.WriteHeader(http.StatusOK)
		w.Write([]byte{0, 0, 0, 0, 0})
		w.(http.Flusher).Flush()
		if strings.Contains(body.String(), "reset") {
			panic(http.ErrAbortHandler)
		}
		w.Header().Set("Grpc-Status", "13")
		w.Header().Set("Grpc-Message", "an incident id")
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := &http.Server{Handler: h2c.NewHandler(handler, &http2.Server{})}
	go server.Serve(listener)
	t.Cleanup(func() { server.Close() })
	return listener.Addr().String()
}

// chatError streams a Chat from the fake peer and returns how many messages came and the error.
func chatError(t *testing.T, target, prompt string) (int, error) {
	t.Helper()
	client, err := Dial(context.Background(), target)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	stream, err := client.Chat(context.Background(), &glmv1.ChatRequest{
		Messages: []*glmv1.ChatMessage{{Role: "user", Content: prompt}},
	})
	if err != nil {
		return 0, err
	}
	received := 0
	for {
		if _, err := stream.Recv(); err != nil {
			return received, err
		}
		received++
	}
}

func TestStreamResetWithInternalErrorIsUnavailable(t *testing.T) {
	received, err := chatError(t, fakePeer(t), "reset")
	if received != 1 {
		t.Errorf("received %d messages before the reset, want 1", received)
	}
	var cut *StreamCutError
	if !errors.As(err, &cut) {
		t.Fatalf("error %v (%T) is not a StreamCutError", err, err)
	}
	if got := status.Code(err); got != codes.Unavailable {
		t.Errorf("status.Code = %v, want Unavailable", got)
	}
	if got := GRPCCode(err); got != codes.Internal {
		t.Errorf("GRPCCode = %v, want Internal", got)
	}
	if got := status.Code(errors.Unwrap(err)); got != codes.Internal {
		t.Errorf("the unwrapped error's code = %v, want Internal", got)
	}
	const message = "stream terminated by RST_STREAM with error code: INTERNAL_ERROR"
	if got := status.Convert(err).Message(); got != message {
		t.Errorf("message = %q, want %q", got, message)
	}
}

func TestServerInternalStatusStaysInternal(t *testing.T) {
	_, err := chatError(t, fakePeer(t), "status")
	if got, want := status.Convert(err), status.New(codes.Internal, "an incident id"); got.Code() != want.Code() || got.Message() != want.Message() {
		t.Errorf("error = %v, want %v", err, want.Err())
	}
	if got := GRPCCode(err); got != codes.Internal {
		t.Errorf("GRPCCode = %v, want Internal", got)
	}
}

func TestOtherFailuresKeepTheirCode(t *testing.T) {
	for _, st := range []*status.Status{
		status.New(codes.Internal, "stream terminated by RST_STREAM with error code: PROTOCOL_ERROR"),
		status.New(codes.Internal, "stream terminated by RST_STREAM with error code: NO_ERROR"),
		status.New(codes.Internal, "an incident id"),
		status.New(codes.ResourceExhausted, "stream terminated by RST_STREAM with error code: ENHANCE_YOUR_CALM"),
		status.New(codes.Unavailable, "transport is closing"),
	} {
		err := st.Err()
		if got := reported(err); got != err {
			t.Errorf("reported(%v) = %v, want it unchanged", err, got)
		}
		if got := GRPCCode(err); got != st.Code() {
			t.Errorf("GRPCCode(%v) = %v, want %v", err, got, st.Code())
		}
	}
	if reported(nil) != nil {
		t.Error("reported(nil) is not nil")
	}
}
