"""The fast hypergradient's closed forms on the Hugging Face decoder families users fine-tune: GPT-2 (``Conv1D``),
Llama / Qwen2 (the Llama-form RMSNorm), Gemma (``1 + W`` RMSNorm, scaled word embedding), T5's encoder
(``T5LayerNorm``, the relative position bias), OLMo-2 / Helium / Gemma 3n-4 (the other RMSNorm forms). Tiny
random-init models in float64: ``Fast`` equals ``Unrolled`` with no JVP fallback and no announcement; a central
difference on GPT-2; a ``MetaTrainer`` run on GPT-2 from ``DataCollatorWithPadding`` batches; the captures equal what
each forward multiplies the weight by under mixed precision; and the behavioural check: a user's layer of the same
name, or of the same forward outside transformers, or under transformers' name but computing something else, is not
matched, one with the same math in other code is, and the probe leaves the module and the random state untouched."""

import importlib
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from bilevel_fixtures import central_difference, dot, fast_announced, max_rel_err, random_direction, warmed_problem
from metareweight import Fast, MetaTrainer, MetaWeightNet, TensorIndexedDataset, Unrolled, with_index
from metareweight.core.hypergrad import fast as fast_module
from metareweight.core.layers import base as layer_base
from metareweight.core.layers import rule_for
from metareweight.core.layers.behaviour import configuration
from metareweight.data import Batch, as_batch
from metareweight.precision import Precision

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
             vocab_size=100, num_labels=3, pad_token_id=0, attn_implementation="eager")


def _configs():
    return {
        "gpt2": (transformers.GPT2ForSequenceClassification,
                 transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, num_labels=3,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")),
        "llama": (transformers.LlamaForSequenceClassification, transformers.LlamaConfig(**SMALL)),
        "qwen2": (transformers.Qwen2ForSequenceClassification, transformers.Qwen2Config(**SMALL)),
        "gemma": (transformers.GemmaForSequenceClassification, transformers.GemmaConfig(head_dim=16, **SMALL)),
        "t5": (transformers.T5ForTokenClassification,
               transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=100,
                                     num_labels=3, dropout_rate=0.0, pad_token_id=0)),
    }


#: the closed-form kind each family's own layer takes
KINDS = {"gpt2": {"hf_conv1d"}, "llama": {"hf_rms_norm"}, "qwen2": {"hf_rms_norm"},
         "gemma": {"hf_gemma_rms_norm", "hf_scaled_embedding"}, "t5": {"hf_t5_layer_norm", "hf_t5_relative_bias"}}


class Classifier(nn.Module):
    """An HF sequence classifier called the HF way; inputs ``(B, L, 2)``: token ids and attention mask (T5's
    token classifier reads its first token)."""

    def __init__(self, family):
        super().__init__()
        cls, cfg = _configs()[family]
        torch.manual_seed(0)
        self.hf = cls(cfg).eval()  # eval: no dropout (also 0 in the configs)
        self.first_token = family == "t5"

    def forward(self, x):
        logits = self.hf(input_ids=x[..., 0], attention_mask=x[..., 1]).logits
        return logits[:, 0] if self.first_token else logits


def hf_batch(n, seed, length=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 2:] = 0  # right-padded sequences (pad token 0)
    ids = torch.randint(1, 100, (n, length), generator=g) * mask
    return Batch(torch.stack([ids, mask], -1), torch.randint(0, 3, (n,), generator=g))


def _problem(model, make_batch=hf_batch, opt="momentum"):
    return warmed_problem(model, make_batch, opt)


_fast = fast_announced


def _assert_close(a, b, rtol=1e-5):
    err = max_rel_err(a, b)
    assert err < rtol, err


@pytest.fixture(autouse=True)
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(fast_module, "_ANNOUNCED", set())  # announcements are once per process


# ---- whole models ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["momentum", "adamw"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "gemma", "t5"])
def test_family_takes_closed_forms_everywhere_and_matches_unrolled(family, opt):
    model = Classifier(family)
    problem = _problem(model, opt=opt)
    grads, method, announced = _fast(problem)
    assert announced == []  # no fallback, no (false) coupling
    assert set(method.last_paths.values()) <= {"direct", "gram"}, \
        sorted(n for n, r in method.last_paths.items() if r == "jvp")
    assert len(method.last_paths) == sum(p.requires_grad for p in model.parameters())
    assert KINDS[family] <= {rule_for(m).kind for m in model.modules() if rule_for(m) is not None}
    _assert_close(grads, Unrolled()(problem).grads)


