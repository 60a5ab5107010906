"""Bad tokred options are rejected with a ValueError that names the option, on every way in.

torch.compile calls a backend only at the first call of the compiled model, and Dynamo wraps what
the backend raises in ``BackendCompilerFailed`` (a RuntimeError) whose message quotes the original
error; the original ValueError is kept as ``inner_exception``. The tests accept either a direct
ValueError or that wrapper, and require the option's name in what the user reads in both cases.
"""

import pytest
import torch

import tokred
from tokred import parse_options

# (bad options, the name the error must mention)
BAD_OPTIONS = [
    ({"bogus": 1}, "bogus"),
    ({"inner": "foo"}, "inner"),
    ({"strict": "yes"}, "strict"),
    ({"verify": 1}, "verify"),
    ({"inner": "eager", "strict": None}, "strict"),
    ({"merge": {"r": -1}}, "merge.r"),
    ({"merge": {"bogus": 1}}, "merge.bogus"),
]
BAD_IDS = ["unknown-key", "inner-foo", "strict-str", "verify-int", "strict-none", "merge-r", "merge-key"]

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class TwoLayer(torch.nn.Module):
    """x [B, 8] -> [B, 8]."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _named_value_error(error: BaseException, name: str) -> None:
    """Assert ``error`` is, or wraps, a ValueError, and that the user-facing text names ``name``."""
    original = error if isinstance(error, ValueError) else getattr(error, "inner_exception", None)
    assert isinstance(original, ValueError), f"expected a ValueError, got {type(error).__name__}: {error}"
    assert name in str(original)
    assert name in str(error)


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=BAD_IDS)
def test_parse_options_names_the_bad_option(options, name):
    with pytest.raises(ValueError) as excinfo:
        parse_options(options)
    _named_value_error(excinfo.value, name)


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=BAD_IDS)
def test_parse_options_keywords_name_the_bad_option(options, name):
    with pytest.raises(ValueError) as excinfo:
        parse_options(**options)
    _named_value_error(excinfo.value, name)


@pytest.mark.parametrize("not_a_dict", [["inner", "eager"], "inner=eager", 3])
def test_parse_options_rejects_options_that_are_not_a_dict(not_a_dict):
    with pytest.raises(ValueError, match="dict"):
        parse_options(not_a_dict)


def test_parse_options_accepts_every_good_value():
    for inner in ("inductor", "eager", "aot_eager"):
        assert parse_options({"inner": inner}).inner == inner
    options = parse_options({"strict": True, "verify": False})
    assert (options.strict, options.verify) == (True, False)
    assert parse_options(None) == parse_options({})


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=BAD_IDS)
def test_backend_factory_validates_at_construction(options, name):
    # tokred.backend(**options) is the way to get the error before anything is compiled.
    with pytest.raises(ValueError) as excinfo:
        tokred.backend(**options)
    _named_value_error(excinfo.value, name)


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=BAD_IDS)
def test_explain_names_the_bad_option(options, name):
    with pytest.raises(ValueError) as excinfo:
        tokred.explain(TwoLayer(), torch.randn(2, 8), **options)
    _named_value_error(excinfo.value, name)


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=BAD_IDS)
def test_torch_compile_names_the_bad_option_at_first_call(options, name):
    compiled = torch.compile(TwoLayer(), backend="tokred", options=options)
    with pytest.raises(Exception) as excinfo:
        compiled(torch.randn(2, 8))
    _named_value_error(excinfo.value, name)


def test_torch_compile_rejects_options_that_are_not_a_dict():
    compiled = torch.compile(TwoLayer(), backend="tokred", options="inner=eager")
    with pytest.raises(Exception) as excinfo:
        compiled(torch.randn(2, 8))
    _named_value_error(excinfo.value, "dict")


def test_torch_compile_with_good_options_runs():
    # The control for the tests above: the same path with valid options compiles and matches eager.
    model = TwoLayer()
    x = torch.randn(2, 8)
    compiled = torch.compile(model, backend="tokred", options={"inner": "eager", "strict": False})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
