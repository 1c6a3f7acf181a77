"""Model configs: they parse, match TensorRT-LLM's tensor contract, and the ensemble is wired.

No server needed. The contract tables below are TensorRT-LLM's inflight_batcher_llm
preprocessing / postprocessing / ensemble / tensorrt_llm configs (multimodal tensors left
out), so a drift from the contract fails here rather than in a client.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from python_backends.paths import REPO_ROOT
from python_backends.triton_glue import config_parameters

MODEL_REPOSITORY = REPO_ROOT / "model_repository"
DEPLOY = REPO_ROOT / "deploy"
PYTHON_ENGINE = MODEL_REPOSITORY / "engine" / "config.pbtxt"
TRTLLM_ENGINE = DEPLOY / "tensorrt_llm" / "engine" / "config.pbtxt"
ENSEMBLE_BATCH = 64

# name -> (data type, dims, optional)
Spec = dict[str, tuple[str, list[int], bool]]

PREPROCESSING_INPUTS: Spec = {
    "QUERY": ("TYPE_STRING", [1], False),
    "DECODER_QUERY": ("TYPE_STRING", [1], True),
    "REQUEST_OUTPUT_LEN": ("TYPE_INT32", [1], False),
    "BAD_WORDS_DICT": ("TYPE_STRING", [-1], True),
    "STOP_WORDS_DICT": ("TYPE_STRING", [-1], True),
    "EMBEDDING_BIAS_WORDS": ("TYPE_STRING", [-1], True),
    "EMBEDDING_BIAS_WEIGHTS": ("TYPE_FP32", [-1], True),
    "END_ID": ("TYPE_INT32", [1], True),
    "PAD_ID": ("TYPE_INT32", [1], True),
    "PROMPT_TABLE_EXTRA_ID": ("TYPE_UINT64", [1], True),
}
PREPROCESSING_OUTPUTS: Spec = {
    "INPUT_ID": ("TYPE_INT32", [-1], False),
    "REQUEST_INPUT_LEN": ("TYPE_INT32", [1], False),
    "DECODER_INPUT_ID": ("TYPE_INT32", [-1], False),
    "REQUEST_DECODER_INPUT_LEN": ("TYPE_INT32", [1], False),
    "BAD_WORDS_IDS": ("TYPE_INT32", [2, -1], False),
    "STOP_WORDS_IDS": ("TYPE_INT32", [2, -1], False),
    "EMBEDDING_BIAS": ("TYPE_FP32", [-1], False),
    "REQUEST_OUTPUT_LEN": ("TYPE_INT32", [-1], False),
    "OUT_END_ID": ("TYPE_INT32", [1], False),
    "OUT_PAD_ID": ("TYPE_INT32", [1], False),
    "OUT_PROMPT_TABLE_EXTRA_IDS": ("TYPE_UINT64", [-1], False),
}
POSTPROCESSING_INPUTS: Spec = {
    "TOKENS_BATCH": ("TYPE_INT32", [-1, -1], False),
    "SEQUENCE_LENGTH": ("TYPE_INT32", [-1], False),
}
POSTPROCESSING_OUTPUTS: Spec = {"OUTPUT": ("TYPE_STRING", [-1], False)}

_FLAG = ("TYPE_BOOL", [1], True)
ENSEMBLE_INPUTS: Spec = {
    "text_input": ("TYPE_STRING", [1], False),
    "decoder_text_input": ("TYPE_STRING", [1], True),
    "max_tokens": ("TYPE_INT32", [1], False),
    "num_return_sequences": ("TYPE_INT32", [1], True),
    "bad_words": ("TYPE_STRING", [-1], True),
    "stop_words": ("TYPE_STRING", [-1], True),
    "exclude_input_in_output": _FLAG,
    "end_id": ("TYPE_INT32", [1], True),
    "pad_id": ("TYPE_INT32", [1], True),
    "top_k": ("TYPE_INT32", [1], True),
    "top_p": ("TYPE_FP32", [1], True),
    "temperature": ("TYPE_FP32", [1], True),
    "length_penalty": ("TYPE_FP32", [1], True),
    "repetition_penalty": ("TYPE_FP32", [1], True),
    "min_tokens": ("TYPE_INT32", [1], True),
    "presence_penalty": ("TYPE_FP32", [1], True),
    "frequency_penalty": ("TYPE_FP32", [1], True),
    "seed": ("TYPE_UINT64", [1], True),
    "return_log_probs": _FLAG,
    "return_context_logits": _FLAG,
    "return_generation_logits": _FLAG,
    "return_perf_metrics": _FLAG,
    "return_num_input_tokens": _FLAG,
    "return_num_output_tokens": _FLAG,
    "beam_width": ("TYPE_INT32", [1], True),
    "stream": _FLAG,
    "prompt_embedding_table": ("TYPE_FP16", [-1, -1], True),
    "prompt_table_extra_id": ("TYPE_UINT64", [1], True),
    "prompt_vocab_size": ("TYPE_INT32", [1], True),
    "embedding_bias_words": ("TYPE_STRING", [-1], True),
    "embedding_bias_weights": ("TYPE_FP32", [-1], True),
    "lora_task_id": ("TYPE_UINT64", [1], True),
    "lora_weights": ("TYPE_FP16", [-1, -1], True),
    "lora_config": ("TYPE_INT32", [-1, 3], True),
    "guided_decoding_guide_type": ("TYPE_STRING", [1], True),
    "guided_decoding_guide": ("TYPE_STRING", [1], True),
}
# Ours, not upstream: the pre-May-2025 name of min_tokens, still sent by GenAI-Perf.
ENSEMBLE_EXTRA_INPUTS: Spec = {
    "min_length": ("TYPE_INT32", [1], True),
    "priority": ("TYPE_INT32", [1], True),
}

# The tensorrt_llm model's outputs (logits as TYPE_FP32, the documented default).
ENGINE_OUTPUTS: Spec = {
    "output_ids": ("TYPE_INT32", [-1, -1], False),
    "sequence_length": ("TYPE_INT32", [-1], False),
    "cum_log_probs": ("TYPE_FP32", [-1], False),
    "output_log_probs": ("TYPE_FP32", [-1, -1], False),
    "context_logits": ("TYPE_FP32", [-1, -1], False),
    "generation_logits": ("TYPE_FP32", [-1, -1, -1], False),
    "batch_index": ("TYPE_INT32", [1], False),
    "sequence_index": ("TYPE_INT32", [1], False),
    "context_phase_params": ("TYPE_UINT8", [-1], False),
    "kv_cache_alloc_new_blocks": ("TYPE_INT32", [1], False),
    "kv_cache_reused_blocks": ("TYPE_INT32", [1], False),
    "kv_cache_alloc_total_blocks": ("TYPE_INT32", [1], False),
    "arrival_time_ns": ("TYPE_INT64", [1], False),
    "first_scheduled_time_ns": ("TYPE_INT64", [1], False),
    "first_token_time_ns": ("TYPE_INT64", [1], False),
    "last_token_time_ns": ("TYPE_INT64", [1], False),
    "acceptance_rate": ("TYPE_FP32", [1], False),
    "total_accepted_draft_tokens": ("TYPE_INT32", [1], False),
    "total_draft_tokens": ("TYPE_INT32", [1], False),
    "num_input_tokens": ("TYPE_INT32", [1], False),
    "num_output_tokens": ("TYPE_INT32", [1], False),
}
# Upstream ensemble outputs: text_output plus the engine's, except these three.
ENSEMBLE_OUTPUTS: Spec = {"text_output": ("TYPE_STRING", [-1], False)} | {
    name: spec
    for name, spec in ENGINE_OUTPUTS.items()
    if name not in {"output_ids", "sequence_length", "context_phase_params"}
}

# The tensorrt_llm model's inputs, all but input_lengths and request_output_len optional.
_SCALAR_I32, _SCALAR_F32 = ("TYPE_INT32", [1], True), ("TYPE_FP32", [1], True)
TRTLLM_INPUTS: Spec = {
    "input_ids": ("TYPE_INT32", [-1], True),
    "encoder_input_features": ("TYPE_FP16", [-1, -1], True),
    "encoder_output_lengths": _SCALAR_I32,
    "input_lengths": ("TYPE_INT32", [1], False),
    "request_output_len": ("TYPE_INT32", [1], False),
    "num_return_sequences": _SCALAR_I32,
    "draft_input_ids": ("TYPE_INT32", [-1], True),
    "decoder_input_ids": ("TYPE_INT32", [-1], True),
    "decoder_input_lengths": _SCALAR_I32,
    "draft_logits": ("TYPE_FP32", [-1, -1], True),
    "draft_acceptance_threshold": _SCALAR_F32,
    "end_id": _SCALAR_I32,
    "pad_id": _SCALAR_I32,
    "stop_words_list": ("TYPE_INT32", [2, -1], True),
    "bad_words_list": ("TYPE_INT32", [2, -1], True),
    "embedding_bias": ("TYPE_FP32", [-1], True),
    "beam_width": _SCALAR_I32,
    "temperature": _SCALAR_F32,
    "runtime_top_k": _SCALAR_I32,
    "runtime_top_p": _SCALAR_F32,
    "runtime_top_p_min": _SCALAR_F32,
    "runtime_top_p_decay": _SCALAR_F32,
    "runtime_top_p_reset_ids": _SCALAR_I32,
    "len_penalty": _SCALAR_F32,
    "early_stopping": _FLAG,
    "repetition_penalty": _SCALAR_F32,
    "min_tokens": _SCALAR_I32,
    "beam_search_diversity_rate": _SCALAR_F32,
    "presence_penalty": _SCALAR_F32,
    "frequency_penalty": _SCALAR_F32,
    "seed": ("TYPE_UINT64", [1], True),
    "return_log_probs": _FLAG,
    "return_context_logits": _FLAG,
    "return_generation_logits": _FLAG,
    "return_perf_metrics": _FLAG,
    "return_num_input_tokens": _FLAG,
    "return_num_output_tokens": _FLAG,
    "exclude_input_in_output": _FLAG,
    "stop": _FLAG,
    "streaming": _FLAG,
    "prompt_embedding_table": ("TYPE_FP16", [-1, -1], True),
    "prompt_table_extra_ids": ("TYPE_UINT64", [-1], True),
    "prompt_vocab_size": _SCALAR_I32,
    "cross_attention_mask": ("TYPE_BOOL", [-1, -1], True),
    "mrope_rotary_cos_sin": ("TYPE_FP32", [-1], True),
    "mrope_position_deltas": ("TYPE_INT64", [1], True),
    "lora_task_id": ("TYPE_UINT64", [1], True),
    "lora_weights": ("TYPE_FP16", [-1, -1], True),
    "lora_config": ("TYPE_INT32", [-1, 3], True),
    "context_phase_params": ("TYPE_UINT8", [-1], True),
    "skip_cross_attn_blocks": _FLAG,
    "retention_token_range_starts": ("TYPE_INT32", [-1], True),
    "retention_token_range_ends": ("TYPE_INT32", [-1], True),
    "retention_token_range_priorities": ("TYPE_INT32", [-1], True),
    "retention_token_range_durations_ms": ("TYPE_INT32", [-1], True),
    "retention_decode_priority": _SCALAR_I32,
    "retention_decode_duration_ms": _SCALAR_I32,
    "guided_decoding_guide_type": ("TYPE_STRING", [1], True),
    "guided_decoding_guide": ("TYPE_STRING", [1], True),
    "lookahead_window_size": _SCALAR_I32,
    "lookahead_ngram_size": _SCALAR_I32,
    "lookahead_verification_set_size": _SCALAR_I32,
}


def all_config_paths() -> list[Path]:
    return sorted(MODEL_REPOSITORY.glob("*/config.pbtxt")) + sorted(DEPLOY.rglob("config.pbtxt"))


def load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def spec_of(tensors) -> Spec:
    # Outputs have no `optional` field; they count as not optional.
    return {
        t.name: (dtype(t.data_type), list(t.dims), bool(getattr(t, "optional", False)))
        for t in tensors
    }


def dims_compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def engine_config(path: Path) -> model_config_pb2.ModelConfig:
    if not path.exists():
        pytest.skip(f"{path.relative_to(REPO_ROOT)} does not exist yet (written separately)")
    return load(path)


ENGINE_PATHS = pytest.mark.parametrize(
    "engine_path", [PYTHON_ENGINE, TRTLLM_ENGINE], ids=["python-engine", "tensorrt_llm-engine"]
)


# --- every config parses ------------------------------------------------------------------


def test_configs_exist() -> None:
    names = {p.parent.name for p in all_config_paths()}
    assert {"preprocessing", "postprocessing", "ensemble"} <= names
    assert TRTLLM_ENGINE in all_config_paths()


@pytest.mark.parametrize("path", all_config_paths(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_config_parses(path: Path) -> None:
    config = load(path)
    assert config.name == path.parent.name, "the model name must match its folder"
    for kind, tensors in (("input", config.input), ("output", config.output)):
        names = [t.name for t in tensors]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        assert not duplicates, f"{path}: duplicate {kind} names {duplicates}"
    # Triton needs a version folder even for an ensemble.
    assert (path.parent / "1").is_dir(), f"{path.parent} has no version folder 1/"
    # What the models and serve read without protobuf (config_parameters) is what Triton
    # reads.
    expected = {key: value.string_value for key, value in config.parameters.items()}
    assert config_parameters(path) == expected


# --- the upstream contract ----------------------------------------------------------------


def test_preprocessing_contract() -> None:
    config = load(MODEL_REPOSITORY / "preprocessing" / "config.pbtxt")
    assert config.backend == "python"
    assert config.max_batch_size == ENSEMBLE_BATCH
    assert spec_of(config.input) == PREPROCESSING_INPUTS
    assert spec_of(config.output) == PREPROCESSING_OUTPUTS
    assert set(config.parameters) >= {"tokenizer_dir", "add_special_tokens"}


def test_postprocessing_contract() -> None:
    config = load(MODEL_REPOSITORY / "postprocessing" / "config.pbtxt")
    assert config.backend == "python"
    assert config.max_batch_size == ENSEMBLE_BATCH
    assert spec_of(config.input) == POSTPROCESSING_INPUTS
    assert spec_of(config.output) == POSTPROCESSING_OUTPUTS
    assert set(config.parameters) >= {"tokenizer_dir", "skip_special_tokens"}


def test_ensemble_contract() -> None:
    config = load(MODEL_REPOSITORY / "ensemble" / "config.pbtxt")
    assert config.platform == "ensemble"
    assert config.max_batch_size == ENSEMBLE_BATCH
    assert spec_of(config.input) == ENSEMBLE_INPUTS | ENSEMBLE_EXTRA_INPUTS
    assert spec_of(config.output) == ENSEMBLE_OUTPUTS
    steps = [step.model_name for step in config.ensemble_scheduling.step]
    assert steps == ["preprocessing", "engine", "postprocessing"]


def test_trtllm_engine_contract() -> None:
    """The deploy profile is upstream's tensorrt_llm config (plus min_length and priority)."""
    config = load(TRTLLM_ENGINE)
    assert config.backend == "tensorrtllm"
    assert config.max_batch_size == ENSEMBLE_BATCH
    assert config.model_transaction_policy.decoupled
    assert spec_of(config.input) == TRTLLM_INPUTS | ENSEMBLE_EXTRA_INPUTS
    assert spec_of(config.output) == ENGINE_OUTPUTS
    scalars = {n for n, (_, dims, _) in TRTLLM_INPUTS.items() if dims == [1]}
    reshaped = {t.name for t in config.input if t.HasField("reshape")}
    assert reshaped <= scalars | set(ENSEMBLE_EXTRA_INPUTS)
    assert config.parameters["gpt_model_path"].string_value
    assert not any(p.string_value.startswith("${") for p in config.parameters.values())


