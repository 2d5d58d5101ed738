"""ChatGLM3 (THUDM's chatglm3-6b family) without its remote code.

`model.py` serves it as a ChatModel; `weights.py` maps a checkpoint onto transformers'
GlmForCausalLM; `tokenizer.py` and `prompt.py` implement its SentencePiece tokenizer and prompt
format; `tools.py` parses its tool calls without eval.
"""
