"""Calling a model on a batch's inputs and reading its logits: the one place where Hugging Face models are adapted.

Conventions (every objective, loss, evaluation and hypergradient method relies on them):

- **Inputs.** A tensor is passed as the single argument, ``model(x)``; a tuple or list is passed *positionally*,
  ``model(*inputs)``; a dict (e.g. the ``input_ids`` / ``attention_mask`` / ``token_type_ids`` of a
  ``DataCollatorWithPadding`` batch) is passed as *keyword arguments*, ``model(**inputs)``, keeping only the keys
  the model's ``forward`` names (as Hugging Face's ``Trainer`` drops unused columns), so per-sample extras such as
  ``domain`` or ``noisy`` that travel in the same dict never reach the model.
- **Outputs.** Losses receive *logits*: a tensor output is used as is; an object or dict with ``logits`` (a Hugging
  Face ``ModelOutput``) gives its ``logits``; any other output (a tuple, say) is passed through unchanged for a
  custom ``loss_fn``. An output that is a ``ModelOutput`` without logits (a bare encoder) is an error that says so.
- **Attention and experts kernels.** Virtual passes (the bound forwards of :func:`~metareweight.core.problem.bind`)
  run under :func:`math_attention`, which selects PyTorch's differentiable "math" kernel for
  ``scaled_dot_product_attention``: the fused CPU/GPU kernels (HF's default ``attn_implementation="sdpa"``) have
  neither a double-backward (unrolled, Neumann) nor a forward-mode rule (``fast``); and under :func:`eager_experts`,
  which runs a mixture-of-experts model's experts (Mixtral, Qwen-MoE, GPT-OSS, ...) as HF's ``"eager"`` loop: its
  default ``grouped_mm`` kernel has no forward-mode rule. Real steps and evaluation keep the default kernels.

Example:
    >>> import torch
    >>> class Tagger(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return {"logits": input_ids.float() * attention_mask}
    >>> forward = model_forward(Tagger())
    >>> forward({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "domain": torch.zeros(2)}).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ContextManager, Mapping, Optional, Tuple

import torch
from torch import nn


class ModelOutputError(ValueError):
    """The model's output has no logits the losses can use; the message names what it returned."""


class ModelInputError(TypeError):
    """The batch's inputs do not match what the model's ``forward`` takes; the message names the keys."""


class ModelConfigError(ValueError):
    """The model's own configuration cannot run the batch (a Hugging Face decoder classifier without a pad token);
    the message names the setting and how to set it."""


@contextlib.contextmanager
def explained_model_errors(model: Any, inputs: Any = None):
    """Re-raise what a Hugging Face ``model`` raises for a setting of its own that the batch needs as a
    :class:`ModelConfigError` that names the fix: a classifier that reads each sequence's last token (GPT-2, Llama,
    Mistral, ...) with no ``pad_token_id`` in its config; one that reads each sequence's last ``eos`` token (BART)
    given sequences without it; token ids beyond its vocabulary (another model's tokenizer); sequences longer than
    its position embeddings (no truncation). Anything else propagates.

    Example:
        >>> class Decoder(nn.Module):
        ...     config = type("Config", (), {"pad_token_id": None})()
        ...     def forward(self, input_ids):
        ...         raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        >>> with explained_model_errors(Decoder()):
        ...     Decoder()(torch.zeros(2, 3))
        Traceback (most recent call last):
        ...
        metareweight.models.ModelConfigError: Decoder has no pad_token_id in its config, ...
    """
    try:
        yield
    except (ValueError, IndexError, RuntimeError) as error:
        config = getattr(model, "config", None)
        fix = None if config is None else _config_fix(type(model).__name__, config, inputs, error)
        if fix is None:
            raise
        raise ModelConfigError(fix) from None


#: what torch says where a lookup or a position table is read beyond its size
_LOOKUP_ERRORS = ("index out of range", "out of bounds", "must match the size")


def _config_fix(name: str, config: Any, inputs: Any, error: Exception) -> Optional[str]:
    """What to change, where the model's error comes from a setting of its config the batch does not fit."""
    if isinstance(error, ValueError) and "padding token" in str(error) and getattr(config, "pad_token_id", 0) is None:
        return (f"{name} has no pad_token_id in its config, so it cannot tell where a padded sequence ends (it "
                "classifies from each sequence's last non-padding token); set model.config.pad_token_id = "
                "tokenizer.pad_token_id (for a tokenizer without a pad token, first tokenizer.pad_token = "
                "tokenizer.eos_token)")
    if isinstance(error, ValueError) and "number of <eos> tokens" in str(error):
        return (f"{name} classifies from each sequence's last end-of-sequence token (config.eos_token_id="
                f"{getattr(config, 'eos_token_id', None)}), and the batch's sequences hold different numbers of it: "
                "tokenize with the model's own tokenizer (it ends every sequence with that token), keep it when "
                "truncating, or set config.eos_token_id to your tokenizer's eos_token_id")
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if not (torch.is_tensor(ids) and ids.dim() >= 2 and ids.numel() and not ids.is_floating_point()
            and any(text in str(error) for text in _LOOKUP_ERRORS)):
        return None
    vocab, positions = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
    if isinstance(vocab, int) and int(ids.max()) >= vocab:
        return (f"the batch has token id {int(ids.max())}, but {name}'s vocabulary has {vocab} entries: tokenize "
                "with the model's own tokenizer (after adding tokens to it, model.resize_token_embeddings("
                "len(tokenizer)))")
    if isinstance(positions, int) and ids.shape[1] > positions - 2:  # (RoBERTa-like models use two for padding)
        return (f"the batch has sequences of {ids.shape[1]} tokens, but {name} has {positions} position "
                "embeddings: tokenize with truncation=True, max_length=tokenizer.model_max_length (or less)")
    return None


