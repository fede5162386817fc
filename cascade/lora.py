"""LoRA for Stage C, as the reference's `modules/lora.py`: low-rank updates of the attention projections, plus
learned token embeddings for new words ("a [zorp]"); optionally low-rank updates of Stage B's attention as well.

- `LoRA`: a weight parametrisation W + (up @ down) * alpha / rank, on every module whose name contains one of the
  filters (the reference trains with `module_filters: ['.attn']`: each attention's packed q/k/v `in_proj_weight` and
  its `out_proj.weight`). `down` starts at zero, so training starts from the base model exactly.
- `ReToken`: a parametrisation of the text encoder's token embedding that adds a learned row to each listed token.
  New words are added to the tokenizer first, their rows starting from the mean of some existing words' rows (the
  reference's `train_tokens: [['[fernando]', '^dog</w>']]`).
- The decoder part (not in the reference): the same updates on Stage B's attention, which reads the pooled text.
  The reference needs none, since its Stage B draws from a 24 x 24 semantic latent and has seen every kind of
  image; a small family's 4 x 4 latent does not carry a new shape's outline, so its Stage B must learn the word too.

A trained LoRA is one safetensors file: `weights.{i}.lora_down`/`lora_up` per adapted layer, numbered as the
reference's checkpoint (`adapted_layers`; files written before 2026-11-29 number them the other way round within an
attention, and still load: the metadata names each index's layer), and
`embeddings.embeddings`/`embeddings.indices` (the reference's ModuleDict names), plus `tokens.init`: the starting rows
of the new words, so loading needs no word lists, and `decoder.weights.{i}.*` for the decoder part if it has one.
The metadata names the layers, rank, alpha and tokens. `apply_lora_file(models, path)` merges it into whichever
halves of a family are loaded (text encoder + Stage C; Stage B): no cost per image.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from .weights import WeightsError, read_header, save_safetensors

FILTERS = (".attn",)  # the reference's module_filters
_METADATA = "cascade.lora"


def low_rank_delta(up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    return (up @ down) * scale


class LoRA(nn.Module):
    """W -> W + (up @ down) * alpha / rank, for a Linear's (out, in) weight or an attention's packed in_proj."""

    def __init__(self, weight: torch.Tensor, rank: int = 4, alpha: float = 1.0):
        super().__init__()
        self.lora_down = nn.Parameter(torch.zeros(rank, weight.shape[1], dtype=weight.dtype, device=weight.device))
        self.lora_up = nn.Parameter(torch.randn(weight.shape[0], rank, dtype=weight.dtype, device=weight.device))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return low_rank_delta(self.lora_up, self.lora_down, self.scale)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta()


class ReToken(nn.Module):
    """Adds a learned row to the embedding of each token in `indices`."""

    def __init__(self, indices: list[int], dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(len(indices), dim, dtype=dtype, device=device))
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_add(0, self.indices, self.embeddings)


def adapted_layers(model: nn.Module, filters=FILTERS) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of each weight a LoRA adapts, in the reference checkpoint's order: its
    `weights.{i}` are the LoRA modules in `generator.modules()` order, where a packed `in_proj_weight`'s comes after
    the module's children (its parametrization is registered on the attention after `out_proj` exists), so each
    attention gives out_proj at an even index and in_proj at the odd one after it."""
    found, pending = [], []  # pending: in_proj weights, listed once their module's children have been
    for name, module in model.named_modules():
        while pending and not name.startswith(pending[-1][0] + "."):
            found.append(pending.pop())
        if not any(f in name for f in filters):
            continue
        for param in ("weight", "in_proj_weight"):
            if isinstance(getattr(module, param, None), nn.Parameter) and getattr(module, param).dim() == 2:
                (pending if param == "in_proj_weight" else found).append((name, module, param))
                break
    return found + pending[::-1]


def add_tokens(text_encoder, words: list[str], init_from: list[str]) -> list[int]:
    """Add `words` to the tokenizer (each one token) with rows starting at the mean of `init_from`'s rows (the
    words must be single tokens); returns the new words' ids. Words already known keep their rows."""
    tokenizer, model = text_encoder.tokenizer, text_encoder.model
    if getattr(model.text_model, "eos_token_id", None) == 2:
        # Configs from before transformers#24773 pool at argmax(token id), which an added word (a higher id) would
        # take; pool at the first end-of-text token instead: the same position for every prompt without new words.
        model.text_model.eos_token_id = tokenizer.eos_token_id
    table = model.get_input_embeddings().weight
    sources = []
    for word in init_from:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"init_from: {word!r} is {len(ids)} tokens; use words that are one token each")
        sources += ids
    start = table[sources].mean(dim=0, keepdim=True).detach() if sources else torch.zeros_like(table[:1])
    new = [w for w in words if w not in tokenizer.get_vocab()]
    if new:
        # The bundled tokenizer is one object shared by every text encoder: give this one its own before it grows.
        tokenizer = text_encoder.tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(new)
    old_rows = table.shape[0]
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[old_rows:] = start
    return [tokenizer.convert_tokens_to_ids(w) for w in words]


