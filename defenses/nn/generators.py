"""Cross-modal generators for N:N augmentation: a captioner (image → texts) and a painter
(text → image).

On the synthetic world both are exact: the scene graph writes captions
(:func:`vlbench.world.scenes.generated_captions`: wordings the ground truth does not use, or
descriptions naming three or four attributes) and the renderer draws an image for the attributes a
caption names (:func:`~vlbench.world.scenes.scene_for` then ``render``). On real data they
are a BLIP captioner through transformers and Stable Diffusion through diffusers, both from
local weights only; a missing package or missing weights is a one-line error naming what to
install or download.
"""

from __future__ import annotations

import os
import random
from typing import Protocol

import torch

from vlbench.errors import UserError


class Captioner(Protocol):
    def caption(self, images: torch.Tensor, rows: list[int], n: int, rng: random.Random) -> list[list[str]]:
        ...


class Painter(Protocol):
    def draw(self, texts: list[str], size: tuple[int, int], rng: random.Random) -> torch.Tensor:
        ...


class WorldCaptioner:
    """Captions from each image's scene graph."""

    def __init__(self, scenes):
        self.scenes = scenes

    def caption(self, images, rows, n, rng):
        from vlbench.world.loaders import CAPTIONS_PER_IMAGE
        from vlbench.world.scenes import generated_captions

        return [generated_captions(self.scenes[row], n, rng, CAPTIONS_PER_IMAGE) for row in rows]


class WorldPainter:
    """A fresh scene with the attributes a caption names (the rest random), rendered."""

    def draw(self, texts, size, rng):
        from vlbench.world.scenes import render, scene_for, scene_from_caption

        scenes = [scene_for(scene_from_caption(text), rng) for text in texts]
        return render(scenes, size[0])


def _local_only_error(what: str, name: str, package: str) -> UserError:
    return UserError(f"{what} {name!r} is not available offline",
                     f"pip install {package} and download {name} on a connected machine into the Hugging Face "
                     f"cache (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}), or pass a local folder")


class BlipCaptioner:
    """BLIP (Li et al., ICML 2022) image captioning through transformers, local weights only."""

    def __init__(self, name: str = "Salesforce/blip-image-captioning-base"):
        try:
            from transformers import BlipForConditionalGeneration, BlipProcessor

            self.processor = BlipProcessor.from_pretrained(name, local_files_only=True)
            self.model = BlipForConditionalGeneration.from_pretrained(
                name, local_files_only=True, use_safetensors=True).eval()  # never a pickle
        except Exception:
            raise _local_only_error("captioner", name, "transformers") from None

    @torch.no_grad()
    def caption(self, images, rows, n, rng):
        inputs = self.processor(images=[images[r] for r in rows], return_tensors="pt", do_rescale=False)
        out = self.model.generate(**inputs, do_sample=n > 1, num_return_sequences=n, max_new_tokens=30)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(rows))]


class StableDiffusionPainter:
    """Stable Diffusion (Rombach et al., CVPR 2022) through diffusers, local weights only."""

    def __init__(self, name: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        try:
            from diffusers import StableDiffusionPipeline

            self.pipeline = StableDiffusionPipeline.from_pretrained(name, local_files_only=True,
                                                                    use_safetensors=True)  # never a pickle
        except Exception:
            raise _local_only_error("text-to-image model", name, "'vlbench[diffusion]'") from None

    @torch.no_grad()
    def draw(self, texts, size, rng):
        generator = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        images = self.pipeline(texts, height=512, width=512, generator=generator, output_type="pt").images
        return torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def generators_for(data, captioner: str = "auto", painter: str = "auto") -> tuple[Captioner | None, Painter | None]:
    """Generators for ``data``: ``auto`` means the world's exact ones for world data (whose
    images carry their scenes) and BLIP / Stable Diffusion otherwise; ``none`` disables one;
    any other value names a local model folder or Hugging Face cache entry."""
    scenes = getattr(data.images, "scenes", None)
    on_world = scenes is not None
    if captioner == "none":
        made_captioner = None
    elif captioner in ("auto", "world") and on_world:
        made_captioner = WorldCaptioner(scenes)
    else:
        made_captioner = BlipCaptioner() if captioner == "auto" else BlipCaptioner(captioner)
    if painter == "none":
        made_painter = None
    elif painter in ("auto", "world") and on_world:
        made_painter = WorldPainter()
    else:
        made_painter = StableDiffusionPainter() if painter == "auto" else StableDiffusionPainter(painter)
    return made_captioner, made_painter
