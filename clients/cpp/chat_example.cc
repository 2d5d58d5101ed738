// Streams a chat reply, then embeds two texts, against a glm-api server.
//
//   chat_example [--target HOST:PORT] [--api-key KEY] [--tls [--ca FILE]] [--model ID]
//                [--max-tokens N] PROMPT
//
// A failed call prints "error: CODE: message" on stderr and exits with 1.
#include <grpcpp/grpcpp.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include "glm/v1/glm_service.grpc.pb.h"
#include "glm_error.h"

namespace {

struct Args {
  std::string target = "127.0.0.1:50051";
  std::string api_key;
  bool tls = false;
  std::string ca;
  std::string model;
  int max_tokens = 32;
  std::string prompt;
};

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::cerr << "missing value after " << arg << "\n";
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--target") {
      args.target = value();
    } else if (arg == "--api-key") {
      args.api_key = value();
    } else if (arg == "--tls") {
      args.tls = true;
    } else if (arg == "--ca") {
      args.ca = value();
    } else if (arg == "--model") {
      args.model = value();
    } else if (arg == "--max-tokens") {
      args.max_tokens = std::stoi(value());
    } else {
      args.prompt += (args.prompt.empty() ? "" : " ") + arg;
    }
  }
  if (args.prompt.empty()) args.prompt = "What is the capital of France?";
  return args;
}

int Fail(const grpc::Status& status) {
  const glm::CallError error = glm::ErrorOf(status);
  std::cerr << "error: " << glm::CodeName(error.code) << ": " << error.message << "\n";
  return 1;
}

std::shared_ptr<grpc::ChannelCredentials> Credentials(const Args& args) {
  if (!args.tls) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  if (!args.ca.empty()) {
    std::ifstream file(args.ca);
    std::stringstream pem;
    pem << file.rdbuf();
    options.pem_root_certs = pem.str();
  }
  return grpc::SslCredentials(options);
}

// Every call carries the API key, when one is given, as "authorization: Bearer KEY".
void Prepare(grpc::ClientContext& context, const Args& args) {
  if (!args.api_key.empty()) context.AddMetadata("authorization", "Bearer " + args.api_key);
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = ParseArgs(argc, argv);
  auto stub = glm::v1::GlmService::NewStub(grpc::CreateChannel(args.target, Credentials(args)));

  glm::v1::ChatRequest chat;
  chat.set_model(args.model);
  chat.set_temperature(0);
  chat.set_max_tokens(args.max_tokens);
  auto* message = chat.add_messages();
  message->set_role("user");
  message->set_content(args.prompt);

  grpc::ClientContext chat_context;
  Prepare(chat_context, args);
  auto reader = stub->Chat(&chat_context, chat);
  glm::v1::ChatResponse chunk;
  std::string finish_reason;
  glm::v1::Usage usage;
  while (reader->Read(&chunk)) {
    for (const auto& choice : chunk.choices()) {
      std::cout << choice.delta().content() << std::flush;
      if (!choice.finish_reason().empty()) finish_reason = choice.finish_reason();
    }
    if (chunk.has_usage()) usage = chunk.usage();
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) return Fail(status);
  std::cout << "\nfinish_reason: " << finish_reason << "\n"
            << "usage: prompt=" << usage.prompt_tokens()
            << " completion=" << usage.completion_tokens() << " total=" << usage.total_tokens()
            << "\n";

  glm::v1::EmbedRequest embed;
  embed.add_prompt("first text");
  embed.add_prompt("second text");
  embed.set_normalize(true);
  glm::v1::EmbedResponse embedded;
  grpc::ClientContext embed_context;
  Prepare(embed_context, args);
  status = stub->Embed(&embed_context, embed, &embedded);
  if (!status.ok()) return Fail(status);
  const auto& a = embedded.data(0).values();
  const auto& b = embedded.data(1).values();
  float cosine = 0;
  for (int i = 0; i < a.size(); ++i) cosine += a[i] * b[i];
  std::printf("embed: %d vectors of %d floats (%s), cosine %.4f\n", embedded.data_size(),
              embedded.dimensions(), embedded.model().c_str(), cosine);
  return 0;
}
