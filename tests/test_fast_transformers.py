"""The fast exact hypergradient on transformer and CNN layers: equal to ``unrolled`` (float64) on a tiny random-init
BERT (LayerNorm, attention, position/token-type embeddings broadcast over the batch, a padding mask), LayerNorm and
RMSNorm models, ``nn.MultiheadAttention``, CNNs with and without BatchNorm and a user-registered layer; no false
coupling announcement on BERT; every fallback announced; bf16 within 2 % of float32."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from bilevel_fixtures import (DirectTermObjective, OPTS, central_difference, dot, make_problem, max_rel_err,
                              random_direction, warmed_problem)
from metareweight import (Fast, LayerRule, MetaStep, MetaTrainer, MetaWeightNet,
                          TensorIndexedDataset, Unrolled, register_layer_rule)
from metareweight.core.hypergrad import fast as fast_module
from metareweight.core.layers import base as layer_base
from metareweight.data import Batch, as_batch
from metareweight.precision import Precision

pytestmark = pytest.mark.usefixtures("one_thread")
transformers = pytest.importorskip("transformers")


def _assert_close(a, b, rtol=1e-5):
    err = max_rel_err(a, b)
    assert err < rtol, err


_problem = warmed_problem


def _fast_warnings(call):
    """``call()``'s result and the fast method's warnings (torch's own deprecation notices left out)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [str(w.message) for w in caught if "hypergrad='fast'" in str(w.message)]


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(fast_module, "_ANNOUNCED", set())  # announcements are once per process


# ---- a tiny BERT ----------------------------------------------------------------------------------------------------
class TinyBert(nn.Module):
    """``BertForSequenceClassification`` called the HF way; inputs ``(B, L, 2)``: token ids and attention mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      vocab_size=100, num_labels=3, attn_implementation="eager",
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.bert = transformers.BertForSequenceClassification(cfg)

    def forward(self, x):
        return self.bert(input_ids=x[..., 0], attention_mask=x[..., 1]).logits


def bert_batch(n, seed, length=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 2, length - 2:] = 0  # padded sequences
    ids = torch.randint(1, 100, (n, length), generator=g) * mask  # pad token 0 (BERT's padding_idx)
    return Batch(torch.stack([ids, mask], -1), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_bert_takes_closed_forms_everywhere_and_matches_unrolled(opt, fresh_announcements):
    problem = _problem(TinyBert(), bert_batch, opt)
    method = Fast()
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    assert announced == []  # neither a fallback nor a (false) coupling: broadcast position ids are shared, not coupling
    routes = method.last_paths
    assert set(routes.values()) <= {"direct", "gram"}, {n: r for n, r in routes.items() if r == "jvp"}
    assert routes["bert.bert.embeddings.position_embeddings.weight"] == "direct"
    assert routes["bert.bert.encoder.layer.0.attention.output.LayerNorm.weight"] == "direct"
    assert ("gram" in routes.values()) == (opt == "momentum")
    _assert_close(grads, Unrolled()(problem).grads)


def test_bert_replay_equals_the_real_step_gradient():
    problem = _problem(TinyBert(), bert_batch, "sgd")
    method = Fast()
    method(problem)
    wt, grads = method.replay(problem.train_batches[0])
    theta = problem.leaf_params()
    true = problem.step_grads(problem.inner_terms(theta, problem.train_batches[0]), theta)
    for n, g in grads.items():
        torch.testing.assert_close(g, true[n], rtol=1e-9, atol=1e-12)
    assert set(grads) == {n for n, g in true.items() if g is not None}


# ---- lookup tables stepped on the meta batch's rows only -------------------------------------------------------------
class WordModel(nn.Module):
    """A 60-token table with a padding row → tanh → mean over tokens → Linear; ``outside_on``: a batch size at which
    the forward also reads the whole table outside its lookups (the meta batch's, so only the meta forward does)."""

    def __init__(self, outside_on=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(60, 6, padding_idx=0)
        self.fc = nn.Linear(6, 3)
        self.outside_on = outside_on

    def forward(self, idx):
        out = self.fc(torch.tanh(self.emb(idx)).mean(1))
        return out + self.emb.weight.sum() if idx.shape[0] == self.outside_on else out


def word_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 60, (n, 4), generator=g)
    idx[: n // 2, 3] = 0
    return Batch(idx, torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
@pytest.mark.parametrize("model", ["bert", "words", "words read outside"])
def test_sparse_table_step_matches_unrolled(model, opt):
    make, batch, table = {"bert": (TinyBert, bert_batch, "bert.bert.embeddings.word_embeddings.weight"),
                          "words": (WordModel, word_batch, "emb.weight"),
                          "words read outside": (lambda: WordModel(outside_on=10), word_batch, "emb.weight")}[model]
    problem = _problem(make(), batch, opt)
    sparse = Fast(sparse="always")
    grads = sparse(problem).grads
    # a table the meta forward reads outside its lookups gets its whole θ' (planned second meta pass)
    assert (table in sparse.last_sparse) == (model != "words read outside"), sparse.last_sparse
    assert sparse.last_paths[table] == "direct"
    _assert_close(grads, Unrolled()(problem).grads)
    dense = Fast(sparse="never")
    _assert_close(grads, dense(problem).grads, rtol=1e-10)
    assert dense.last_sparse == set()


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
def test_sparse_table_step_leaves_the_real_step_as_it_was(opt):
    """The real step moves every row the train batch reads (and, by momentum or weight decay, every row), as before."""
    runs = []
    train, meta = word_batch(8, 1), word_batch(10, 2)
    for sparse in ("always", "never"):
        model = WordModel().double()
        cls, kw = OPTS[opt]
        optimizer = cls(model.parameters(), **kw)
        stepper = MetaStep(model, optimizer, DirectTermObjective(3, direct=True).double(), Fast(sparse=sparse),
                           adam_preconditioner="fixed")
        before = model.emb.weight.detach().clone()
        for _ in range(2):
            stepper.step([train], meta)
        assert stepper.method.last_sparse == ({"emb.weight"} if sparse == "always" else set())
        runs.append([p.detach().clone() for p in list(model.parameters()) + stepper.objective.meta_parameters()])
    only_train = sorted(set(train.inputs.flatten().tolist()) - set(meta.inputs.flatten().tolist()) - {0})
    assert only_train and not torch.equal(runs[0][0][only_train], before[only_train])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---- normalisation layers, attention, a user layer ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_layer_and_rms_norm_have_closed_forms(kind, opt):
    problem = make_problem(kind, OPTS[opt], direct=True, warm_steps=2, preconditioner="fixed")
    method = Fast()
    grads = method(problem).grads
    assert "jvp" not in method.last_paths.values() and method.last_paths["1.weight"] == "direct"
    _assert_close(grads, Unrolled()(problem).grads)
    if opt == "sgd":
        d = random_direction(problem, 5)
        assert dot(grads, d) == pytest.approx(central_difference(problem, d), rel=1e-6, abs=1e-10)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (self-attention with a key padding mask, optionally a causal ``attn_mask``) between a
    token embedding and a head."""

    def __init__(self, batch_first=True, need_weights=False, causal=False):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.batch_first, self.need_weights, self.causal = batch_first, need_weights, causal

    def forward(self, idx):
        h = self.emb(idx)
        x = h if self.batch_first else h.transpose(0, 1)
        T = idx.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if self.causal else None
        a, w = self.attn(x, x, x, key_padding_mask=idx == 0, need_weights=self.need_weights, attn_mask=mask)
        a = a if self.batch_first else a.transpose(0, 1)
        out = self.norm(h + a).mean(1)
        if w is not None:  # the averaged attention weights feed the output too
            out = out + w.mean((1, 2)).unsqueeze(1)
        return self.head(out)


def token_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, 20, (n, 5), generator=g)
    idx[: n // 2, 3:] = 0
    return Batch(idx, torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("batch_first,need_weights,causal", [(True, False, False), (False, True, True)])
def test_multihead_attention_projections_take_closed_forms(batch_first, need_weights, causal, fresh_announcements):
    problem = _problem(Attention(batch_first, need_weights, causal), token_batch, "momentum")
    method = Fast(gram="never")
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    assert announced == [] and set(method.last_paths.values()) == {"direct"}, method.last_paths
    assert {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"} <= set(method.last_paths)
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward (unrolled needs it)
        _assert_close(grads, Unrolled()(problem).grads)
        _assert_close(Fast(gram="always")(problem).grads, Unrolled()(problem).grads)
    assert type(problem.model.attn).forward is nn.MultiheadAttention.forward  # the capture left the module alone
    assert "forward" not in vars(problem.model.attn)


def test_cross_attention_falls_back_to_the_jvp_path_announced(fresh_announcements):
    class Cross(Attention):
        def forward(self, idx):
            h = self.emb(idx)
            a, _ = self.attn(h, h.flip(1), h.flip(1), need_weights=False)
            return self.head(self.norm(h + a).mean(1))

    problem = _problem(Cross(), token_batch, "momentum")
    method = Fast()
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    assert len(announced) == 1 and "no closed form" in announced[0] and "attn.in_proj_weight" in announced[0]
    assert method.last_paths["attn.in_proj_weight"] == "jvp" and method.last_paths["emb.weight"] == "direct"
    with sdpa_kernel(SDPBackend.MATH):
        _assert_close(grads, Unrolled()(problem).grads)


def indexed_tokens(n, seed, length=5):
    """``n`` sequences of ``length`` token ids in 1..19, labels, and the sample index ``0..n-1``."""
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(1, 20, (n, length), generator=g), torch.randint(0, 3, (n,), generator=g),
                 torch.arange(n))


class RelativeBias(nn.Module):
    """Token embeddings attending to each other with a learned bias per ``(query, key)`` offset, looked up as
    ``(L, L)`` with no batch dimension (MPNet's and XLNet's form): the lookup's first dimension is the sequence
    length, which passes for the batch where the two are equal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.offsets = nn.Embedding(19, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        h = self.emb(idx)
        positions = torch.arange(idx.shape[1])
        bias = self.offsets(positions[None, :] - positions[:, None] + 9)[..., 0]  # (L, L), shared
        scores = h @ h.transpose(1, 2) + bias
        return self.head(torch.tanh(torch.softmax(scores, -1) @ h).mean(1))


def test_a_shared_lookup_the_size_of_the_batch_is_checked_again_and_not_taken_per_sample(fresh_announcements):
    """The first call's check passes with sequences of 5 (the ``(L, L)`` lookup is no per-sample call, JVP); a later
    batch of 8 sequences of 8 makes it look like one. The newly closed table is checked again, found off, and takes
    the JVP path from then on (announced), and the hypergradient stays exact: one free weight per sample, so a
    misattribution that sums right still shows (off by 1.5e-3 here without the re-check; by 45 % on an MPNet)."""
    from bilevel_fixtures import PerSampleWeights

    length = [5]

    def batch(n, seed):
        return indexed_tokens(n, seed, length[0])

    model = RelativeBias()
    problem = _problem(model, batch, "momentum", objective=PerSampleWeights(8))
    method = Fast()
    _, announced = _fast_warnings(lambda: method(problem).grads)
    assert method.last_paths["offsets.weight"] == "jvp" and "no closed form" in announced[0]
    length[0] = 8
    problem = _problem(model, batch, "momentum", objective=PerSampleWeights(8))
    for _ in range(2):
        grads, announced = _fast_warnings(lambda: method(problem).grads)
        assert method.last_paths["offsets.weight"] == "jvp" and method.last_paths["emb.weight"] == "direct"
        _assert_close(grads, Unrolled()(problem).grads, rtol=1e-9)
    assert [a for a in announced if "miss autograd" in a] == []  # announced once, on the first such call


class InPlace(nn.Module):
    """An embedding scaled in place (CTRL's ``h *= sqrt(d)``: autograd's gradient with respect to the lookup's
    output tensor is then the scaled one's, not the lookup's δ) and a Linear whose output gets a residual added in
    place (Falcon's ``mlp_out += attn_out``: δ unchanged)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        h = self.emb(idx)
        h *= 2.5
        z = self.proj(torch.tanh(h))
        z += h
        return self.head(torch.tanh(z).mean(1))


def test_an_output_changed_in_place_is_checked_alone_and_only_a_wrong_one_takes_the_jvp_path(fresh_announcements):
    """The first call's check judges such layers one by one: the scaled lookup's table alone takes the JVP path
    (before: every parameter, announced as samples interacting), the Linear with the residual added in place keeps
    its closed form; exact either way."""
    from bilevel_fixtures import PerSampleWeights

    problem = _problem(InPlace(), indexed_tokens, "momentum", objective=PerSampleWeights(8))
    method = Fast()
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    assert method.last_paths == {"emb.weight": "jvp", "proj.weight": "direct", "proj.bias": "direct",
                                 "head.weight": "direct", "head.bias": "direct"}
    assert len(announced) == 1 and "['emb.weight']" in announced[0] and "changed in place" in announced[0]
    _assert_close(grads, Unrolled()(problem).grads, rtol=1e-9)
    _assert_close(Fast(verify=False)(problem).grads, Unrolled()(problem).grads, rtol=1e-9)  # not trusted unchecked


class Flattened(nn.Module):
    """A feed-forward run on every sample's tokens flattened into rows, ``(B·L, d)`` (OPT's, Qwen2-MoE's shared
    expert): sample-major, or time-major (``(L, B, d)`` flattened: rows of every sample interleaved)."""

    def __init__(self, time_major):
        super().__init__()
        torch.manual_seed(0)
        self.time_major = time_major
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.ff = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        h = self.emb(idx)
        h = h.transpose(0, 1) if self.time_major else h
        rows = self.norm(torch.tanh(self.ff(h.reshape(-1, 6))))
        h = rows.reshape(h.shape)
        return self.head((h.transpose(0, 1) if self.time_major else h).mean(1))


@pytest.mark.parametrize("opt", ["momentum", "adamw"])
@pytest.mark.parametrize("time_major", [False, True])
def test_rows_flattened_from_every_sample_are_grouped_by_sample_and_checked(time_major, opt, fresh_announcements):
    """Flattened rows are taken as sample-major and checked on their own: OPT's form keeps the Linear's and the
    LayerNorm's closed forms (before: the JVP path), interleaved rows are found off and take the JVP path alone
    (announced); exact either way, the Gram route included."""
    from bilevel_fixtures import PerSampleWeights

    problem = _problem(Flattened(time_major), lambda n, seed: indexed_tokens(n, seed, length=16), opt,
                       objective=PerSampleWeights(8))
    method = Fast()
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    flat = {n: method.last_paths[n] for n in ("ff.weight", "ff.bias", "norm.weight", "norm.bias")}
    assert set(flat.values()) == {"jvp"} if time_major else set(flat.values()) <= {"direct", "gram"}
    assert bool(announced) == time_major and (not time_major or "miss autograd" in announced[0])
    reference = Unrolled()(problem).grads
    _assert_close(grads, reference, rtol=1e-9)
    if opt == "momentum" and not time_major:
        gram = Fast(gram="always")
        _assert_close(gram(problem).grads, reference, rtol=1e-9)
        assert gram.last_paths["ff.weight"] == "gram"


class Scale(nn.Module):
    """A user's layer: a feature-wise scale and shift, ``x ⊙ weight + bias``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, d))

    def forward(self, x):
        return x * self.weight + self.bias


class ScaleRule(LayerRule):
    kind = "scale"

    def op(self, module, a, weight):
        return a * weight


def test_a_user_registered_layer_takes_its_closed_form(monkeypatch, fresh_announcements):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 7), Scale(7), nn.Tanh(), nn.Linear(7, 3))

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))

    problem = _problem(model(), batch, "nesterov")
    before = Fast()
    _, announced = _fast_warnings(lambda: before(problem))
    assert before.last_paths["1.weight"] == "jvp" and "no closed form" in announced[0]
    monkeypatch.setattr(layer_base, "_RULES", dict(layer_base._RULES))  # registered for this test only
    register_layer_rule(Scale, ScaleRule())
    method = Fast()
    grads = method(problem).grads
    assert method.last_paths["1.weight"] == method.last_paths["1.bias"] == "direct"
    _assert_close(grads, Unrolled()(problem).grads)
    # the real step's gradient replayed through the rule's default adjoint (autograd through op) and bias layout
    wt, replayed = method.replay(problem.train_batches[0])
    theta = problem.leaf_params()
    true = problem.step_grads(problem.inner_terms(theta, problem.train_batches[0]), theta)
    torch.testing.assert_close(replayed["1.weight"], true["1.weight"])
    torch.testing.assert_close(replayed["1.bias"], true["1.bias"])