# --- the ensemble wiring ------------------------------------------------------------------


def step_configs(engine_path: Path) -> dict[str, model_config_pb2.ModelConfig]:
    return {
        "preprocessing": load(MODEL_REPOSITORY / "preprocessing" / "config.pbtxt"),
        "engine": engine_config(engine_path),
        "postprocessing": load(MODEL_REPOSITORY / "postprocessing" / "config.pbtxt"),
    }


@ENGINE_PATHS
def test_ensemble_wiring(engine_path: Path) -> None:
    """What Triton checks when it loads the ensemble, plus: nothing declared goes unused."""
    ensemble = load(MODEL_REPOSITORY / "ensemble" / "config.pbtxt")
    models = step_configs(engine_path)
    ens_inputs = {t.name: t for t in ensemble.input}
    ens_outputs = {t.name: t for t in ensemble.output}
    produced: dict[str, tuple[str, object]] = {}  # tensor -> (model, its output config)
    consumed: set[str] = set()
    problems: list[str] = []

    for step in ensemble.ensemble_scheduling.step:
        model = models[step.model_name]
        where = f"step {step.model_name} ({engine_path.relative_to(REPO_ROOT)})"
        if model.max_batch_size < ensemble.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} < ensemble's")
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for key, value in step.input_map.items():
            consumed.add(value)
            if key not in inputs:
                problems.append(f"{where}: input_map key {key!r} is not an input of the model")
                continue
            target = inputs[key]
            if value in ens_inputs:
                source = ens_inputs[value]
                if source.optional and not target.optional:
                    problems.append(f"{where}: optional {value!r} feeds required input {key!r}")
            elif value in produced:
                source = produced[value][1]
            else:
                problems.append(f"{where}: {value!r} is neither an ensemble input nor produced")
                continue
            if source.data_type != target.data_type:
                problems.append(
                    f"{where}: {value!r} is {dtype(source.data_type)} but {key!r} wants "
                    f"{dtype(target.data_type)}"
                )
            if not dims_compatible(list(source.dims), list(target.dims)):
                problems.append(
                    f"{where}: {value!r} dims {list(source.dims)} vs {key!r} {list(target.dims)}"
                )
        required = {name for name, t in inputs.items() if not t.optional}
        missing = required - set(step.input_map)
        if missing:
            problems.append(f"{where}: required inputs not fed: {sorted(missing)}")
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: output_map key {key!r} is not an output of the model")
                continue
            if value in produced:
                problems.append(f"{where}: {value!r} is produced twice")
            produced[value] = (step.model_name, outputs[key])

    for name, out in ens_outputs.items():
        if name not in produced:
            problems.append(f"ensemble output {name!r} is produced by no step")
            continue
        source = produced[name][1]
        if source.data_type != out.data_type or not dims_compatible(
            list(source.dims), list(out.dims)
        ):
            problems.append(f"ensemble output {name!r} does not match its producer's type/dims")
    unused_inputs = set(ens_inputs) - consumed
    if unused_inputs:
        problems.append(f"ensemble inputs consumed by no step: {sorted(unused_inputs)}")
    dangling = {n for n in produced if n not in consumed and n not in ens_outputs}
    if dangling:
        problems.append(f"tensors produced but never used: {sorted(dangling)}")
    assert not problems, "\n".join(problems)