def test_gemma_scaled_embedding_on_the_sparse_route_matches_unrolled():
    problem = _problem(Classifier("gemma"), opt="adamw")
    table = "hf.model.embed_tokens.weight"
    sparse, method, _ = _fast(problem, sparse="always")
    assert table in method.last_sparse and method.last_paths[table] == "direct"
    dense, method, _ = _fast(problem, sparse="never")
    assert method.last_sparse == set()
    _assert_close(sparse, dense, rtol=1e-10)
    _assert_close(sparse, Unrolled()(problem).grads)


@pytest.mark.parametrize("sparse", ["auto", "always"])
def test_t5_relative_bias_is_one_lookup_shared_by_every_sample(sparse):
    """T5's relative position bias looks up ``(query, key)`` buckets with no batch dimension. Its rule expands the
    lookup over the batch, also when the query length equals the batch size (8 here), where the bare lookup's
    first dimension would pass for the batch: exact without the first-call check, and no coupling announced."""
    problem = _problem(Classifier("t5"), lambda n, seed: hf_batch(n, seed, length=8))
    table = "hf.transformer.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    grads, method, announced = _fast(problem, verify=False, sparse=sparse)
    assert method.last_paths[table] == "direct" and (table in method.last_sparse) == (sparse == "always")
    _assert_close(grads, Unrolled()(problem).grads)
    _, method, announced = _fast(problem)
    assert announced == [] and method.last_paths[table] == "direct"


def test_gpt2_fast_matches_a_central_difference():
    """(SGD with momentum: a central difference of the true objective sees Adam's preconditioner move.)"""
    problem = _problem(Classifier("gpt2"), opt="momentum")
    grads, method, _ = _fast(problem)
    assert method.last_paths["hf.transformer.h.0.attn.c_attn.weight"] == "direct"
    d = random_direction(problem)
    fd = central_difference(problem, d)
    assert dot(grads, d) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_gpt2_replay_equals_the_real_step_gradient():
    problem = _problem(Classifier("gpt2"), opt="sgd")
    method = Fast()
    method(problem)
    wt, grads = method.replay(problem.train_batches[0])
    theta = problem.leaf_params()
    true = problem.step_grads(problem.inner_terms(theta, problem.train_batches[0]), theta)
    assert "hf.transformer.h.1.mlp.c_fc.weight" in grads
    for n, g in grads.items():
        torch.testing.assert_close(g, true[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_bf16_fast_hypergradient_within_two_percent_of_float32(family):
    """Under bf16 autocast the closed forms stay on (no fallback, no false coupling) and the hypergradient stays
    within 2 % of float32's."""
    b = hf_batch(32, 0)
    ds = TensorIndexedDataset(b.inputs, b.targets)
    model = Classifier(family)
    torch.manual_seed(0)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), DataLoader(ds, 16),
                          MetaWeightNet(hidden=8), meta_loader=DataLoader(ds, 16), hypergrad="fast", progress=False)
    batches = [as_batch(x) for x in trainer.train_loader]
    problem = lambda: trainer.build_problem(batches[:1], batches[1])  # noqa: E731
    exact, _, _ = _fast(problem())
    trainer.precision = Precision("bf16", torch.device("cpu"))
    low, method, announced = _fast(problem())
    assert announced == [] and "jvp" not in method.last_paths.values()
    exact, low = torch.cat([g.reshape(-1) for g in exact]), torch.cat([g.reshape(-1) for g in low])
    rel = float((low - exact).norm() / exact.norm())
    print(f"{family}: bf16 fast hypergradient relative error {rel:.2e}")
    assert 0 < rel < 2e-2, rel


# ---- each norm form on its own ------------------------------------------------------------------------------------
def _norm(path, cls_name, *args):
    module = pytest.importorskip(f"transformers.models.{path}")
    return getattr(module, cls_name)(*args)


