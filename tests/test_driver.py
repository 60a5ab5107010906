"""The pass driver (tokred/rewriter/driver.py): one protocol for every pass, plans as plain data,
per-pass site histories, strict and undo owned by the driver."""

import pytest
import torch

import tokred
from tokred.backend import PASSES
from tokred.passes import cpu_linear, merge, prune, sparse_attention
from tokred.rewriter import analysis
from tokred.rewriter.driver import GraphPass, Skip, forget_erased
from tokred.rewriter.options import parse_options
from tokred.rewriter.report import REWRITTEN, SKIPPED
from tokred.rewriter.surgery import RewriteError
from zoo import ZOO


def captured(zm):
    """(gm, example_inputs) of the zoo model's single captured graph, not rewritten."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(zm.model, backend=keep, dynamic=False)(*zm.args, **zm.kwargs)
    assert len(graphs) == 1
    return graphs[0]


def test_every_pass_follows_the_protocol():
    for name, pass_type in PASSES.items():
        assert issubclass(pass_type, GraphPass) and pass_type.name == name
        for step in ("match", "plan", "apply"):
            assert getattr(pass_type, step) is not getattr(GraphPass, step), f"{name} lacks {step}"


def test_merge_plans_are_data_and_change_nothing(fresh_dynamo):
    """match() and plan() of a pass read the graph and rewrite nothing; a plan is a plain record."""
    zm = ZOO["timm_vit_tiny_sdpa"]()
    gm, example_inputs = captured(zm)
    facts = analysis.analyze(gm)
    report = facts.to_report()
    code = gm.code
    options = parse_options(merge={"r": 3})
    p = merge.Merge(gm, facts, options.passes["merge"], report, options, example_inputs)
    plans = [p.plan(block) for block in p.match()]
    assert plans == [merge.MergePlan(block=i, r=3, n=zm.token_count, prefix=1) for i in range(len(plans))]
    assert gm.code == code and not report.changed


def test_prune_plan_names_the_cut(fresh_dynamo):
    zm = ZOO["timm_vit_tiny_sdpa"]()
    gm, example_inputs = captured(zm)
    facts = analysis.analyze(gm)
    options = parse_options(prune={"keep": 0.5, "at": [0]})
    p = prune.Prune(gm, facts, options.passes["prune"], facts.to_report(), options, example_inputs)
    (plan,) = [p.plan(block) for block in p.match()]
    n = zm.token_count
    assert plan == prune.PrunePlan(at=0, keep=0.5, n=n, start=1, end=n, count=n - 1,
                                   k=prune.kept_count(0.5, n - 1), m=1 + prune.kept_count(0.5, n - 1))


def test_sparse_plan_is_a_skip_with_the_reason_on_an_encoder(fresh_dynamo):
    zm = ZOO["timm_vit_tiny_sdpa"]()
    gm, example_inputs = captured(zm)
    facts = analysis.analyze(gm)
    options = parse_options(sparse_attention={"pattern": "sink_window", "window": 4})
    p = sparse_attention.SparseAttention(gm, facts, options.passes["sparse_attention"], facts.to_report(),
                                         options, example_inputs)
    plans = [p.plan(site) for site in p.match()]
    assert plans and all(plan == Skip("sink_window needs causal attention (this site is bidirectional)")
                         for plan in plans)


def test_a_site_keeps_each_pass_in_its_history(fresh_dynamo):
    """merge rewrites a ViT's blocks, sparse_attention then skips their sites: the report shows both."""
    zm = ZOO["timm_vit_tiny_sdpa"]()
    be = tokred.backend(inner="eager", merge={"r": 2}, sparse_attention={"pattern": "sink_window", "window": 4})
    with torch.no_grad():
        torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    report = be.report
    assert report.changed
    for site in report.attention_sites:
        assert site.status_of("merge") == REWRITTEN and site.status_of("sparse_attention") == SKIPPED, site
        assert site.status == REWRITTEN and site.status_text == "rewritten/skipped"
        assert site.passes == ["merge", "sparse_attention"]
        assert "merge r=2" in site.reason and "sink_window needs causal attention" in site.reason
    assert "rewritten/skipped" in str(report)


