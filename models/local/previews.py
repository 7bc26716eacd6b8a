"""Live previews of the denoising state: a linear projection of the latents to RGB, upscaled to a
small picture (A1111's "approx cheap", ComfyUI's "latent2rgb"). No extra weights, no VAE decode
per preview: one (channels x 3) matrix product on the device.

The projection is fitted, not tabled: once per loaded VAE, the first time anyone asks for a
preview, from the VAE's own decoding of a fixed set of latent patches (least squares from each
latent value to the mean colour of the image area it decodes to). The same code then serves
SDXL, Flux, a fine-tuned VAE and the tiny random ones, where published factors would fit only
the stock VAEs, and it costs one decode of four small latents, never paid by work that wants
no preview. It works in the pipeline's own latent space (scaled and shifted as the denoiser
sees it), so it applies to the callback's latents as they are.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Previews are small: the long side is at most this many pixels (never more than the image).
PREVIEW_MAX_SIDE = 256
# The fitting set: this many latents of a grid of patches of one random value each, every
# patch this many latent pixels wide (the decoder's receptive field blurs only the borders).
_FIT_IMAGES = 4
_FIT_GRID = 8
_FIT_PATCH_LATENTS = 4
_FIT_SEED = 20261202


def preview_size(width: int, height: int) -> tuple[int, int]:
    """The preview's width and height: the image's aspect, the long side at most
    PREVIEW_MAX_SIDE."""
    scale = min(1.0, PREVIEW_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class LatentPreviewer:
    """Turns one pipeline's denoising latents into small RGB pictures. Built per pipeline
    runner, on its worker thread; `fit` runs at most once."""

    def __init__(self, pipe: Any, *, packing: int) -> None:
        self.pipe = pipe
        # Flux packs 2x2 latent patches into its tokens (models.local.families); SDXL does not.
        self.packing = packing
        self.vae_scale_factor = int(getattr(pipe, "vae_scale_factor", 8))
        self._weights: Any = None  # (channels + 1, 3): the projection and its bias
        self._failed = False

    def render(self, latents: Any, index: int, width: int, height: int) -> Any:
        """The preview (a PIL image) of image `index` of the callback's `latents`, for an
        output of `width` x `height`; None where no projection could be fitted."""
        import torch
        from PIL import Image

        weights = self._fitted()
        if weights is None:
            return None
        grid = self._unpack(latents[index : index + 1], width, height)[0]  # (C, h, w)
        weights = weights.to(grid.device)
        channels = grid.shape[0]
        rgb = torch.einsum("chw,cd->dhw", grid.float(), weights[:channels]) + weights[
            channels
        ].view(3, 1, 1)
        w, h = preview_size(width, height)
        rgb = torch.nn.functional.interpolate(
            rgb[None], size=(h, w), mode="bilinear", align_corners=False
        )[0]
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())

    def _unpack(self, latents: Any, width: int, height: int) -> Any:
        """(B, C, h, w) latents: as they are, or unpacked from Flux's (B, tokens, C*4)."""
        if self.packing == 1:
            return latents
        p = self.packing
        h = p * (height // (self.vae_scale_factor * p))
        w = p * (width // (self.vae_scale_factor * p))
        batch, _tokens, packed = latents.shape
        channels = packed // (p * p)
        grid = latents.view(batch, h // p, w // p, channels, p, p)
        return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, h, w)

    def _fitted(self) -> Any:
        if self._weights is None and not self._failed:
            try:
                self._weights = self.fit()
            except Exception:
                # A preview is a nicety: the generation goes on without one.
                log.exception("latent preview projection could not be fitted; previews off")
                self._failed = True
        return self._weights

    def fit(self) -> Any:
        """The least-squares projection from latents (in the denoiser's space) to RGB in
        [-1, 1], with a bias row: what the VAE's decoder makes of a patch of one latent
        value, so the preview approximates what the final decode will show."""
        import torch

        vae = self.pipe.vae
        f = self.vae_scale_factor
        channels = int(vae.config.latent_channels)
        gen = torch.Generator().manual_seed(_FIT_SEED)
        patches = torch.randn(_FIT_IMAGES, channels, _FIT_GRID, _FIT_GRID, generator=gen)
        latents = patches.repeat_interleave(_FIT_PATCH_LATENTS, dim=2).repeat_interleave(
            _FIT_PATCH_LATENTS, dim=3
        )
        # fp16 VAEs marked force_upcast overflow in fp16 (what the pipelines upcast for).
        upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        dtype = torch.float32 if upcast else vae.dtype
        with torch.inference_mode():
            if upcast:
                vae.to(torch.float32)
            try:
                decoded = vae.decode(
                    self._to_vae_space(latents).to(vae.device, dtype), return_dict=False
                )[0].float()
            finally:
                if upcast:
                    vae.to(torch.float16)
        # Each latent pixel against the mean colour of the image area it decodes to.
        targets = torch.nn.functional.avg_pool2d(decoded.cpu(), kernel_size=f)
        x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        weights = torch.linalg.lstsq(x, y).solution
        if not torch.isfinite(weights).all():
            raise ValueError("the fitted projection is not finite")
        return weights

    def _to_vae_space(self, latents: Any) -> Any:
        """What the pipeline hands its VAE to decode, from the denoiser's latents: SDXL
        unscales (and, where its VAE sets them, un-normalises by latents_mean / latents_std);
        Flux unscales, then shifts."""
        import torch

        config = self.pipe.vae.config
        scale = float(config.get("scaling_factor", 1.0) or 1.0)
        shift = config.get("shift_factor")
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
            std_t = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
            return latents * std_t / scale + mean_t
        return latents / scale + float(shift or 0.0)
