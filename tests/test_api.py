"""The public API: each package's __all__ is what we promise, and it resolves."""

import importlib

import pytest

EXPECTED = {
    "dsstream": {
        "__version__",
        "Client",
        "BlockingClient",
        "ServerError",
        "LocalSession",
        "Transcript",
        "transcribe",
        "AsrRuntime",
        "AsrPipeline",
        "AsrOptions",
        "VqaOptions",
        "EndpointOptions",
        "Hotword",
        "Started",
        "Partial",
        "Final",
        "Endpoint",
        "Answer",
        "Ended",
        "Error",
        "ErrorCode",
        "Word",
    },
    "dsstream.pipelines": {
        "ArtifactPipelineFactory",
        "Frame",
        "ModelUnavailable",
        "Pipeline",
        "PipelineError",
        "PipelineFactory",
        "PipelineRegistry",
        "SAMPLES_DIR",
        "default_registry",
    },
    "dsstream.pipelines.asr": {
        "AsrModelSpec",
        "AsrConfig",
        "AsrRuntime",
        "AsrPipeline",
        "StageTimes",
        "load",
    },
    "dsstream.pipelines.vqa": {"VqaConfig", "ImageKVCache", "VqaRuntime", "VqaPipeline", "load"},
    "dsstream.tokenizer": {"WordTokenizer", "PAD", "UNK"},
    "dsstream.vad": {"VadConfig", "SileroVad", "VadStream", "default_model_path"},
    "dsstream.endpoint": {"Endpointer"},
    "dsstream.local": {"LocalSession", "Transcript", "transcribe"},
    "dsstream.server": {"ServerConfig", "StreamServer", "run_server"},
    "dsstream.client": {"Client", "BlockingClient", "ServerError", "AudioSource"},
    "dsstream.decoding": {
        "CTCDecoder",
        "DecoderStream",
        "DecodeResult",
        "DecoderConfig",
        "WordInfo",
        "Vocabulary",
        "VocabularyError",
        "ENGLISH_CHARS",
        "KenLM",
        "LMError",
        "HotwordTrie",
        "greedy_decode",
    },
    "engine": {
        "convert",
        "Dim",
        "PRECISIONS",
        "ConversionError",
        "InferenceEngine",
        "InputError",
        "BackendError",
        "ArtifactError",
        "Manifest",
        "TensorSpec",
        "read_manifest",
        "run_passes",
        "DEFAULT_PASSES",
        "QueueFull",
        "DeadlineExceeded",
        "EngineFuture",
        "BatchInfo",
        "BatchPolicy",
        "BatchPlan",
        "QueuedRequest",
        "plan",
        "Pipeline",
        "ModelConverter",
        "EngineMonitor",
        "StateSpec",
        "StreamSession",
        "SessionError",
        "SessionPoolFull",
        "SessionClosed",
        "SessionEvicted",
    },
    "kernels": {
        "paged_attention",
        "paged_attention_ref",
        "chunk_attention",
        "chunk_attention_ref",
        "layernorm_linear",
        "layernorm_linear_ref",
        "int8_matmul",
        "int8_matmul_ref",
        "quantize_rows",
        "ctc_topk",
        "ctc_topk_ref",
        "conv3x3",
        "winograd_conv2d",
        "winograd_conv2d_ref",
        "load_extension",
    },
    "dsstream.lm": {
        "NGramModel",
        "build_lm",
        "build_arpa",
        "write_arpa",
        "read_corpus",
        "normalize_sentence",
        "normalize_corpus",
        "split_sentences",
    },
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_exact_and_resolves(module):
    mod = importlib.import_module(module)
    assert set(mod.__all__) == EXPECTED[module]
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"


@pytest.mark.parametrize(
    "module",
    [
        "dsstream.protocol",
        "dsstream.options",
        "dsstream.audio",
        "dsstream.media",
        "dsstream.local",
        "dsstream.metrics",
        "dsstream.logs",
        "dsstream.session",
        "dsstream.cli",
        "dsstream.evaluation",
        "dsstream.decoding.search",
        "dsstream.decoding.hotwords",
        "dsstream.decoding.lm",
        "dsstream.decoding.vocab",
        "dsstream.lm.builder",
        "dsstream.lm.normalize",
        "engine.artifact",
        "engine.backends",
        "engine.batching",
        "engine.convert",
        "engine.engine",
        "engine.passes",
        "engine.stats",
        "engine.seed",
        "engine.pipeline",
        "engine.sessions",
        "engine.kv_cache",
        "kernels.paged_attention",
        "kernels.chunk_attention",
        "kernels.layernorm_linear",
        "kernels.int8_matmul",
        "kernels.ctc_topk",
        "kernels.winograd",
        "kernels.build",
        "kernels._build",
        "kernels._dispatch",
        "dsstream.frontend",
        "apps.asr.model",
        "apps.asr.export",
        "apps.asr.evaluate",
    ],
)
def test_every_module_declares_a_resolvable_all(module):
    mod = importlib.import_module(module)
    assert mod.__all__, module
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"


def test_importing_dsstream_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, dsstream, dsstream.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
