"""CLIP text conditioning for Stable Cascade: the real CLIP BPE tokenizer (offline) and the bigG text encoder.

Stage C is conditioned on `clip_text` (the last transformer layer's output *before* the final layer norm, (B, 77, 1280))
and `clip_text_pooled` (the projected EOS token, (B, 1, 1280)); Stage B uses only `clip_text_pooled`. Unconditional
inputs are the same encoder applied to "" (not zeros).

References:
- Stability-AI/StableCascade `train/base.py` (`get_conditions`: tokenizer with padding="max_length", truncation,
  max_length=77, attention_mask passed, `hidden_states[-1]` and `text_embeds.unsqueeze(1)`).
- huggingface/diffusers `pipelines/stable_cascade/pipeline_stable_cascade_prior.py` (`encode_prompt`, same outputs).
- openai/CLIP `clip/simple_tokenizer.py` (how `bpe_simple_vocab_16e6.txt.gz` becomes the vocab and merges).
"""

from __future__ import annotations

import copy
import gzip
import json
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # openai/CLIP: vocab 49408 = 2 * 256 byte symbols + merges + 2 special tokens

_TRANSFORMERS = Version(transformers.__version__)
# transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`; 5.x logs a deprecation for the old name.
_DTYPE_KWARG = "dtype" if Version("4.56") <= _TRANSFORMERS else "torch_dtype"
# transformers 5 has one tokenizers-backed CLIPTokenizer (CLIPTokenizerFast is an alias of it); in 4.x CLIPTokenizer
# is the slow Python class, so we use the fast one everywhere: the same ids under both versions.
CLIPTokenizer = CLIPTokenizerFast


# --------------------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """openai/CLIP's reversible byte -> printable unicode map (the 256 base symbols of the BPE vocabulary)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to code points 256.. so every symbol is a visible character
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The OpenAI CLIP BPE tokenizer (49,408 tokens) as Stable Cascade configures it, built from the bundled file.

    Cached and shared by every TextEncoder built without a tokenizer: `copy.deepcopy` it before `add_tokens`.
    """
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a "#version" header
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    special = dict(bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=MAX_LENGTH)
    if _TRANSFORMERS.major >= 5:
        # transformers 5 takes the vocab and merges themselves; `vocab_file=`/`merges_file=` are silently ignored
        # (leaving a 3-token vocabulary), hence the size check below.
        tok = CLIPTokenizer(vocab=vocab, merges=merges, **special)
    else:  # transformers 4 only reads files
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
            vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
            merges_file.write_text("\n".join([lines[0], *(" ".join(m) for m in merges)]) + "\n", encoding="utf-8")
            tok = CLIPTokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file), **special)
    if len(tok) != len(vocab) or tok.bos_token_id != 49406 or tok.pad_token_id != 49407:
        raise RuntimeError(f"CLIPTokenizer ignored the vocabulary: {len(tok)} tokens, expected {len(vocab)}")
    return tok


def save_tokenizer(directory: str | Path, tokenizer: CLIPTokenizer | None = None) -> Path:
    """Write `tokenizer` (default: `clip_tokenizer()`) as the official repos' `tokenizer/` folder.

    Besides `save_pretrained`'s tokenizer.json + tokenizer_config.json, writes vocab.json and merges.txt so that older
    transformers (slow tokenizer) and other CLIP readers load the folder too.
    """
    directory = Path(directory)
    tokenizer = tokenizer or clip_tokenizer()
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.model.save(str(directory))  # BPE model -> vocab.json, merges.txt
    return directory


# ------------------------------------------------------------------------------------------------------ text encoder
@dataclass
class TextEmbeddings:
    clip_text: torch.Tensor  # (B, 77, hidden): last layer output before final_layer_norm
    clip_text_pooled: torch.Tensor  # (B, 1, projection_dim): projected EOS token
    truncated: list[bool]  # prompt longer than 77 tokens (incl. bos/eos) and cut
    num_tokens: list[int]  # tokens before truncation, incl. bos/eos


class TextEncoder(nn.Module):
    """CLIPTextModelWithProjection + its tokenizer; `encode(prompts)` gives Stable Cascade's text conditioning."""

    def __init__(self, model: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer or clip_tokenizer()
        self.eval()  # inference only: CLIP's dropout is 0, but keep the flag honest

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        return self(prompts)

    def forward(self, prompts: list[str]) -> TextEmbeddings:
        """encode() with gradients (training a LoRA's token rows)."""
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        prompts = list(prompts)
        # Untruncated lengths, so callers can report truncation instead of losing the tail of a prompt silently.
        num_tokens = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=MAX_LENGTH,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.model.device
        out = self.model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            output_hidden_states=True,
        )
        # hidden_states = (embeddings, layer 1, ..., layer N): [-1] is the last layer, before final_layer_norm.
        clip_text = out.hidden_states[-1]  # (B, 77, hidden)
        clip_text_pooled = out.text_embeds.unsqueeze(1)  # (B, 1, projection_dim)
        return TextEmbeddings(clip_text, clip_text_pooled, [n > MAX_LENGTH for n in num_tokens], num_tokens)


