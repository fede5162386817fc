"""The baseline of `jobs.bench`: diffusers' Stable Cascade prior and decoder pipelines on the same weights.

Our stages are written out in the diffusers layout (the same tensors under diffusers' key names) and loaded by
diffusers' own classes; the text encoder and tokenizer objects are shared. Both sides run the same size, steps and
guidance, at the same batch, dtype and device. diffusers is an optional (test) dependency: without it the benchmark
reports no baseline and says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path


def available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


class DiffusersTwin:
    """diffusers' prior + decoder pipelines holding the same weights as `models`."""

    def __init__(self, models):
        import torch
        from diffusers import StableCascadeDecoderPipeline, StableCascadePriorPipeline, StableCascadeUNet
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
        from diffusers.schedulers import DDPMWuerstchenScheduler

        from cascade import save_stage

        device, dtype = models.device, next(models.stage_c.parameters()).dtype
        with tempfile.TemporaryDirectory(prefix="bench-diffusers-") as tmp:
            folder = Path(tmp)
            for stage, name in (("stage_c", "prior"), ("stage_b", "decoder"), ("stage_a", "vqgan")):
                save_stage(getattr(models, stage), folder / name, layout="diffusers")
            prior = StableCascadeUNet.from_pretrained(folder / "prior", torch_dtype=dtype)
            decoder = StableCascadeUNet.from_pretrained(folder / "decoder", torch_dtype=dtype)
            vqgan = PaellaVQModel.from_pretrained(folder / "vqgan", torch_dtype=dtype)
        text, tokenizer = models.text_encoder.model, models.text_encoder.tokenizer
        self.prior = StableCascadePriorPipeline(
            tokenizer=tokenizer, text_encoder=text, prior=prior, scheduler=DDPMWuerstchenScheduler()
        ).to(device)
        self.decoder = StableCascadeDecoderPipeline(
            decoder=decoder, tokenizer=tokenizer, text_encoder=text, scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan
        ).to(device)
        for pipe in (self.prior, self.decoder):
            pipe.set_progress_bar_config(disable=True)
        self.torch = torch

    def call(self, batch: int, size: int, prior_steps: int, decoder_steps: int) -> Callable[[], object]:
        from cascade.pipeline import Request

        request = Request("a red circle on a blue background", width=size, height=size)
        prompts = [request.prompt] * batch

        def run():
            with self.torch.inference_mode():
                prior = self.prior(
                    prompt=prompts,
                    height=size,
                    width=size,
                    num_inference_steps=prior_steps,
                    guidance_scale=request.prior_cfg,
                )
                return self.decoder(
                    image_embeddings=prior.image_embeddings,
                    prompt=prompts,
                    num_inference_steps=decoder_steps,
                    guidance_scale=request.decoder_cfg,
                    output_type="pil",
                ).images

        return run
