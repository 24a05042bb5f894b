"""nvfm.llm: the real Qwen tokenizer rebuilt from shipped ranks, the tiny Qwen3, local-only loading."""
import base64
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nvfm import llm  # noqa: E402


TINY = dict(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64)  # shared with test_llava


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # built once per machine into the cache (build_tiny_qwen3 + atomic rename); NVFM_CACHE overrides
    return llm.tiny_qwen3_cached(**TINY)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return llm.load_llm(tiny_dir)


@functools.lru_cache(maxsize=1)
def _tiktoken_reference():
    import tiktoken
    ranks = {}
    with open(llm.qwen_ranks_file(), "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding("qwen", pat_str=llm.QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_known_qwen_ids(loaded):
    _, tok = loaded
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]  # published Qwen2/3 ids
    ids = tok.encode("<|endoftext|><|im_start|><|im_end|><|vision_start|><|image_pad|></think>", add_special_tokens=False)
    assert ids == [151643, 151644, 151645, 151652, 151655, 151668]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643


@pytest.mark.parametrize("text", [
    "Acute hyperdense left convexity subdural hematoma measuring up to 12 mm in thickness.",
    '["Mass effect with 5 mm rightward midline shift.", "x"]\n\n  trailing  ',
    "héllo naïve Ωmega 日本語テキスト 1234567 don't I'LL",
    "tabs\tand\r\nnewlines\n\n\nend", "   ", "",
])
def test_matches_tiktoken_on_the_same_ranks(loaded, text):
    _, tok = loaded
    ref = _tiktoken_reference()
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text)
    assert tok.decode(ref.encode(text)) == text


def test_chat_template_is_chatml(loaded):
    _, tok = loaded
    s = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_loads_through_from_pretrained(tiny_dir, loaded):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM
    model, tok = loaded
    assert isinstance(model, Qwen3ForCausalLM)
    assert model.config.vocab_size == llm.QWEN_VOCAB_SIZE and model.config.num_hidden_layers == 1
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    again = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    ids = torch.tensor([tok.encode("Hello world")])
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(tiny_dir, f))


def test_load_llm_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        llm.load_llm(str(tmp_path / "no-such-model"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="weights.bin"):
        llm.load_llm(str(tmp_path / "weights.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        llm.load_llm(str(tmp_path / "empty"))


def test_smollm2_gguf_ships_and_parses():
    """The offline pretrained LM: header read with gguf (fast); full load only with NVFM_SLOW_TESTS=1."""
    try:
        path = llm.smollm2_gguf_file()
    except RuntimeError as e:
        pytest.skip(str(e))
    from gguf import GGUFReader
    r = GGUFReader(path)
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert any(t.name == "token_embd.weight" for t in r.tensors)
    if os.environ.get("NVFM_SLOW_TESTS") != "1":
        return
    model, tok = llm.load_llm(path)
    assert model.config.hidden_size == 576
    out = model.generate(**tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                   add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True), max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_resolve_llm_names(tmp_path, monkeypatch):
    """"" -> the cached tiny Qwen3; "smollm2" -> the cached conversion (not rebuilt when present);
    any other value passes through to load_llm's checks."""
    monkeypatch.setenv("NVFM_CACHE", str(tmp_path))
    fake = tmp_path / "llm" / "smollm2-135m-instruct-q4_1"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    assert llm.resolve_llm("smollm2") == str(fake)
    assert llm.resolve_llm("/some/dir") == "/some/dir"
    tiny = tmp_path / "llm" / "tiny-qwen3-v1"
    tiny.mkdir()
    (tiny / "model.safetensors").write_bytes(b"")
    assert llm.resolve_llm("") == str(tiny)