NORMS = {  # class -> (its module under transformers.models, the kind it must get)
    "LlamaRMSNorm": ("llama.modeling_llama", "hf_rms_norm"),
    "Qwen3RMSNorm": ("qwen3.modeling_qwen3", "hf_rms_norm"),
    "MistralRMSNorm": ("mistral.modeling_mistral", "hf_rms_norm"),
    "Olmo2RMSNorm": ("olmo2.modeling_olmo2", "hf_rms_norm_float32"),
    "HeliumRMSNorm": ("helium.modeling_helium", "hf_rms_norm_float32"),
    "GemmaRMSNorm": ("gemma.modeling_gemma", "hf_gemma_rms_norm"),
    "Gemma3RMSNorm": ("gemma3.modeling_gemma3", "hf_gemma_rms_norm"),
    "Gemma3nRMSNorm": ("gemma3n.modeling_gemma3n", "hf_gemma4_rms_norm"),
    "Gemma4RMSNorm": ("gemma4.modeling_gemma4", "hf_gemma4_rms_norm"),
    "T5LayerNorm": ("t5.modeling_t5", "hf_t5_layer_norm"),
}


class NormModel(nn.Module):
    """Linear → an HF norm → tanh → Linear over (batch, tokens, features)."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(5, 8), norm, nn.Linear(8, 3)
        with torch.no_grad():
            norm.weight.add_(0.3 * torch.randn(8))  # not the identity (Gemma's starts at 0, the others at 1)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))).mean(1))


def seq_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("name", sorted(NORMS))
def test_each_norm_form_matches_unrolled(name):
    path, kind = NORMS[name]
    norm = _norm(path, name, 8)
    assert rule_for(norm).kind == kind
    problem = _problem(NormModel(norm), seq_batch, "adamw")
    grads, method, announced = _fast(problem)
    assert announced == [] and method.last_paths["norm.weight"] == "direct"
    _assert_close(grads, Unrolled()(problem).grads)


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float64, torch.float64)])
def test_the_capture_gives_the_weight_autograds_gradient_in_mixed_precision(name, dtypes):
    """The captured x̂ is what each forward multiplies the weight by, in the same precision: the rule's weight
    gradient equals autograd's for an input in one dtype and a weight in another."""
    x_dtype, w_dtype = dtypes
    path, _ = NORMS[name]
    norm = _norm(path, name, 8).to(w_dtype)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(8, generator=torch.Generator().manual_seed(0)).to(w_dtype))
    x = (3 * torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))).to(x_dtype)
    out = norm(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    (true,) = torch.autograd.grad((out * g).sum(), norm.weight)
    rule = rule_for(norm)
    a = rule.capture(norm, (x,), out)
    ours = rule.weight_grad(norm, a.to(w_dtype), g.to(w_dtype))
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 2e-2}[w_dtype]
    torch.testing.assert_close(ours, true, rtol=tol, atol=tol)


# ---- only transformers' classes that compute what the rules state -------------------------------------------------
def _fake_class(name, module, forward, base=nn.Module):
    """A class called ``name`` defined in ``module`` (a user's, or one pretending to be under transformers)."""
    def init(self, d=4):
        base.__init__(self)
        self.weight = nn.Parameter(torch.ones(d, d) if name == "Conv1D" else torch.ones(d))
        self.bias, self.nf = nn.Parameter(torch.zeros(d)), d
        self.variance_epsilon = self.eps = 1e-6

    cls = type(name, (base,), {"__init__": init, "forward": forward, "__module__": module})
    cls.__qualname__ = name
    return cls


def test_a_user_layer_of_the_same_name_or_forward_is_not_matched():
    llama = importlib.import_module("transformers.models.llama.modeling_llama").LlamaRMSNorm
    conv1d = transformers.pytorch_utils.Conv1D
    cases = [  # (the same name as transformers', in the user's module), (the same forward, in the user's module)
        _fake_class("Conv1D", "my_layers", lambda self, x: x @ self.weight),
        _fake_class("LlamaRMSNorm", "my_layers", lambda self, x: x * self.weight),
        _fake_class("LlamaRMSNorm", "my_layers", llama.forward),
        _fake_class("Conv1D", "my_layers", conv1d.forward),
        # under transformers.models but with another forward (a later version, or a different family's form)
        _fake_class("LlamaRMSNorm", "transformers.models.llama.modeling_llama", lambda self, x: x * self.weight),
        _fake_class("Conv1D", "transformers.pytorch_utils", lambda self, x: x @ self.weight),
    ]
    for cls in cases:
        assert rule_for(cls()) is None, cls
    # the classes themselves are matched; an instance whose forward was replaced (a kernel, a hook) is not
    assert rule_for(conv1d(6, 4)).kind == "hf_conv1d" and rule_for(llama(4)).kind == "hf_rms_norm"
    patched = llama(4)
    patched.forward = lambda x: x
    assert rule_for(patched) is None


