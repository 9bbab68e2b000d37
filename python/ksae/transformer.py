"""A Hugging Face ``transformers`` model seen from one layer: load it, read the layer's
activations, or replace them (the ``hf`` extra: torch and transformers; importing this
module imports neither until a function needs them).

A layer is named either by a ``hidden_states`` index (``"3"``: the residual stream that
``output_hidden_states=True`` returns at that index, the input of block 3; index 0 is the
embeddings' output) or by a module path (``"encoder.layer.3.output"``,
``"transformer.h.3.mlp"``: that module's output, read with a forward hook). A read stops
the forward right after the layer, so the layers above it cost nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def require_hf() -> None:
    """Raise ImportError with the install line when torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"this needs the 'hf' extra (torch and transformers): "
                          f"pip install 'ksae[hf]' ({exc})") from None


@dataclass
class LoadedModel:
    """A model, its tokenizer and what the store records of them."""

    model: Any
    tokenizer: Any
    name: str
    revision: str | None
    causal: bool
    prefix: list[int]  # special token ids the tokenizer puts before a text
    suffix: list[int]  # and after it

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.suffix)

    @property
    def pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def load_model(name: str, *, revision: str | None = None, torch_dtype: str = "float32") -> LoadedModel:
    """The model and tokenizer ``name`` (a local directory, or a hub name where a network
    or cache exists), in eval mode: a causal LM with its head where the config names one
    (for the spliced-in loss), otherwise the bare model."""
    require_hf()
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name, revision=revision)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, revision=revision)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model: cannot load {name!r} ({exc})") from None
    causal = any(a.endswith(CAUSAL_SUFFIXES) for a in (config.architectures or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(name, revision=revision, dtype=getattr(torch, torch_dtype))
    model.eval()
    prefix, suffix = special_template(tokenizer)
    return LoadedModel(model, tokenizer, name, revision, causal, prefix, suffix)


def special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text ([CLS] and [SEP] for
    BERT, a BOS for Llama, none for GPT-2), found by tokenizing a word both ways."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


def blocks(model: Any) -> Any:
    """The model's list of transformer blocks (the ModuleList as long as its layer count)."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"layer: found no list of {n} blocks in {type(model).__name__}; name the "
                     "layer by a module path")


def check_layer(model: Any, layer: str) -> None:
    """Raise ValueError unless ``layer`` names a hidden_states index or a module of ``model``."""
    if layer.lstrip("-").isdigit():
        n = model.config.num_hidden_layers
        if not 0 <= int(layer) <= n:
            raise ValueError(f"layer: hidden_states index {layer} is out of range 0..{n}")
        return
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"layer: {type(model).__name__} has no module {layer!r} (a hidden_states "
                         "index or a path from model.named_modules())") from None


class _Stop(Exception):
    """Raised by a hook to end the forward after the layer was read."""


Edit = Callable[[Any], Any]  # a (batch, seq, d) tensor -> a tensor of the same shape


@contextlib.contextmanager
def _hooked(model: Any, layer: str, edit: Edit, stop: bool) -> Iterator[None]:
    """Apply ``edit`` to the layer's activations (and stop after it when ``stop``)."""
    def apply(hidden: Any) -> Any:
        new = edit(hidden)
        if stop:
            raise _Stop
        return new

    if layer.isdigit() and int(layer) < model.config.num_hidden_layers:
        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> Any:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}
        handle = blocks(model)[int(layer)].register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif not layer.isdigit():
        def hook(_module: Any, _args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (apply(output[0]), *output[1:])
            return apply(output)
        handle = model.get_submodule(layer).register_forward_hook(hook)
    else:
        raise ValueError(f"layer: hidden_states index {layer} (the last, after the final norm) "
                         "cannot be hooked; name a module path instead")
    try:
        yield
    finally:
        handle.remove()


def read_layer(model: Any, layer: str, inputs: dict[str, Any]) -> np.ndarray:
    """The layer's activations (batch, seq, d) as float32, the forward stopped after it."""
    import torch

    captured: list[Any] = []

    def keep(hidden: Any) -> Any:
        captured.append(hidden)
        return hidden

    with torch.inference_mode():
        if layer.isdigit() and int(layer) == model.config.num_hidden_layers:
            out = model(**inputs, output_hidden_states=True)
            captured.append(out.hidden_states[int(layer)])
        else:
            with _hooked(model, layer, keep, stop=True), contextlib.suppress(_Stop):
                model(**inputs)
    if not captured:
        raise ValueError(f"layer: {layer!r} was not reached by the forward")
    return captured[0].float().numpy()


def run_with_layer(model: Any, layer: str, inputs: dict[str, Any], edit: Edit | None) -> Any:
    """The model's full output with the layer's activations passed through ``edit``
    (None: the clean run)."""
    import torch

    with torch.inference_mode():
        if edit is None:
            return model(**inputs)
        with _hooked(model, layer, edit, stop=False):
            return model(**inputs)


def batch_inputs(sequences: list[list[int]], pad_id: int) -> dict[str, Any]:
    """``input_ids`` and ``attention_mask`` for token sequences, padded on the right."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def vocabulary(tokenizer: Any) -> list[str]:
    """Each token id's display text: a WordPiece continuation ("##ing") without its marks
    and other WordPiece tokens after a space; otherwise what the tokenizer decodes."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    if any(isinstance(p, str) and p.startswith("##") for p in pieces):
        return [p[2:] if p.startswith("##") else " " + p for p in pieces]
    return [tokenizer.decode([i]) for i in range(n)]