@ENGINE_PATHS
def test_engine_streams(engine_path: Path) -> None:
    """The ensemble's `stream` input only works when the engine step is decoupled."""
    config = engine_config(engine_path)
    assert config.name == "engine"
    assert config.model_transaction_policy.decoupled


def test_python_models_present() -> None:
    for name in ("preprocessing", "postprocessing"):
        assert (MODEL_REPOSITORY / name / "1" / "model.py").is_file()


def test_llm_in_process_engine_takes_the_engine_config_and_its_own_overrides(tmp_path: Path):
    from python_backends.triton_glue import hosts_engine, in_process_engine_parameters

    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "config.pbtxt").write_text(
        (MODEL_REPOSITORY / "engine" / "config.pbtxt").read_text())
    llm = {"engine_model": "", "engine_config": "engine", "max_num_seqs": "8",
           "kv_cache_bytes": ""}
    merged = in_process_engine_parameters(tmp_path / "llm", llm)
    engine = config_parameters(MODEL_REPOSITORY / "engine" / "config.pbtxt")
    assert merged["max_num_seqs"] == "8"  # llm's own value wins
    assert merged["kv_cache_bytes"] == engine["kv_cache_bytes"]  # empty: the engine's
    assert in_process_engine_parameters(tmp_path / "llm", {"engine_config": "none"}) == {
        "engine_config": "none"}  # no such model: llm's own parameters only
    # Which models run an engine in their own process: serve sizes GPU memory by this.
    shipped = {name: hosts_engine(config_parameters(MODEL_REPOSITORY / name / "config.pbtxt"))
               for name in ("engine", "llm", "preprocessing", "postprocessing", "ensemble")}
    assert shipped == {"engine": True, "llm": True, "preprocessing": False,
                       "postprocessing": False, "ensemble": False}
    assert not hosts_engine({**llm, "engine_model": "engine"})  # BLS mode