@dataclass
class Adapter:
    """A LoRA being trained: the parametrisations registered on the models, and how to save them."""

    layers: list[tuple[str, nn.Module, str]]
    loras: list[LoRA]
    retoken: ReToken
    words: list[str]
    token_init: torch.Tensor
    rank: int
    alpha: float
    filters: tuple[str, ...]
    decoder_layers: list[tuple[str, nn.Module, str]]  # Stage B's; empty for a Stage C LoRA (the reference's)
    decoder_loras: list[LoRA]
    decoder_rank: int

    def modules(self) -> list[nn.Module]:
        """What training updates: the low-rank factors of both stages and the new words' rows."""
        return [*self.loras, self.retoken, *self.decoder_loras]

    def parameters(self) -> list[nn.Parameter]:
        return [p for module in self.modules() for p in module.parameters()]

    def save(self, path: Path) -> None:
        tensors = {"embeddings.embeddings": self.retoken.embeddings, "embeddings.indices": self.retoken.indices}
        for prefix, loras in (("", self.loras), ("decoder.", self.decoder_loras)):
            for i, lora in enumerate(loras):
                tensors[f"{prefix}weights.{i}.lora_down"] = lora.lora_down
                tensors[f"{prefix}weights.{i}.lora_up"] = lora.lora_up
        tensors["tokens.init"] = self.token_init
        info = {
            "rank": self.rank,
            "alpha": self.alpha,
            "filters": list(self.filters),
            "layers": [f"{name}.{param}" for name, _, param in self.layers],
            "tokens": self.words,
        }
        if self.decoder_loras:
            info["decoder_rank"] = self.decoder_rank
            info["decoder_layers"] = [f"{name}.{param}" for name, _, param in self.decoder_layers]
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        save_safetensors(tensors, path, metadata={"cascade.kind": "lora", _METADATA: json.dumps(info)})


def _check_rank(model: nn.Module, rank: int, filters, name: str) -> None:
    """up @ down has rank at most the layer's width: a larger rank only adds parameters."""
    layers = adapted_layers(model, filters)
    narrowest = min((min(getattr(module, param).shape) for _, module, param in layers), default=rank)
    if rank > narrowest:
        raise ValueError(
            f"{name}: {rank} is not allowed: the narrowest layer it adapts is {narrowest} wide; use 1 to {narrowest}"
        )


def _attach_layers(model: nn.Module, rank: int, alpha: float, filters) -> tuple[list, list[LoRA]]:
    layers = adapted_layers(model, filters)
    loras = []
    for _, module, param in layers:
        lora = LoRA(getattr(module, param), rank, alpha)
        parametrize.register_parametrization(module, param, lora)
        loras.append(lora)
    return layers, loras


def attach(
    models,
    words: list[str],
    init_from: list[str],
    rank: int = 4,
    alpha: float = 1.0,
    filters=FILTERS,
    decoder_rank: int = 0,
) -> Adapter:
    """Register a fresh LoRA on `models` (text encoder + Stage C, and Stage B's attention when `decoder_rank` > 0)
    for training; everything else is frozen."""
    _check_rank(models.stage_c, rank, filters, "rank")  # before any change to the models
    if decoder_rank > 0:
        if models.stage_b is None:
            raise ValueError("decoder_rank > 0 adapts Stage B: load the decoder half too")
        _check_rank(models.stage_b, decoder_rank, filters, "decoder_rank")
    for model in (models.text_encoder.model, models.stage_c, models.stage_b, models.stage_a, models.effnet):
        if model is not None:
            model.requires_grad_(False)
    ids = add_tokens(models.text_encoder, words, init_from)
    embedding = models.text_encoder.model.get_input_embeddings()
    token_init = embedding.weight[ids].detach().clone()
    retoken = ReToken(ids, embedding.weight.shape[1], embedding.weight.dtype, embedding.weight.device)
    parametrize.register_parametrization(embedding, "weight", retoken)
    layers, loras = _attach_layers(models.stage_c, rank, alpha, filters)
    decoder_layers, decoder_loras = [], []
    if decoder_rank > 0:
        decoder_layers, decoder_loras = _attach_layers(models.stage_b, decoder_rank, alpha, filters)
    return Adapter(
        layers, loras, retoken, words, token_init, rank, alpha, tuple(filters), decoder_layers, decoder_loras,
        decoder_rank,
    )  # fmt: skip