def test_register_layer_rule_names_wrong_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_rule("Linear", ScaleRule())
    with pytest.raises(TypeError, match="LayerRule instance"):
        register_layer_rule(Scale, ScaleRule)


# ---- CNNs -----------------------------------------------------------------------------------------------------------
class ResBlockCNN(nn.Module):
    """conv → (BatchNorm) → ReLU → residual conv block → global average pool → Linear."""

    def __init__(self, batch_norm: bool):
        super().__init__()
        torch.manual_seed(0)
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=not batch_norm), norm(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), norm(4), nn.Tanh(), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean((2, 3)))


def image_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn_with_and_without_batch_norm(batch_norm, fresh_announcements):
    problem = _problem(ResBlockCNN(batch_norm), image_batch, "momentum")
    method = Fast()
    grads, announced = _fast_warnings(lambda: method(problem).grads)
    if batch_norm:  # batch statistics couple the samples: the exact JVP path for every parameter, announced
        assert len(announced) == 1 and "BatchNorm" in announced[0] and "JVP" in announced[0]
        assert set(method.last_paths.values()) == {"jvp"}
    else:
        assert announced == [] and set(method.last_paths.values()) <= {"direct", "gram"}
    _assert_close(grads, Unrolled()(problem).grads)
    # the announcement is once per process
    _, again = _fast_warnings(lambda: Fast()(problem))
    assert again == []