def _fake_transformers_module(**forwards):
    """A module object ``transformers.models.fake.modeling_fake`` holding one class per ``name=(forward, base,
    eps attribute)``: each named as transformers' classes are, under transformers' package, with its own forward."""
    module = types.ModuleType("transformers.models.fake.modeling_fake")
    for name, (forward, base, eps) in forwards.items():
        def init(self, d=6, base=base, eps=eps):
            if base is nn.Embedding:
                base.__init__(self, 11, d, padding_idx=0)
                self.embed_scale = 1.7
            else:
                base.__init__(self)
                self.weight = nn.Parameter(torch.ones(d))
                setattr(self, eps, 1e-6)

        cls = type(name, (base,), {"__init__": init, "forward": forward, "__module__": module.__name__})
        cls.__qualname__ = name
        setattr(module, name, cls)
    return module


def _llama_math_in_other_code(self, h):
    dtype = h.dtype
    h = h.float()
    inv_rms = (h * h).mean(dim=-1, keepdim=True).add(self.variance_epsilon).rsqrt()
    return self.weight * (h * inv_rms).to(dtype)


def _without_the_cast(self, h):  # the Llama math, but the product stays in float32
    h = h.float()
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _mean_subtracted(self, h):  # a LayerNorm without bias under an RMSNorm's name
    h = h.float()
    h = h - h.mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(self.weight.dtype)


def _gemma_math_in_other_code(self, x):
    y = x.to(torch.float32)
    scale = 1.0 + self.weight.to(torch.float32)
    return (scale * (y * (y * y).mean(-1, keepdim=True).add(self.eps).rsqrt())).to(x.dtype)


def test_behaviour_not_name_decides_under_transformers_package():
    """Classes named as transformers' and defined under its package: matched only where their forward computes what
    a rule states, written in any code."""
    fake = _fake_transformers_module(
        LlamaRMSNorm=(_llama_math_in_other_code, nn.Module, "variance_epsilon"),
        Qwen9RMSNorm=(_without_the_cast, nn.Module, "variance_epsilon"),
        Olmo9RMSNorm=(_mean_subtracted, nn.Module, "variance_epsilon"),
        GemmaRMSNorm=(_gemma_math_in_other_code, nn.Module, "eps"),
        GemmaTextScaledWordEmbedding=(lambda self, ids: nn.functional.embedding(ids, self.weight) * self.embed_scale,
                                      nn.Embedding, None),
        BartScaledWordEmbedding=(lambda self, ids: nn.functional.embedding(ids, self.weight) + self.embed_scale,
                                 nn.Embedding, None),
    )
    kinds = {name: getattr(rule_for(getattr(fake, name)()), "kind", None) for name in
             ("LlamaRMSNorm", "Qwen9RMSNorm", "Olmo9RMSNorm", "GemmaRMSNorm", "GemmaTextScaledWordEmbedding",
              "BartScaledWordEmbedding")}
    assert kinds == {"LlamaRMSNorm": "hf_rms_norm", "Qwen9RMSNorm": None, "Olmo9RMSNorm": None,
                     "GemmaRMSNorm": "hf_gemma_rms_norm", "GemmaTextScaledWordEmbedding": "hf_scaled_embedding",
                     "BartScaledWordEmbedding": None}
    # Conv1D by its qualified name: a + W + b in other code is matched, without the bias it is not
    adds = _fake_class("Conv1D", "transformers.pytorch_utils", lambda self, x: torch.matmul(x, self.weight) + self.bias)
    assert rule_for(adds()).kind == "hf_conv1d"


def _grouped(self, x):  # the Gemma form, normalised over groups of features when the instance sets group_size
    y = x.float()
    if self.group_size is not None:
        y = y.reshape(*y.shape[:-1], -1, self.group_size)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
    return (y.reshape(x.shape) * (1.0 + self.weight.float())).type_as(x)


