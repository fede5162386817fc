"""In-process generation with the tiny built-in model: batching, determinism, per-request errors, validation."""

import math

import numpy as np
import pytest
import torch

from cascade import Request, generate, run_decoder, run_prior, tiny_models
from cascade.pipeline import decode_latents, stage_generator
from cascade.request import buckets, latent_sizes

SMALL = dict(width=256, height=256, prior_steps=3, decoder_steps=2)


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def test_latent_sizes_follow_the_reference():
    assert latent_sizes(1024, 1024) == ((16, 24, 24), (4, 256, 256))
    assert latent_sizes(1536, 1024) == ((16, 24, 36), (4, 256, 384))


def test_images_have_the_requested_size_and_order(models):
    requests = [
        Request("a red circle", seed=1, **SMALL),
        Request("a cat", seed=2, **{**SMALL, "width": 320}),
        Request("a dog", seed=3, **SMALL),
    ]
    results = generate(models, requests, batch_size=2)
    assert [r.request for r in results] == requests
    assert [r.image.size for r in results] == [(256, 256), (320, 256), (256, 256)]
    assert all(r.error is None for r in results)


def test_same_seed_same_image_and_seeds_and_prompts_matter(models):
    a, b, c, d = generate(
        models,
        [
            Request("a red circle", seed=7, **SMALL),
            Request("a red circle", seed=7, **SMALL),
            Request("a red circle", seed=8, **SMALL),
            Request("a blue square", seed=7, **SMALL),
        ],
    )
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(d.image))


def test_a_request_is_the_same_alone_or_in_any_batch(models):
    target = Request("a red circle", seed=11, prior_cfg=4.0, decoder_cfg=1.1, **SMALL)
    mates = [Request("something else entirely", seed=s, **SMALL) for s in (1, 2, 3)]
    alone = run_prior(models, [target])[0]
    batched = run_prior(models, [mates[0], target, mates[1]])[1]
    # fp32 batched matmuls round differently; in float64 the two are bit-identical. Allow rounding, nothing more.
    scale = alone.latent.abs().max().item()
    torch.testing.assert_close(batched.latent, alone.latent, rtol=0, atol=1e-5 * scale)
    image_alone = np.asarray(run_decoder(models, [alone])[0].image, dtype=int)
    image_batched = np.asarray(run_decoder(models, [run_prior(models, [mates[2]])[0], batched])[1].image, dtype=int)
    assert np.abs(image_alone - image_batched).max() <= 1  # float rounding of batched matmuls, nothing more


def test_float64_batches_are_bit_identical():
    models64 = tiny_models(dtype=torch.float64)
    target = Request("a red circle", seed=11, **SMALL)
    alone = run_prior(models64, [target])[0].latent
    batched = run_prior(models64, [Request("x", seed=3, **SMALL), target])[1].latent
    assert torch.equal(alone, batched)


def test_nan_is_reported_for_that_request_only(models):
    poisoned = tiny_models()
    token = poisoned.text_encoder.tokenizer("zebra")["input_ids"][1]
    with torch.no_grad():
        poisoned.text_encoder.model.text_model.embeddings.token_embedding.weight[token] = float("nan")
    results = generate(poisoned, [Request("a zebra", seed=1, **SMALL), Request("a horse", seed=2, **SMALL)])
    assert results[0].image is None and "NaN" in results[0].error and "Stage C" in results[0].error
    assert results[1].error is None and results[1].image is not None