# ---- mixed precision ------------------------------------------------------------------------------------------------
def _bf16_trainer(model, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 6, 8, generator=g)
    y = (x[:, 0, 0] > 0).long() + (x[:, 1, 1] > 0.5).long()
    ds = TensorIndexedDataset(x, y)
    return MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), DataLoader(ds, 16),
                       MetaWeightNet(hidden=16), meta_loader=DataLoader(ds, 16), hypergrad="fast", progress=False)


class TokenMixer(nn.Module):
    """Linear over (batch, tokens, features), LayerNorm, RMSNorm, a mean over tokens and a head."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.rms = nn.RMSNorm(32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.rms(torch.tanh(self.norm(self.proj(x)))).mean(1))


@pytest.mark.parametrize("gram", ["always", "never"])
def test_bf16_fast_hypergradient_within_two_percent_of_float32(gram):
    torch.manual_seed(0)
    trainer = _bf16_trainer(TokenMixer())
    batches = [as_batch(b) for b in trainer.train_loader]
    problem = lambda: trainer.build_problem(batches[:1], batches[1])  # noqa: E731
    exact = torch.cat([g.reshape(-1) for g in Fast(gram=gram)(problem()).grads])
    trainer.precision = Precision("bf16", torch.device("cpu"))
    method = Fast(gram=gram)
    low = torch.cat([g.reshape(-1) for g in method(problem()).grads])
    assert "jvp" not in method.last_paths.values()
    rel = float((low - exact).norm() / exact.norm())
    print(f"bf16 fast hypergradient relative error {rel:.2e} (gram={gram})")
    assert 0 < rel < 2e-2, rel


def test_bf16_training_with_fast_runs():
    trainer = _bf16_trainer(TokenMixer())
    trainer.precision = Precision("bf16", torch.device("cpu"))
    history = trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert torch.isfinite(torch.tensor(history[-1]["train_loss"]))