def test_each_configuration_is_checked_and_a_forward_with_more_inputs_or_parameters_is_not_matched():
    """Checked once per class *and* configuration (plain attributes, shapes): an instance whose attributes make it
    compute something else is refused although its class was matched. A forward taking a second input (a gate), or a
    layer with a parameter the rule does not know of, is not matched."""
    fake = _fake_transformers_module(
        GroupedRMSNorm=(_grouped, nn.Module, "eps"),
        GatedRMSNorm=(lambda self, h, gate=None: _llama_math_in_other_code(self, h if gate is None else h * gate),
                      nn.Module, "variance_epsilon"),
        ShiftedRMSNorm=(lambda self, h: _llama_math_in_other_code(self, h) + self.shift, nn.Module,
                        "variance_epsilon"))
    plain, grouped = fake.GroupedRMSNorm(), fake.GroupedRMSNorm()
    plain.group_size, grouped.group_size = None, 3
    assert rule_for(plain).kind == "hf_gemma_rms_norm" and rule_for(grouped) is None
    shifted = fake.ShiftedRMSNorm()
    shifted.shift = nn.Parameter(torch.zeros(6))  # zero: the probe could not tell; the extra parameter does
    assert rule_for(fake.GatedRMSNorm()) is None and rule_for(shifted) is None


def test_the_forms_that_differ_only_in_casts_are_told_apart():
    """Llama casts x̂ back before the product, OLMo-2 after it, Helium also takes the weight in float32, T5 keeps the
    input's dtype: the same values in float32, so each is matched by its own statement in the other dtypes."""
    modules = {"llama": "LlamaRMSNorm", "olmo2": "Olmo2RMSNorm", "helium": "HeliumRMSNorm", "t5": "T5LayerNorm"}
    rules = {}
    for family, name in modules.items():
        rule = rule_for(_norm(f"{family}.modeling_{family}", name, 8))
        rules[family] = (rule.kind, getattr(rule, "weight_in_float32", None))
    assert rules == {"llama": ("hf_rms_norm", False), "olmo2": ("hf_rms_norm_float32", False),
                     "helium": ("hf_rms_norm_float32", True), "t5": ("hf_t5_layer_norm", False)}


@pytest.fixture
def fresh_checks(monkeypatch):
    """The behavioural checks run afresh (their per-class caches emptied for the test)."""
    for cache in ("_CANDIDATES", "_RESOLVED", "_VERDICTS"):
        monkeypatch.setattr(layer_base, cache, {})


def test_the_probe_leaves_the_module_its_hooks_and_the_random_state_untouched(fresh_checks):
    t5 = transformers.T5Config(d_model=8, d_kv=4, num_heads=2, relative_attention_num_buckets=8)
    modules = {
        "hf_t5_relative_bias": importlib.import_module("transformers.models.t5.modeling_t5").T5Attention(
            t5, has_relative_attention_bias=True),
        "hf_rms_norm": _norm("llama.modeling_llama", "LlamaRMSNorm", 8),
        "hf_gemma_rms_norm": _norm("gemma.modeling_gemma", "GemmaRMSNorm", 8),
        "hf_conv1d": transformers.pytorch_utils.Conv1D(6, 4),
        "hf_scaled_embedding": _norm("gemma.modeling_gemma", "GemmaTextScaledWordEmbedding", 10, 4, 0, 3.0),
    }
    calls = []
    for module in modules.values():
        for m in module.modules():
            m.register_forward_pre_hook(lambda *a: calls.append(a))
            m.register_forward_hook(lambda *a: calls.append(a))
    before = {k: {n: t.clone() for n, t in m.state_dict(keep_vars=True).items()} for k, m in modules.items()}
    attributes = {k: dict(m.__dict__) for k, m in modules.items()}
    rng = torch.get_rng_state()
    for kind, module in modules.items():
        assert not [key for key in layer_base._RESOLVED if key[0] is type(module)]
        assert rule_for(module).kind == kind
        assert layer_base._RESOLVED[type(module), configuration(module)].kind == kind  # decided on the first instance
    assert torch.equal(torch.get_rng_state(), rng) and calls == []
    for kind, module in modules.items():
        after = module.state_dict(keep_vars=True)
        assert set(after) == set(before[kind]) and all(torch.equal(after[n], t) for n, t in before[kind].items())
        assert all(p.grad is None for p in module.parameters())
        assert module.__dict__.keys() == attributes[kind].keys()
        assert all(module.__dict__[k] is v for k, v in attributes[kind].items() if not k.startswith("_"))


