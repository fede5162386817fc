"""The baseline of `jobs.bench`: diffusers' Stable Cascade prior and decoder pipelines on the same weights.

Our stages' tensors are renamed to diffusers' keys (`cascade.convert`, what `save_stage(layout="diffusers")`
writes) and loaded into diffusers' own classes, built on the meta device from the matching configs: no second
random initialisation and no disk copy of a full-size model. The text encoder and tokenizer objects are shared. Both
sides run the same size, steps and guidance, at the same batch, dtype and device. diffusers is an optional (test)
dependency: without it the benchmark reports no baseline and says so.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def available() -> bool:
    """Whether diffusers is installed. Found without importing it: one that is installed but fails to import (a
    release that needs another huggingface_hub, say) fails in DiffusersTwin, where the benchmark reports why."""
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


class DiffusersTwin:
    """diffusers' prior + decoder pipelines holding the same weights as `models`."""

    def __init__(self, models):
        import torch
        from diffusers import StableCascadeDecoderPipeline, StableCascadePriorPipeline, StableCascadeUNet
        from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel
        from diffusers.schedulers import DDPMWuerstchenScheduler

        from cascade.convert import to_diffusers_state_dict, unet_config_to_diffusers
        from cascade.stage_a import stage_a_diffusers_config

        device, dtype = models.device, next(models.stage_c.parameters()).dtype

        def twin(cls, config: dict, kind: str, ours):
            with torch.device("meta"):
                model = cls(**config)
            state = to_diffusers_state_dict(kind, ours.state_dict())
            model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
            return model.eval()

        prior = twin(StableCascadeUNet, unet_config_to_diffusers(models.stage_c.config), "stage_c", models.stage_c)
        decoder = twin(StableCascadeUNet, unet_config_to_diffusers(models.stage_b.config), "stage_b", models.stage_b)
        vqgan = twin(PaellaVQModel, stage_a_diffusers_config(models.stage_a.config), "stage_a", models.stage_a)
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
        from cascade.request import Request

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


if __name__ == "__main__":  # a part of the benchmark, not a command of its own
    sys.exit("this module is a part of python -m jobs.bench (see docs/PERFORMANCE.md): run that")
