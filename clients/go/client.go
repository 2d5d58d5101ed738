// Package glm is a small client of glm-api's glm.v1.GlmService: a connection with an optional API
// key and TLS, streaming Chat, Embed, Tokenize and ListModels. The generated messages and stubs are
// in the glmv1 package (`make gen-go`); Client.API gives the raw stub for anything not wrapped here.
package glm

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"glm-api/clients/go/glmv1"
)

// Option configures Dial.
type Option func(*settings)

type settings struct {
	apiKey string
	tls    *tls.Config
	dial   []grpc.DialOption
}

// WithAPIKey sends key as "authorization: Bearer KEY" metadata on every call.
func WithAPIKey(key string) Option { return func(s *settings) { s.apiKey = key } }

// WithTLS connects over TLS with cfg (an empty config trusts the system's roots); without it the
// connection is plaintext.
func WithTLS(cfg *tls.Config) Option { return func(s *settings) { s.tls = cfg } }

// WithDialOptions adds gRPC dial options, e.g. grpc.WithBlock().
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) { s.dial = append(s.dial, opts...) }
}

// bearer is per-call credentials carrying the API key. It does not require TLS, so that a key also
// reaches a local plaintext server; send keys over TLS anywhere else.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

// Client is a connection to a glm-api server; it is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	api  glmv1.GlmServiceClient
}

// Dial connects to target ("host:port"). The connection is made lazily, on the first call, unless
// grpc.WithBlock() is passed through WithDialOptions.
func Dial(ctx context.Context, target string, opts ...Option) (*Client, error) {
	var s settings
	for _, opt := range opts {
		opt(&s)
	}
	dial := []grpc.DialOption{grpc.WithInsecure()}
	if s.tls != nil {
		dial = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(s.tls))}
	}
	if s.apiKey != "" {
		dial = append(dial, grpc.WithPerRPCCredentials(bearer(s.apiKey)))
	}
	conn, err := grpc.DialContext(ctx, target, append(dial, s.dial...)...)
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, api: glmv1.NewGlmServiceClient(conn)}, nil
}

// API is the generated stub, for calls with grpc.CallOption or anything not wrapped here; its errors
// are gRPC's own (a stream cut by a proxy is Internal there).
func (c *Client) API() glmv1.GlmServiceClient { return c.api }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Chat streams a reply: call Recv until io.EOF. Cancelling ctx stops the generation on the server.
// A stream a proxy cut after the reply began fails with a StreamCutError (Unavailable).
func (c *Client) Chat(ctx context.Context, req *glmv1.ChatRequest) (glmv1.GlmService_ChatClient, error) {
	stream, err := c.api.Chat(ctx, req)
	if err != nil {
		return nil, reported(err)
	}
	return chatStream{stream}, nil
}

// chatStream is a Chat stream whose Recv reports errors as the client does.
type chatStream struct {
	glmv1.GlmService_ChatClient
}

func (s chatStream) Recv() (*glmv1.ChatResponse, error) {
	chunk, err := s.GlmService_ChatClient.Recv()
	return chunk, reported(err)
}

// ChatReply is a whole chat reply, gathered from the stream.
type ChatReply struct {
	Text         string
	FinishReason string
	Usage        *glmv1.Usage
	Model        string
}

// ChatText streams a reply and returns it whole; onDelta, when not nil, sees each new piece of text
// as it arrives.
func (c *Client) ChatText(ctx context.Context, req *glmv1.ChatRequest, onDelta func(string)) (*ChatReply, error) {
	stream, err := c.Chat(ctx, req)
	if err != nil {
		return nil, err
	}
	var reply ChatReply
	var text strings.Builder
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		reply.Model = chunk.GetModel()
		if chunk.GetUsage() != nil {
			reply.Usage = chunk.GetUsage()
		}
		for _, choice := range chunk.GetChoices() {
			piece := choice.GetDelta().GetContent() + choice.GetMessage().GetContent()
			text.WriteString(piece)
			if onDelta != nil && piece != "" {
				onDelta(piece)
			}
			if choice.GetFinishReason() != "" {
				reply.FinishReason = choice.GetFinishReason()
			}
		}
	}
	reply.Text = text.String()
	return &reply, nil
}

// Embed returns one vector per prompt, in order, from model ("" for the default embedding model).
func (c *Client) Embed(ctx context.Context, model string, prompts []string, normalize bool) (*glmv1.EmbedResponse, error) {
	reply, err := c.api.Embed(ctx, &glmv1.EmbedRequest{Model: model, Prompt: prompts, Normalize: normalize})
	return reply, reported(err)
}

// Tokenize splits text into the tokens of model's tokenizer ("" for the default chat model).
func (c *Client) Tokenize(ctx context.Context, model, text string) (*glmv1.TokenizeResponse, error) {
	reply, err := c.api.Tokenize(ctx, &glmv1.TokenizeRequest{Model: model, Prompt: text})
	return reply, reported(err)
}

// ListModels lists the configured models with their limits and readiness.
func (c *Client) ListModels(ctx context.Context) (*glmv1.ListModelsResponse, error) {
	reply, err := c.api.ListModels(ctx, &glmv1.ListModelsRequest{})
	return reply, reported(err)
}