def _signature_names(fn: Callable) -> Tuple[Optional[set], bool]:
    """(named parameters of ``fn``, whether it also takes ``**kwargs``); names None if it cannot be inspected."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


_ACCEPTED: "dict[type, Optional[frozenset]]" = {}


def accepted_keys(model: Callable) -> Optional[frozenset]:
    """The keyword inputs ``model`` accepts, or ``None`` to pass every key (a forward that names none).

    A PEFT wrapper forwards to its base model, so the base model's names count too (``token_type_ids`` is not in
    ``PeftModel.forward``'s own signature). Cached per model class.
    """
    key = type(model)
    if key in _ACCEPTED and not hasattr(model, "get_base_model"):
        return _ACCEPTED[key]
    fn = model.forward if isinstance(model, nn.Module) else model
    names, _ = _signature_names(fn)
    base = getattr(model, "get_base_model", None)
    if callable(base):
        more, _ = _signature_names(base().forward)
        names = (names or set()) | (more or set())
    names = (names or set()) - {"labels", "label", "return_dict", "output_attentions", "output_hidden_states"}
    out = frozenset(names) if names else None
    if not hasattr(model, "get_base_model"):
        _ACCEPTED[key] = out
    return out


def model_kwargs(model: Callable, inputs: Mapping[str, Any]) -> dict:
    """The entries of a dict of inputs that ``model`` takes as keyword arguments (see module docs)."""
    keep = accepted_keys(model)
    if keep is None:
        return dict(inputs)
    kwargs = {k: v for k, v in inputs.items() if k in keep}
    if not kwargs:
        raise ModelInputError(f"none of the batch's input keys {sorted(inputs)} is an argument of "
                              f"{type(model).__name__}.forward (it takes {sorted(keep)}); name the batch fields "
                              "after the model's arguments (input_ids, attention_mask, ...)")
    return kwargs


def call_model(model: Callable, inputs: Any) -> Any:
    """``model`` called on ``inputs``: a dict as keyword arguments, a tuple/list positionally, anything else as
    the single argument. Returns the model's raw output (a setting the batch needs and the model lacks:
    :class:`ModelConfigError`)."""
    with explained_model_errors(model, inputs):
        if isinstance(inputs, Mapping):
            return model(**model_kwargs(model, inputs))
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


def logits_of(output: Any) -> Any:
    """The logits in a model's output: a tensor as is, ``output.logits`` / ``output["logits"]`` for a Hugging Face
    ``ModelOutput`` or a dict; other outputs (tuples, ...) unchanged for a custom ``loss_fn``.

    Example:
        >>> logits_of({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise ModelOutputError(f"the model returned a {type(output).__name__} without 'logits' (keys: "
                               f"{sorted(output)}); losses receive logits: use a model with a task head (e.g. "
                               "AutoModelForSequenceClassification) or return a tensor of logits")
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    return output


def model_forward(model: Callable) -> Callable[[Any], Any]:
    """``model`` as a function of a batch's inputs that returns logits (idempotent).

    Objectives always call ``forward(batch.inputs)``: the trainer hands them ``model_forward(model)`` in real steps
    and evaluation, and hypergradient methods a bound forward (:func:`~metareweight.core.problem.bind`) that
    follows the same conventions.
    """
    if getattr(model, "_metareweight_forward", False):
        return model

    def forward(inputs, *more):
        return logits_of(call_model(model, (inputs, *more) if more else inputs))

    forward._metareweight_forward = True  # type: ignore[attr-defined]
    return forward


def math_attention() -> ContextManager:
    """Select the differentiable math kernel of ``scaled_dot_product_attention`` (for virtual passes that need a
    double backward or forward-mode derivatives); a no-op on PyTorch versions without ``torch.nn.attention``.

    Example:
        >>> with math_attention():
        ...     q = torch.randn(1, 2, 4, 8, requires_grad=True)
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> g, = torch.autograd.grad(out.sum(), q, create_graph=True)
        >>> g.requires_grad
        True
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def fused_experts(model: nn.Module) -> list:
    """The Hugging Face configs in ``model`` whose mixture-of-experts layers run a fused kernel (an
    ``_experts_implementation`` other than ``"eager"``: ``grouped_mm`` by default, which has no forward-mode
    derivative and no float64).

    Example:
        >>> fused_experts(nn.Linear(2, 2))
        []
    """
    configs = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(getattr(config, "_experts_implementation", None), str) \
                and config._experts_implementation != "eager":
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def eager_experts(configs: list):
    """While open, the mixture-of-experts layers of ``configs`` (from :func:`fused_experts`) run Hugging Face's
    ``"eager"`` experts (a loop over the experts, with every derivative), as :func:`math_attention` selects the
    differentiable attention kernel for virtual passes."""
    before = [config._experts_implementation for config in configs]
    try:
        for config in configs:
            config._experts_implementation = "eager"
        yield
    finally:
        for config, value in zip(configs, before):
            config._experts_implementation = value


__all__ = ["model_forward", "call_model", "logits_of", "model_kwargs", "accepted_keys", "math_attention",
           "explained_model_errors", "fused_experts", "eager_experts", "ModelOutputError", "ModelInputError",
           "ModelConfigError"]
