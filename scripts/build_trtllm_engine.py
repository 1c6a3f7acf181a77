#!/usr/bin/env python3
"""Build a TensorRT-LLM engine from a Hugging Face Llama checkpoint, for deploy/tensorrt_llm.

Two steps, both TensorRT-LLM's own tools:
  1. convert the Hugging Face weights into a TensorRT-LLM checkpoint
     (tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face + save_checkpoint, what
     examples/models/core/llama/convert_checkpoint.py does);
  2. compile it with `trtllm-build` into an engine folder.
It then prints the commands that put the engine behind this project's `engine` model.

Needs a machine with an NVIDIA GPU and the `tensorrt_llm` package (for example inside
NVIDIA's tritonserver:<yy.mm>-trtllm-python-py3 container, whose TensorRT-LLM version matches
its Triton backend: an engine only loads in the version that built it). Without the package
the script exits with code 2; --dry-run prints the plan without needing it.

Build limits must cover the serving config: --max-batch-size at least the config's
max_batch_size (64), and --max-input-len / --max-seq-len at least the longest prompt and
prompt+output you will serve.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from python_backends.paths import default_model_dir  # noqa: E402

DEFAULT_ENGINE_DIR = Path("/engines/smollm2")
EXIT_NO_TENSORRT_LLM = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; see --help."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-model-dir",
        type=Path,
        default=default_model_dir(),
        help="Hugging Face checkpoint (config.json + safetensors + tokenizer) "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_ENGINE_DIR,
        help="engine folder to write; deploy/tensorrt_llm/engine/config.pbtxt points its "
        "gpt_model_path here (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where to keep the intermediate TensorRT-LLM checkpoint "
        "(default: <output-dir>-checkpoint)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="weight and activation precision (default: %(default)s)",
    )
    parser.add_argument(
        "--tp-size", type=int, default=1, help="tensor-parallel GPUs (default: %(default)s)"
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="requests scheduled at once; >= the config's max_batch_size (default: %(default)s)",
    )
    parser.add_argument(
        "--max-input-len", type=int, default=4096, help="longest prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=8192,
        help="longest prompt + output (default: %(default)s; SmolLM2 has 8192 positions)",
    )
    parser.add_argument(
        "--max-num-tokens",
        type=int,
        default=8192,
        help="tokens per engine step across the batch (default: %(default)s)",
    )
    parser.add_argument(
        "--gather-logits",
        action="store_true",
        help="build with context and generation logits, needed for the return_context_logits "
        "/ return_generation_logits inputs (costs memory)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the steps and the swap commands without running anything",
    )
    return parser.parse_args(argv)


def build_command(args: argparse.Namespace, checkpoint_dir: Path) -> list[str]:
    """The `trtllm-build` command line for these arguments."""
    command = [
        "trtllm-build",
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(args.output_dir),
        "--gemm_plugin", "auto",
        "--max_batch_size", str(args.max_batch_size),
        "--max_input_len", str(args.max_input_len),
        "--max_seq_len", str(args.max_seq_len),
        "--max_num_tokens", str(args.max_num_tokens),
        # The serving config enables KV-cache reuse, which needs paged context attention.
        "--use_paged_context_fmha", "enable",
    ]  # fmt: skip
    if args.gather_logits:
        command.append("--gather_all_token_logits")
    return command


def legacy_config_view(hf_model_dir: Path, scratch: Path) -> Path:
    """`hf_model_dir`, readable by the transformers 4.x that TensorRT-LLM ships with.

    transformers 5 saves `rope_parameters` and `dtype` where 4.x reads `rope_theta` and
    `torch_dtype`; a 4.x reader silently falls back to rope_theta 10000, and the engine
    then generates garbage. When those keys are missing, return a folder of symlinks to
    the checkpoint with a patched config.json; otherwise the folder itself.
    """
    config = json.loads((hf_model_dir / "config.json").read_text())
    patched = dict(config)
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in config and rope_theta is not None:
        patched["rope_theta"] = rope_theta
    if "torch_dtype" not in config and "dtype" in config:
        patched["torch_dtype"] = config["dtype"]
    if patched == config:
        return hf_model_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for item in hf_model_dir.iterdir():
        link = scratch / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item.resolve())
    (scratch / "config.json").write_text(json.dumps(patched, indent=2))
    print(f"note: config.json written by transformers 5; using a 4.x-compatible view {scratch}")
    return scratch


def convert_checkpoint(args: argparse.Namespace, checkpoint_dir: Path) -> None:
    """Write the TensorRT-LLM checkpoint (one shard per tensor-parallel rank)."""
    # Imported here: importing tensorrt_llm initialises CUDA and MPI.
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import LLaMAForCausalLM

    hf_dir = legacy_config_view(
        args.hf_model_dir, checkpoint_dir.with_name(checkpoint_dir.name + "-hf-view")
    )
    for rank in range(args.tp_size):
        mapping = Mapping(world_size=args.tp_size, rank=rank, tp_size=args.tp_size)
        model = LLaMAForCausalLM.from_hugging_face(str(hf_dir), args.dtype, mapping=mapping)
        model.save_checkpoint(str(checkpoint_dir), save_config=(rank == 0))
        del model


def swap_commands(engine_dir: Path) -> str:
    """Shell commands that put this engine behind model_repository/engine."""
    target = (REPO_ROOT / "model_repository" / "engine").relative_to(REPO_ROOT)
    source = (REPO_ROOT / "deploy" / "tensorrt_llm" / "engine").relative_to(REPO_ROOT)
    # Replace rather than copy over: a leftover Python model.py would be confusing (the
    # tensorrtllm backend ignores it). The Python engine comes back with `git checkout`.
    lines = [f"cd {REPO_ROOT}", f"rm -rf {target}", f"cp -r {source} {target}"]
    if engine_dir != DEFAULT_ENGINE_DIR:
        lines.append(f"sed -i 's|{DEFAULT_ENGINE_DIR}|{engine_dir}|' {target / 'config.pbtxt'}")
    lines.append(f"# back to the Python engine: rm -rf {target} && git checkout -- {target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Convert, build, print the swap commands; the exit code says how it went."""
    args = parse_args(argv)
    checkpoint_dir = args.checkpoint_dir or args.output_dir.with_name(
        args.output_dir.name + "-checkpoint"
    )
    build = build_command(args, checkpoint_dir)
    if args.dry_run:
        print(
            f"1. convert {args.hf_model_dir} -> {checkpoint_dir} "
            f"(LLaMAForCausalLM.from_hugging_face, dtype {args.dtype}, tp {args.tp_size})"
        )
        print(f"2. {shlex.join(build)}")
        print(f"3. swap the engine in:\n{swap_commands(args.output_dir.resolve())}")
        return 0

    if importlib.util.find_spec("tensorrt_llm") is None:
        print(
            "error: the `tensorrt_llm` package is not installed. Building an engine needs an "
            "NVIDIA GPU and TensorRT-LLM (pip install tensorrt-llm, or run inside NVIDIA's "
            "tritonserver:<yy.mm>-trtllm-python-py3 container). See deploy/tensorrt_llm/"
            "README.md. Use --dry-run to print the steps.",
            file=sys.stderr,
        )
        return EXIT_NO_TENSORRT_LLM
    if not (args.hf_model_dir / "config.json").exists():
        print(f"error: {args.hf_model_dir} holds no Hugging Face config.json", file=sys.stderr)
        return 1
    if shutil.which("trtllm-build") is None:
        print("error: `trtllm-build` is not on PATH (it ships with tensorrt_llm)", file=sys.stderr)
        return EXIT_NO_TENSORRT_LLM

    print(f"converting {args.hf_model_dir} -> {checkpoint_dir}", flush=True)
    convert_checkpoint(args, checkpoint_dir)
    print(f"building: {shlex.join(build)}", flush=True)
    subprocess.run(build, check=True)
    print(f"\nengine written to {args.output_dir}. Swap it in with:")
    print(swap_commands(args.output_dir.resolve()))
    print(
        "then start Triton on model_repository/ as usual (the tensorrtllm backend must be "
        "installed in its backend directory)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