def test_nan_after_stage_b_or_stage_a_is_reported_for_that_request_only(models, monkeypatch):
    """The decoder's checks: a Stage C latent holding NaN (as a broken prior would send) poisons only its own Stage B
    latent; an image Stage A decodes to NaN is an error for that request only, named by stage."""
    import cascade.pipeline as pipeline

    requests = [Request("a red circle", seed=1, **SMALL), Request("a blue square", seed=2, **SMALL)]
    priors = run_prior(models, requests)
    priors[0].latent = priors[0].latent.clone()  # (an inference tensor: written to through a copy)
    priors[0].latent[0, 0, 0] = float("nan")
    results = run_decoder(models, priors)
    assert results[0].image is None and results[0].error == "Stage B produced NaN/Inf in the latent"
    assert results[1].error is None and results[1].image is not None

    priors = run_prior(models, requests)
    real = pipeline.decode_latents

    def decode_with_a_nan(models_, latents):
        images = real(models_, latents).clone()
        images[1, 0, 0, 0] = float("nan")
        return images

    monkeypatch.setattr(pipeline, "decode_latents", decode_with_a_nan)
    results = run_decoder(models, priors)
    assert results[0].error is None and results[0].image is not None
    assert results[1].image is None and results[1].error == "Stage A produced NaN/Inf in the image"


def test_truncation_is_reported(models):
    long_prompt = " ".join(["cat"] * 100)
    result = generate(models, [Request(long_prompt, **SMALL), Request("a cat", **SMALL)])
    assert result[0].prompt_truncated and result[0].prompt_tokens == 102
    assert not result[1].prompt_truncated


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("width", 1000, "width: 1000 is not supported; use an integer multiple of 32 from 256 to 2048"),
        ("height", 4096, "height: 4096 is not supported"),
        ("width", -256, "width: -256"),
        ("prior_steps", 0, "prior_steps: 0 is not allowed"),
        ("decoder_steps", 10**6, "decoder_steps"),
        ("prior_cfg", math.nan, "prior_cfg: nan is not allowed"),
        ("seed", -1, "seed: -1 is not allowed"),
        ("seed", 2**63, "seed"),
        ("sampler", "euler", "sampler: 'euler' is not known"),
        ("prompt", None, "prompt: must be a string"),
    ],
)
def test_invalid_requests_are_rejected_before_any_work(models, field, value, message):
    kwargs = {"prompt": "ok", **SMALL, field: value}
    with pytest.raises(ValueError, match="request 1: " + message.replace("(", r"\(").replace("*", r"\*")):
        generate(models, [Request("fine", **SMALL), Request(**kwargs)])
    if field in ("seed", "prompt"):  # (the others change the bucket, which the one-bucket call refuses first)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
            run_prior(models, [Request("fine", **SMALL), Request(**kwargs)])  # the one-bucket call checks too


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: generate(m, ["a prompt"]), "request 0: a str is not allowed; give a Request"),
        (lambda m: generate(m, Request("x", **SMALL)), "requests: a Request is not allowed; give a list of Request"),
        (lambda m: generate(m, [Request("x", **SMALL)], batch_size=2.5), "batch_size: 2.5 is not allowed"),
        (lambda m: generate(m, [Request("x", **SMALL)], batch_size="4"), "batch_size: '4' is not allowed"),
        (
            lambda m: generate(tiny_models(parts=("prior",)), [Request("x", **SMALL)]),
            "models: stage_b, stage_a not loaded; generate needs both halves",
        ),
        (
            lambda m: generate(
                m, [Request("x", **SMALL)], init_images=[torch.full((3, 64, 64), 255, dtype=torch.uint8)]
            ),
            r"init_images\[0\]: a torch.uint8 tensor is not allowed; give floating RGB values in \[0, 1\]",
        ),
        (
            lambda m: generate(m, [Request("x", **SMALL)], init_images=[torch.zeros(64, 64, 3)]),
            r"init_images\[0\]: shape \(64, 64, 3\) is not allowed; give \(3, H, W\)",
        ),
        (
            lambda m: generate(m, [Request("x", **SMALL)], init_images=[np.zeros((64, 64, 3))]),
            r"init_images\[0\]: a ndarray is not allowed; give a PIL image",
        ),
        (
            lambda m: generate(m, [Request("x", **SMALL)], init_images=[torch.zeros(3, 64, 64)]),
            "init_images: img2img needs the family's semantic encoder",
        ),
    ],
)
def test_bad_arguments_to_generate_are_rejected_before_any_work(models, monkeypatch, call, message):
    """Not only the requests: every argument is checked, with a message naming it, before a stage runs."""

    def no_work(*args, **kwargs):
        raise AssertionError("a stage ran")

    monkeypatch.setattr("cascade.pipeline.run_prior", no_work)
    with pytest.raises(ValueError, match=message):
        call(models)


