"""The JSON dialects served through Envoy: the legacy routes and OpenAI's, parsed and rendered here.

Each dialect turns a JSON body into the typed glm.v1 request and the typed responses back into the
bytes its clients expect; the generation itself is GlmService's one pipeline.
"""
