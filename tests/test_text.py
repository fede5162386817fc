"""Tests for cascade/text.py: the offline CLIP tokenizer and the text encoder (tiny random-weight model, CPU)."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from cascade.text import (
    BIGG_TEXT_CONFIG,
    TINY_TEXT_CONFIG,
    build_text_encoder,
    clip_tokenizer,
    load_text_encoder,
    save_tokenizer,
)

ASTRONAUT = "a photo of an astronaut riding a horse on mars"
ASTRONAUT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]

# Expected ids produced by open_clip's SimpleTokenizer (OpenAI's reference implementation) on the same vocabulary file;
# `decoded` is what decoding gives back after CLIP's lowercasing and whitespace cleaning.
UNICODE_CASES = [
    (
        "Crème brûlée à la française, naïve café",
        "49406 1075 12138 614 711 127 119 75 13489 21259 1210 38381 30505 267 1097 35689 563 15304 49407",
        "crème brûlée à la française , naïve café",
    ),
    (
        "東京タワーの夜景、写真",
        "49406 48338 21078 105 34941 2429 107 13457 21575 23170 250 48132 363 45262 44653 33440 509 49407",
        "東京タワーの夜景 、 写真",
    ),
    (
        "日本語 한국어 中文",
        "49406 39121 44353 34002 508 15197 250 31871 255 31625 368 19759 255 29032 485 49407",
        "日本語 한국어 中文",
    ),
    (
        "a cat 🐱 riding a 🚀!!! #space",
        "49406 320 2368 22979 6765 320 22400 995 258 2138 49407",
        "a cat 🐱 riding a 🚀!!! # space",
    ),
    (
        "Ünïcödé ÅNGSTRÖM straße",
        "49406 6522 77 35689 66 7255 67 4166 23176 10352 807 7255 332 1894 127 253 324 49407",
        "ünïcödé ångström straße",
    ),
    ("Hello,   World\n\tTAB", "49406 3306 267 1002 14724 49407", "hello , world tab"),
]


@pytest.fixture(scope="module")
def encoder():
    return build_text_encoder(TINY_TEXT_CONFIG, seed=0)


def _ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]


# --------------------------------------------------------------------------------------------------------- tokenizer
def test_known_ids_padded_to_77():
    (ids,) = _ids(clip_tokenizer(), [ASTRONAUT])
    assert ids == ASTRONAUT_IDS + [49407] * (77 - len(ASTRONAUT_IDS))


def test_vocab_merges_and_special_tokens():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.vocab_size == 49408
    assert len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]) == 48894
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length) == (49406, 49407, 49407, 77)
    assert tok.convert_ids_to_tokens([0, 255, 256, 511, 512]) == ["!", "Ń", "!</w>", "Ń</w>", "in"]
    assert clip_tokenizer() is tok  # cached: built once per process


@pytest.mark.parametrize(("prompt", "expected", "decoded"), UNICODE_CASES, ids=[c[0][:10] for c in UNICODE_CASES])
def test_unicode_matches_openai_reference_and_decodes(prompt, expected, decoded):
    tok = clip_tokenizer()
    ids = tok(prompt)["input_ids"]
    assert ids == [int(i) for i in expected.split()]
    assert tok.unk_token_id not in ids[1:-1]  # byte-level BPE: nothing falls back to the unknown token
    assert tok.decode(ids, skip_special_tokens=True) == decoded


def test_save_tokenizer_round_trips_including_official_layout(tmp_path):
    # AutoTokenizer resolves to CLIPTokenizer in transformers 5 and to the fast (tokenizers) class in 4.x.
    prompts = [ASTRONAUT, *(case[0] for case in UNICODE_CASES)]
    expected = _ids(clip_tokenizer(), prompts)
    folder = save_tokenizer(tmp_path / "tokenizer")
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert _ids(AutoTokenizer.from_pretrained(folder), prompts) == expected
    # The official repos' tokenizer/ has vocab.json + merges.txt (+ config): load that without tokenizer.json too.
    official = tmp_path / "official"
    official.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(folder / name, official / name)
    loaded = AutoTokenizer.from_pretrained(official)
    assert len(loaded) == 49408 and loaded.model_max_length == 77
    assert _ids(loaded, prompts) == expected


# ------------------------------------------------------------------------------------------------------ text encoder
def test_clip_text_is_last_layer_before_final_layer_norm(encoder):
    prompts = [ASTRONAUT, "a red cube"]
    emb = encoder.encode(prompts)
    assert emb.clip_text.shape == (2, 77, 32) and emb.clip_text_pooled.shape == (2, 1, 32)

    batch = encoder.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder.model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == TINY_TEXT_CONFIG.num_hidden_layers + 1  # embeddings + one per layer
    torch.testing.assert_close(emb.clip_text, out.hidden_states[-1], rtol=0, atol=0)
    # hidden_states[-1] is pre-LN in transformers 5: the final LN of it is last_hidden_state, which we must not use.
    with torch.inference_mode():  # encode() returns inference tensors
        torch.testing.assert_close(encoder.model.text_model.final_layer_norm(emb.clip_text), out.last_hidden_state)
    assert (emb.clip_text - out.last_hidden_state).abs().max() > 0.1
    assert (emb.clip_text - out.hidden_states[-2]).abs().max() > 0.1
    torch.testing.assert_close(emb.clip_text_pooled, out.text_embeds[:, None], rtol=0, atol=0)


def test_batch_rows_are_independent(encoder):
    both = encoder.encode([ASTRONAUT, "a red cube"])
    alone = encoder.encode(["a red cube"])
    torch.testing.assert_close(both.clip_text[1:], alone.clip_text)
    torch.testing.assert_close(both.clip_text_pooled[1:], alone.clip_text_pooled)
    assert not torch.allclose(both.clip_text_pooled[0], both.clip_text_pooled[1])


def test_truncation_is_reported_not_silent(encoder):
    long = encoder.encode([" ".join(["cat"] * 200)])
    assert long.truncated == [True] and long.num_tokens == [202]
    assert long.clip_text.shape == (1, 77, 32) and torch.isfinite(long.clip_text).all()
    # "cat" is one token: 75 words + bos/eos fill 77 exactly; the 76th word is the first to be cut.
    emb = encoder.encode([" ".join(["cat"] * 75), " ".join(["cat"] * 76)])
    assert emb.truncated == [False, True] and emb.num_tokens == [77, 78]
    torch.testing.assert_close(emb.clip_text[0], emb.clip_text[1])  # the cut prompt keeps its first 75 tokens + eos
    torch.testing.assert_close(long.clip_text[0], emb.clip_text[0])
    short = encoder.encode([ASTRONAUT])
    assert short.truncated == [False] and short.num_tokens == [len(ASTRONAUT_IDS)]


def test_empty_prompt_encodes(encoder):
    emb = encoder.encode(["", ASTRONAUT])
    assert emb.num_tokens[0] == 2 and emb.truncated == [False, False]
    assert torch.isfinite(emb.clip_text).all() and torch.isfinite(emb.clip_text_pooled).all()
    assert not torch.allclose(emb.clip_text_pooled[0], emb.clip_text_pooled[1])


def test_invalid_prompts_raise(encoder):
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        encoder.encode(["ok", 3])
    with pytest.raises(TypeError, match="list of str"):
        encoder.encode("a bare string would be split into characters")
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_text_encoder(TINY_TEXT_CONFIG, seed=1), build_text_encoder(TINY_TEXT_CONFIG, seed=1)
    c = build_text_encoder(TINY_TEXT_CONFIG, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["text_projection.weight"], sc["text_projection.weight"])
    assert not a.training and not a.model.training


# ----------------------------------------------------------------------------------------------------------- loading
def test_save_then_load_gives_identical_embeddings(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    save_tokenizer(tmp_path / "tokenizer", encoder.tokenizer)
    loaded = load_text_encoder(tmp_path / "text_encoder", tmp_path / "tokenizer")
    assert not loaded.training and not loaded.model.training
    prompts = ["", ASTRONAUT, UNICODE_CASES[1][0]]
    want, got = encoder.encode(prompts), loaded.encode(prompts)
    torch.testing.assert_close(got.clip_text, want.clip_text, rtol=0, atol=0)
    torch.testing.assert_close(got.clip_text_pooled, want.clip_text_pooled, rtol=0, atol=0)

    half = load_text_encoder(tmp_path / "text_encoder", dtype=torch.bfloat16)  # bundled tokenizer
    emb = half.encode(prompts)
    assert emb.clip_text.dtype == emb.clip_text_pooled.dtype == torch.bfloat16
    torch.testing.assert_close(emb.clip_text.float(), want.clip_text, rtol=0.05, atol=0.05)


def test_load_sharded_checkpoint(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    loaded = load_text_encoder(tmp_path)
    torch.testing.assert_close(loaded.encode([ASTRONAUT]).clip_text, encoder.encode([ASTRONAUT]).clip_text)


def test_missing_files_raise_clear_errors(encoder, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_text_encoder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(empty)
    encoder.model.config.save_pretrained(empty)
    (empty / "pytorch_model.bin").write_bytes(b"pickle is never loaded")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_text_encoder(empty)


def test_missing_tokenizer_dir_warns_and_uses_bundled(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "text_encoder")
    with pytest.warns(UserWarning, match="bundled"):
        loaded = load_text_encoder(tmp_path / "text_encoder", tmp_path / "no_tokenizer")
    assert loaded.tokenizer is clip_tokenizer()


def test_bigg_parameter_count_on_meta():
    with torch.device("meta"):
        enc = build_text_encoder(BIGG_TEXT_CONFIG)
    params = list(enc.model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) == 694_659_840
    assert enc.model.config.hidden_act == "gelu" and enc.model.config.projection_dim == 1280
