"""The service layer: glm.v1.GlmService, converting between protobuf and domain types."""
