"""Where the project keeps what setup installs: one place, so every model and script agrees."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"
TOOLS_DIR = REPO_ROOT / "tools"
CACHE_DIR = Path(os.environ.get("LLM_STACK_CACHE", REPO_ROOT / ".cache"))
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    """The converted (safetensors) weights and tokenizer of the default model."""
    override = os.environ.get("LLM_MODEL_DIR")
    return Path(override) if override else CACHE_DIR / "models" / DEFAULT_MODEL_NAME