def build_text_encoder(config: CLIPTextConfig, seed: int | None = None) -> TextEncoder:
    """A randomly initialised text encoder (deterministic given `seed`) with the real tokenizer."""
    config = copy.deepcopy(config)  # the model writes into its config (attention implementation); keep presets clean
    if seed is None:
        return TextEncoder(CLIPTextModelWithProjection(config))
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        return TextEncoder(CLIPTextModelWithProjection(config))


def _add_variant(name: str, variant: str | None) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}" if variant else name


def load_text_encoder(
    text_encoder_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    variant: str | None = None,
) -> TextEncoder:
    """Load the diffusers-layout `text_encoder/` folder (config.json + safetensors, possibly sharded) and `tokenizer/`.

    `variant` selects e.g. `model.bf16.safetensors`. Without a `tokenizer_dir` (or if it does not exist) the bundled
    `clip_tokenizer()` is used: it is the same tokenizer the official repos ship.
    """
    path = Path(text_encoder_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder {path} not found (expected config.json + model.safetensors)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found (the CLIPTextConfig of the text encoder)")
    weights = [_add_variant("model.safetensors", variant), _add_variant("model.safetensors.index.json", variant)]
    if not any((path / w).is_file() for w in weights):
        raise FileNotFoundError(f"no weights in {path}: expected {' or '.join(weights)} (safetensors only)")
    model, info = CLIPTextModelWithProjection.from_pretrained(
        path, local_files_only=True, use_safetensors=True, variant=variant, output_loading_info=True,
        **{_DTYPE_KWARG: dtype},
    )  # fmt: skip
    if info["missing_keys"]:  # transformers fills them at random and carries on: another file in this slot
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"not a CLIP text encoder's weights: {len(missing)} of its parameters are missing from the file "
            f"(such as {missing[0]})"
        )
    tokenizer = None
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    elif tokenizer_dir is not None:
        warnings.warn(f"tokenizer folder {tokenizer_dir} not found; using the bundled CLIP tokenizer", stacklevel=2)
    return TextEncoder(model.to(device), tokenizer)


# ----------------------------------------------------------------------------------------------------------- presets
_SPECIAL_IDS = dict(pad_token_id=49407, bos_token_id=49406, eos_token_id=49407)

# Tiny model for tests and the built-in tiny pipeline: 1.6M params, nearly all the 49408x32 token embedding (6 MB).
# hidden/projection 32 match the tiny Stage B/C clip inputs.
TINY_TEXT_CONFIG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=32,
    hidden_act="gelu",
    **_SPECIAL_IDS,
)

# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower, as in stabilityai/stable-cascade(-prior) `text_encoder/`.
BIGG_TEXT_CONFIG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=1280,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    **_SPECIAL_IDS,
)