def test_a_family_is_refused_a_device_or_dtype_it_cannot_use_before_it_loads(tmp_path):
    """A mistyped device or dtype is the caller's mistake, named as such (not as broken weights)."""
    from cascade.family import load_models

    cases = [
        (lambda: tiny_models(device="gpu"), "device: 'gpu' is not a device; use e.g. cpu, cuda, cuda:1"),
        (lambda: tiny_models(device="xla"), "device: 'xla': xla devices are not supported; use cpu or cuda"),
        (lambda: tiny_models(dtype="bf16"), "dtype: 'bf16' is not allowed; use a torch floating dtype"),
        (lambda: load_models(tmp_path, dtype=torch.int8), "dtype: torch.int8 is not allowed"),
    ]
    if not torch.cuda.is_available():
        cases.append((lambda: load_models(tmp_path, device="cuda"), "device: cuda is not available here"))
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_the_one_bucket_calls_take_an_empty_batch(models):
    assert run_prior(models, []) == [] and run_decoder(models, []) == []


def test_buckets_group_equal_parameters_in_batches():
    rs = [Request("a", width=256), Request("b", width=512), Request("c", width=256), Request("d", width=256)]
    assert buckets(rs, batch_size=2) == [[0, 2], [3], [1]]


def test_stage_generators_are_independent_per_stage():
    c, b = stage_generator(5, "stage_c"), stage_generator(5, "stage_c")
    assert torch.equal(torch.randn(4, generator=c), torch.randn(4, generator=b))
    assert not torch.equal(
        torch.randn(4, generator=stage_generator(5, "stage_c")), torch.randn(4, generator=stage_generator(5, "stage_b"))
    )
    stage_generator(2**63 - 1, "stage_b")  # the largest allowed seed works


def test_numpy_numbers_from_parquet_are_accepted(models):
    request = Request(
        "a",
        seed=np.int64(2**62),
        width=np.int64(256),
        height=256,
        prior_steps=np.int32(2),
        prior_cfg=np.float32(4.0),
        decoder_steps=2,
    )
    plain = Request("a", seed=2**62, width=256, height=256, prior_steps=2, prior_cfg=4.0, decoder_steps=2)
    a, b = generate(models, [request, plain])
    assert a.error is None and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_bf16_models_run_and_agree_with_fp32(models):
    """The dtype path a GPU takes (bf16 weights, fp32 sampler maths, fp32 Stage A), checked on the CPU."""
    request = [Request("a red circle", seed=5, **SMALL)]
    bf16 = run_prior(tiny_models(dtype=torch.bfloat16), request)
    fp32 = run_prior(models, request)
    assert bf16[0].error is None and bf16[0].latent.dtype == torch.float32
    correlation = torch.corrcoef(torch.stack([bf16[0].latent.ravel(), fp32[0].latent.ravel()]))[0, 1]
    assert correlation > 0.99
    assert run_decoder(tiny_models(dtype=torch.bfloat16), bf16)[0].error is None


def test_stage_a_decodes_under_bfloat16_autocast_where_the_generators_run_in_bfloat16_on_a_gpu():
    """As the official notebook (its decode sits inside the sampling's autocast(bfloat16) block): forced here on the
    CPU, the convolutions and matrix products run in bfloat16 on the float32 weights, the image is the float32
    decode's to bfloat16 precision, and float32 comes back; by default a CPU (and float32 generators) decode in
    float32."""
    models = tiny_models(parts=("decoder",))
    latents = torch.randn(2, 4, 8, 8)
    seen = []
    hook = models.stage_a.out_block[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.inference_mode():
        exact = decode_latents(models, latents)
        mixed = decode_latents(models, latents, autocast=True)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert exact.dtype == mixed.dtype == torch.float32 and next(models.stage_a.parameters()).dtype == torch.float32
    assert not torch.equal(exact, mixed) and exact.abs().max() > 0.1
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.05)
