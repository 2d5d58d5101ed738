// Streams a chat reply, then embeds two texts, against a glm-api server.
//
//   java com.glm.example.ChatExample [--target HOST:PORT] [--api-key KEY] [--tls [--ca FILE]]
//                                    [--model ID] [--max-tokens N] PROMPT
//
// A failed call prints "error: CODE: message" on stderr and exits with 1.
package com.glm.example;

import com.glm.client.GlmException;
import com.glm.v1.ChatMessage;
import com.glm.v1.ChatRequest;
import com.glm.v1.ChatResponse;
import com.glm.v1.EmbedRequest;
import com.glm.v1.EmbedResponse;
import com.glm.v1.GlmServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.stub.MetadataUtils;
import java.io.File;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.TimeUnit;

public final class ChatExample {
  private ChatExample() {}

  public static void main(String[] argv) throws Exception {
    String target = "127.0.0.1:50051";
    String apiKey = "";
    boolean tls = false;
    String ca = "";
    String model = "";
    int maxTokens = 32;
    StringBuilder prompt = new StringBuilder();
    for (int i = 0; i < argv.length; i++) {
      switch (argv[i]) {
        case "--target" -> target = argv[++i];
        case "--api-key" -> apiKey = argv[++i];
        case "--tls" -> tls = true;
        case "--ca" -> ca = argv[++i];
        case "--model" -> model = argv[++i];
        case "--max-tokens" -> maxTokens = Integer.parseInt(argv[++i]);
        default -> prompt.append(prompt.length() > 0 ? " " : "").append(argv[i]);
      }
    }
    if (prompt.length() == 0) {
      prompt.append("What is the capital of France?");
    }

    NettyChannelBuilder builder = NettyChannelBuilder.forTarget(target);
    if (tls) {
      builder.sslContext(
          ca.isEmpty()
              ? GrpcSslContexts.forClient().build()
              : GrpcSslContexts.forClient().trustManager(new File(ca)).build());
    } else {
      builder.usePlaintext();
    }
    if (!apiKey.isEmpty()) {
      // Every call carries the API key as "authorization: Bearer KEY".
      Metadata headers = new Metadata();
      headers.put(
          Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + apiKey);
      builder.intercept(MetadataUtils.newAttachHeadersInterceptor(headers));
    }
    ManagedChannel channel = builder.build();
    int exit = 0;
    try {
      run(GlmServiceGrpc.newBlockingStub(channel), model, maxTokens, prompt.toString());
    } catch (StatusRuntimeException e) {
      GlmException error = GlmException.of(e);
      System.err.println("error: " + error.getCode().name() + ": " + error.getDescription());
      exit = 1;
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
    System.exit(exit);
  }

  private static void run(
      GlmServiceGrpc.GlmServiceBlockingStub stub, String model, int maxTokens, String prompt) {
    ChatRequest request =
        ChatRequest.newBuilder()
            .setModel(model)
            .addMessages(ChatMessage.newBuilder().setRole("user").setContent(prompt))
            .setTemperature(0)
            .setMaxTokens(maxTokens)
            .build();
    String finishReason = "";
    ChatResponse last = ChatResponse.getDefaultInstance();
    for (Iterator<ChatResponse> it = stub.chat(request); it.hasNext(); ) {
      last = it.next();
      for (var choice : last.getChoicesList()) {
        System.out.print(choice.getDelta().getContent());
        System.out.flush();
        if (!choice.getFinishReason().isEmpty()) {
          finishReason = choice.getFinishReason();
        }
      }
    }
    var usage = last.getUsage();
    System.out.printf(
        "%nfinish_reason: %s%nusage: prompt=%d completion=%d total=%d%n",
        finishReason,
        usage.getPromptTokens(),
        usage.getCompletionTokens(),
        usage.getTotalTokens());

    EmbedResponse embedded =
        stub.embed(
            EmbedRequest.newBuilder()
                .addAllPrompt(List.of("first text", "second text"))
                .setNormalize(true)
                .build());
    List<Float> a = embedded.getData(0).getValuesList();
    List<Float> b = embedded.getData(1).getValuesList();
    double cosine = 0;
    for (int i = 0; i < a.size(); i++) {
      cosine += a.get(i) * b.get(i);
    }
    System.out.printf(
        "embed: %d vectors of %d floats (%s), cosine %.4f%n",
        embedded.getDataCount(), embedded.getDimensions(), embedded.getModel(), cosine);
  }
}
