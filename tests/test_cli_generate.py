"""``tokred generate``: the CLI front of tokred.generate, on random-weight hf: specs (no tokenizer:
the prompt's UTF-8 bytes are the token ids)."""

from __future__ import annotations

import ast

import pytest
import torch

from tokred.tools.cli import main
from tokred.runtime.generate import generate
from tokred.tools.models import load_spec

SPEC = "hf:llama?vocab_size=101"
PROMPT = "abcabcab"


def _printed_ids(out: str) -> list[int]:
    line = next(line for line in out.splitlines() if line.startswith("token ids: "))
    return ast.literal_eval(line[len("token ids: "):])


@pytest.mark.parametrize("draft", ["none", "prompt_lookup"])
def test_generate_prints_the_tokens_and_stats(capsys, draft):
    assert main(["generate", "--model", SPEC, "--prompt", PROMPT, "--max-new-tokens", "6", "--draft", draft,
                 "--k", "3"]) == 0
    out = capsys.readouterr().out
    model = load_spec(SPEC + "&task=causal-lm").model
    ids = torch.tensor([[b % 101 for b in PROMPT.encode()]])
    expected = generate(model, ids, 6).sequences[0, ids.shape[1]:].tolist()
    assert _printed_ids(out) == expected
    assert "LlamaForCausalLM" in out
    for stat in ("new tokens", "target forwards", "acceptance rate", "tokens per target forward",
                 "time to first token", "tokens/s"):
        assert stat in out
    assert draft in out


def test_generate_cpu_linear_prints_plain_greedy_tokens(capsys):
    torch._dynamo.reset()
    assert main(["generate", "--model", SPEC, "--prompt", PROMPT, "--max-new-tokens", "6", "--draft",
                 "prompt_lookup", "--cpu-linear"]) == 0
    model = load_spec(SPEC + "&task=causal-lm").model
    ids = torch.tensor([[b % 101 for b in PROMPT.encode()]])
    assert _printed_ids(capsys.readouterr().out) == generate(model, ids, 6).sequences[0, ids.shape[1]:].tolist()
    torch._dynamo.reset()


def test_generate_sampling_is_seeded(capsys):
    argv = ["generate", "--model", SPEC, "--prompt", PROMPT, "--max-new-tokens", "5", "--draft", "prompt_lookup",
            "--sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    assert main(argv) == 0
    first = _printed_ids(capsys.readouterr().out)
    assert main(argv) == 0
    assert _printed_ids(capsys.readouterr().out) == first and len(first) == 5


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "'k' must be an int >= 1"),
    (["--top-p", "2"], "'top_p' must be in (0, 1]"),
    (["--draft", "early_exit", "--exit-layer", "7"], "'exit_layer' must be an int in [1, 1]"),
    (["--exit-layer", "1"], "'exit_layer' is only used with draft='early_exit'"),
])
def test_generate_bad_arguments_exit_2_with_the_message(capsys, argv, message):
    assert main(["generate", "--model", SPEC, "--prompt", PROMPT, *argv]) == 2
    assert message in capsys.readouterr().err


def test_generate_unknown_model(capsys):
    assert main(["generate", "--model", "gpt5", "--prompt", "x"]) == 2
    assert "--model 'gpt5'" in capsys.readouterr().err