def test_keep_is_recorded_and_never_strict(fresh_dynamo):
    """r=0 at a block is what the options ask: recorded as found, not an error under strict."""
    zm = ZOO["timm_vit_tiny_sdpa"]()
    be = tokred.backend(inner="eager", strict=True, merge={"r": [2, 0]})
    with torch.no_grad():
        torch.compile(zm.model, backend=be)(*zm.args, **zm.kwargs)
    first, second = be.report.attention_sites
    assert first.status == REWRITTEN
    assert second.status == "found" and "r=0 at this block" in second.reason


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.skipif(cpu_linear.onednn_unavailable() is not None, reason="oneDNN is not available")
def test_cpu_linear_check_failure_is_a_skip_and_strict_raises(fresh_dynamo, monkeypatch):
    """A packed linear that fails its check is undone and reported; with strict it is an error
    (the check's mismatch used to escape the pass whatever strict said)."""

    def mismatch(node, *args):
        raise RewriteError(f"the packed linear for {node.name} gives another shape")

    monkeypatch.setattr(cpu_linear, "check_same_result_type", mismatch)
    model, x = _Linear().eval(), torch.randn(3, 5, 8)
    be = tokred.backend(inner="eager", cpu_linear="onednn")
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    torch.testing.assert_close(out, model(x))
    assert any("0 of 2 projections packed" in n for n in be.report.notes), be.report.notes
    assert any("left as they are: the packed linear for" in n for n in be.report.notes), be.report.notes
    torch._dynamo.reset()
    strict = tokred.backend(inner="eager", strict=True, cpu_linear="onednn")
    with pytest.raises(Exception, match="tokred strict: cpu_linear"):
        with torch.no_grad():
            torch.compile(model, backend=strict)(x)


def test_facts_forget_erased_projections(fresh_dynamo):
    """A node a pass erased leaves the facts, so a later pass never reads it."""
    zm = type("Built", (), {"model": _Linear().eval(), "args": (torch.randn(3, 5, 8),), "kwargs": {}})
    gm, _ = captured(zm)
    facts = analysis.analyze(gm)
    assert len(facts.projections) == 2
    first, gone = (s.node for s in facts.projections)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((first,),) if isinstance(out.args[0], tuple) else (first,)
    gm.graph.eliminate_dead_code()
    assert gone not in set(gm.graph.nodes)
    forget_erased(facts, gm.graph)
    assert [s.node for s in facts.projections] == [first]


@pytest.mark.parametrize("options", [{"merge": {"r": 2}}, {"prune": {"keep": 0.5, "at": [0]}},
                                     {"merge": {"r": 2, "mode": "local"}}])
def test_token_cuts_propagate_the_graph_once_per_pass(options, monkeypatch, fresh_dynamo):
    """Each cut predicts the shapes it changes; the driver propagates the whole graph once, after
    the pass, and the predictions equal the propagated shapes (else the pass is undone)."""
    from tokred.rewriter import driver, surgery

    calls = {"driver": 0, "surgery": 0}
    for module, key in ((driver, "driver"), (surgery, "surgery")):
        original = module.propagate_shapes

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "propagate_shapes", counted)
    zm = ZOO["timm_vit_tiny_sdpa"]()
    be = tokred.backend(inner="eager", **options)
    with torch.no_grad():
        got = torch.compile(zm.model, backend=be)(*zm.args)
    rewritten = [site for site in be.report.attention_sites if site.status == REWRITTEN]
    assert rewritten and not any("not applied" in note for note in be.report.notes)
    assert calls == {"driver": 1, "surgery": 0}
    assert got.shape == zm.model(*zm.args).shape


def test_a_wrong_shape_prediction_undoes_the_pass(monkeypatch, fresh_dynamo):
    """The once-per-pass check is real: predictions made wrong on purpose are found after the
    propagation, the pass is undone, and the report says why."""
    from tokred.rewriter import verify

    cut_shape = verify.cut_shape
    monkeypatch.setattr(verify, "cut_shape", lambda shape, dims, n, keep, *lead: cut_shape(shape, dims, n, keep + 1, *lead))
    zm = ZOO["timm_vit_tiny_sdpa"]()
    be = tokred.backend(inner="eager", merge={"r": 2})
    with torch.no_grad():
        got = torch.compile(zm.model, backend=be)(*zm.args)
        torch.testing.assert_close(got, zm.model(*zm.args))
    (note,) = [note for note in be.report.notes if "not applied" in note]
    assert note.startswith("merge: not applied") and "after the rewrite, expected" in note
    assert not be.report.changed


def test_a_pass_that_changes_nothing_warns_once_per_graph(fresh_dynamo):
    """Nothing silent: through backend="tokred" nobody reads the report, so a requested pass that
    rewrote no site of a graph warns (a TokredWarning naming the pass and its reason); a pass that
    rewrote something, and a compile with no pass options, do not."""
    import warnings

    from tokred.rewriter.report import TokredWarning

    zm = ZOO["timm_vit_tiny_sdpa"]()
    options = {"sparse_attention": {"pattern": "sink_window", "window": 4}, "merge": {"r": 2}}
    with pytest.warns(TokredWarning) as caught, torch.no_grad():
        torch.compile(zm.model, backend="tokred", options=options)(*zm.args)
    texts = [str(w.message) for w in caught if issubclass(w.category, TokredWarning)]
    assert len(texts) == 1
    assert "sparse_attention: changed nothing" in texts[0] and "needs causal attention" in texts[0]
    assert "merge:" not in texts[0]  # merge rewrote the blocks
    torch._dynamo.reset()
    for kwargs in ({"merge": {"r": 2}}, {}):
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            torch.compile(zm.model, backend=tokred.backend(inner="eager", **kwargs))(*zm.args)
        assert not [w for w in caught if issubclass(w.category, TokredWarning)], kwargs
        torch._dynamo.reset()