def test_an_instance_that_cannot_tell_leaves_the_class_undecided(fresh_checks):
    """A norm on the meta device (no values to compare) or one whose forward was replaced: not matched, and its
    class is checked again on the next instance; a Gemma 4 norm built without a weight is not matched, the class
    still is with one."""
    llama = importlib.import_module("transformers.models.llama.modeling_llama").LlamaRMSNorm
    gemma4 = importlib.import_module("transformers.models.gemma4.modeling_gemma4").Gemma4RMSNorm
    with torch.device("meta"):
        on_meta = llama(8)
    patched = llama(8)
    patched.forward = lambda x: x
    for module in (on_meta, patched):
        assert rule_for(module) is None and not [key for key in layer_base._RESOLVED if key[0] is llama]
    assert rule_for(gemma4(8, with_scale=False)) is None
    assert rule_for(llama(8)).kind == "hf_rms_norm" and rule_for(gemma4(8)).kind == "hf_gemma4_rms_norm"
    assert rule_for(on_meta) is not None and rule_for(patched) is None  # (the class matched; the instance not)


def test_a_rule_registered_by_name_needs_no_import_and_a_registration_by_type_wins(monkeypatch):
    from metareweight.core.layers import HFConv1DRule, LinearRule, register_layer_rule

    for attr in ("_RULES", "_NAMED", "_CANDIDATES", "_RESOLVED", "_VERDICTS"):
        monkeypatch.setattr(layer_base, attr, dict(getattr(layer_base, attr)))
    monkeypatch.setattr(layer_base, "_PATTERNS", list(layer_base._PATTERNS))
    conv1d = transformers.pytorch_utils.Conv1D
    assert rule_for(conv1d(6, 4)).kind == "hf_conv1d"

    class Mine(HFConv1DRule):
        kind = "mine"

    register_layer_rule("transformers.pytorch_utils.Conv1D", Mine())  # replaces the built-in (cache refreshed)
    assert rule_for(conv1d(6, 4)).kind == "mine"
    register_layer_rule(conv1d, LinearRule())  # by type: takes precedence
    assert rule_for(conv1d(6, 4)).kind == "linear"
    for bad in ("Conv1D", "*.*"):
        with pytest.raises(TypeError, match="qualified class name"):
            register_layer_rule(bad, Mine())
    register_layer_rule("my_package.*", Mine())  # a pattern: accepted, matches nothing here
    assert rule_for(conv1d(6, 4)).kind == "linear"


def test_importing_metareweight_does_not_import_transformers():
    import subprocess

    code = "import sys, metareweight, metareweight.core.layers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- MetaTrainer on GPT-2 from DataCollatorWithPadding batches ------------------------------------------------------
WORDS = ["good", "great", "bad", "awful", "movie", "plot", "the", "was", "very"]


def test_meta_trainer_fine_tunes_gpt2_from_a_collator_with_closed_forms_only():
    from metareweight.hf import word_tokenizer

    tok = word_tokenizer(WORDS)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(32)]
    items = with_index([dict(tok(t), label=int("good" in t or "great" in t)) for t in texts])
    data = DataLoader(items, batch_size=8, collate_fn=transformers.DataCollatorWithPadding(tok))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), n_positions=32,
                                  num_labels=2, pad_token_id=tok.pad_token_id, bos_token_id=2, eos_token_id=3,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2ForSequenceClassification(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = Fast()
    trainer = MetaTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data, MetaWeightNet(hidden=8),
                          meta_loader=data, hypergrad=method, adam_preconditioner="fixed", progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(epochs=1)
    assert not [str(w.message) for w in caught if "hypergrad='fast'" in str(w.message)]
    assert trainer.meta_steps == 4 and len(trainer.weights_history) == 32
    assert method.last_paths["transformer.h.0.attn.c_attn.weight"] == "direct"
    assert set(method.last_paths.values()) <= {"direct", "gram"}
    name = "transformer.h.1.mlp.c_proj.weight"
    assert not torch.equal(before[name], model.state_dict()[name])
