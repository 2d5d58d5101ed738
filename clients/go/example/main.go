// Command example streams a chat reply, then embeds two texts, against a glm-api server.
//
//	example [-target HOST:PORT] [-api-key KEY] [-tls [-ca FILE]] [-model ID] [-max-tokens N] PROMPT
//
// A failed call prints "error: CODE: message" on stderr and exits with 1.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	glm "glm-api/clients/go"
	"glm-api/clients/go/glmv1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the server, host:port")
	apiKey := flag.String("api-key", "", "an API key, sent as a bearer token")
	useTLS := flag.Bool("tls", false, "connect over TLS")
	ca := flag.String("ca", "", "a PEM file of certificate authorities to trust (with -tls)")
	model := flag.String("model", "", "a chat model id (default: the server's default)")
	maxTokens := flag.Int("max-tokens", 32, "the most tokens to generate")
	flag.Parse()
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		prompt = "What is the capital of France?"
	}
	if err := run(*target, *apiKey, *useTLS, *ca, *model, int32(*maxTokens), prompt); err != nil {
		st := status.Convert(err)
		fmt.Fprintf(os.Stderr, "error: %s: %s\n", codeName(st.Code().String()), st.Message())
		os.Exit(1)
	}
}

// codeName turns grpc-go's "NotFound" into the canonical "NOT_FOUND".
func codeName(camel string) string {
	var b strings.Builder
	for i, r := range camel {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

func run(target, apiKey string, useTLS bool, ca, model string, maxTokens int32, prompt string) error {
	ctx := context.Background()
	var opts []glm.Option
	if apiKey != "" {
		opts = append(opts, glm.WithAPIKey(apiKey))
	}
	if useTLS {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if ca != "" {
			pem, err := os.ReadFile(ca)
			if err != nil {
				return err
			}
			cfg.RootCAs = x509.NewCertPool()
			cfg.RootCAs.AppendCertsFromPEM(pem)
		}
		opts = append(opts, glm.WithTLS(cfg))
	}
	client, err := glm.Dial(ctx, target, opts...)
	if err != nil {
		return err
	}
	defer client.Close()

	reply, err := client.ChatText(ctx, &glmv1.ChatRequest{
		Model:       model,
		Messages:    []*glmv1.ChatMessage{{Role: "user", Content: prompt}},
		Temperature: proto.Float32(0),
		MaxTokens:   proto.Int32(maxTokens),
	}, func(delta string) { fmt.Print(delta) })
	if err != nil {
		return err
	}
	u := reply.Usage
	fmt.Printf("\nfinish_reason: %s\n", reply.FinishReason)
	fmt.Printf("usage: prompt=%d completion=%d total=%d\n", u.GetPromptTokens(), u.GetCompletionTokens(), u.GetTotalTokens())

	embedded, err := client.Embed(ctx, "", []string{"first text", "second text"}, true)
	if err != nil {
		return err
	}
	a, b := embedded.GetData()[0].GetValues(), embedded.GetData()[1].GetValues()
	var cosine float32
	for i := range a {
		cosine += a[i] * b[i]
	}
	fmt.Printf("embed: %d vectors of %d floats (%s), cosine %.4f\n", len(embedded.GetData()), embedded.GetDimensions(), embedded.GetModel(), cosine)
	return nil
}