def lora_info(path: str | Path) -> dict:
    """A LoRA file's description (layers, rank, alpha, words) from its header alone; names the file if it is none."""
    path = Path(path)
    _, metadata = read_header(path)  # checks it is a safetensors file, names the file otherwise
    if metadata.get("cascade.kind") != "lora" or _METADATA not in metadata:
        raise WeightsError(f"{path}: not a LoRA file of this project (no {_METADATA} metadata)")
    return json.loads(metadata[_METADATA])


def read_lora(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    info = lora_info(path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return info, tensors


def _deltas(path: Path, model: nn.Module, info: dict, tensors, prefix: str, stage: str) -> list:
    """(weight, delta) for each layer the file adapts in `model`; a layer it lacks, or of another shape, refuses the
    file (naming the layer) before anything changes."""
    rank = info["decoder_rank"] if prefix else info["rank"]
    names = info["decoder_layers"] if prefix else info["layers"]
    layers = {f"{n}.{p}": (m, p) for n, m, p in adapted_layers(model, tuple(info["filters"]))}
    deltas = []
    for i, name in enumerate(names):
        if name not in layers:
            raise WeightsError(f"{path}: layer {name} is not in this model's {stage}; the LoRA is for another model")
        module, param = layers[name]
        weight = getattr(module, param)
        up, down = tensors[f"{prefix}weights.{i}.lora_up"], tensors[f"{prefix}weights.{i}.lora_down"]
        delta = low_rank_delta(up, down, info["alpha"] / rank)
        if delta.shape != weight.shape:
            raise WeightsError(
                f"{path}: {stage} {name} is {tuple(delta.shape)} in the LoRA, {tuple(weight.shape)} here; "
                "the LoRA is for another model"
            )
        deltas.append((weight, delta))
    return deltas


@torch.no_grad()
def apply_lora_file(models, path: str | Path, strength: float = 1.0) -> list[str]:
    """Merge a LoRA file into the halves of a family that are loaded: the text encoder and Stage C (the prior half),
    and Stage B (the decoder half) where the file has a decoder part. Returns its new words. A file made for another
    model (layers or shapes that do not match) is refused before anything changes; so is a file already merged into
    these models (its updates would be added twice; its token rows only set again)."""
    path = Path(path)
    info, tensors = read_lora(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest in models.loras:
        raise ValueError(
            f"{path}: already merged into these models (a second merge would add its updates twice); load the models "
            "again to merge it at another strength"
        )
    prior = models.stage_c is not None and models.text_encoder is not None
    if not prior and models.stage_b is None:
        raise ValueError("a LoRA adapts the prior half (text encoder + Stage C) or Stage B: load one of them")
    deltas = _deltas(path, models.stage_c, info, tensors, "", "Stage C") if prior else []
    if models.stage_b is not None and info.get("decoder_layers"):
        deltas += _deltas(path, models.stage_b, info, tensors, "decoder.", "Stage B")
    words = info["tokens"]
    if len(tensors["embeddings.indices"]) != len(words):
        raise WeightsError(f"{path}: {len(tensors['embeddings.indices'])} token rows for {len(words)} words")
    if prior:
        embedding = models.text_encoder.model.get_input_embeddings()
        if tensors["embeddings.embeddings"].shape[1] != embedding.weight.shape[1]:
            raise WeightsError(f"{path}: token rows of width {tensors['embeddings.embeddings'].shape[1]}, the text "
                               f"encoder's are {embedding.weight.shape[1]}; the LoRA is for another model")  # fmt: skip
        ids = add_tokens(models.text_encoder, words, [])
        embedding = models.text_encoder.model.get_input_embeddings()
        for row, token in enumerate(ids):
            base = tensors["tokens.init"][row].to(embedding.weight)
            embedding.weight[token] = base + strength * tensors["embeddings.embeddings"][row].to(embedding.weight)
    for weight, delta in deltas:
        weight.add_(delta.to(weight) * strength)
    models.loras.append(digest)
    return words if prior else []  # (a decoder half has no text encoder: no words were added)
