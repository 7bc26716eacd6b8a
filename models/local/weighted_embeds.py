"""The prompt arguments of a pipeline call: plain text where no prompt of the call uses the
attention syntax (models.prompt_weights), else SDXL text embeddings built here with the
weights applied, A1111's way.

How SDXL embeddings are weighted, as A1111 does by default ("Original" emphasis): each chunk
of up to model_max_length - 2 tokens is encoded by both CLIP encoders (penultimate hidden
states, as diffusers' encode_prompt takes them), every token's embedding is multiplied by its
weight, and the chunk is rescaled to its original mean so that weights shift emphasis between
tokens rather than the overall magnitude the UNet was trained on. Chunks are concatenated
along the sequence; the pooled embedding is the second encoder's, of the first chunk,
unweighted (as in A1111). One difference: A1111 restores the mean over the whole batch tensor;
here it is per prompt and chunk, so a request's pixels never depend on what it is batched with.

A prompt chunk over the limit was refused by the backend's check_prompt; a negative prompt's
chunk is cut at the limit, as diffusers cuts a plain negative prompt today.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from models import prompt_weights
from models.local.families import Family

log = logging.getLogger(__name__)


def prompt_kwargs(
    pipe: Any, family: Family, prompts: Sequence[str], negatives: Sequence[str] | None
) -> dict[str, Any]:
    """`prompt` / `negative_prompt` (lists, one per image), or their embeddings where weighting
    applies. A family that cannot weight gets the text without the syntax (the backend reports
    the weighting as dropped); a call none of whose prompts uses it runs on plain text, the
    path of a prompt without syntax, so `(word:1.0)` gives the pixels of `word`."""
    parsed = [prompt_weights.parse(p) for p in prompts]
    parsed_neg = [prompt_weights.parse(n) for n in negatives] if negatives is not None else []
    if not family.prompt_weighting or not any(p.weighted for p in (*parsed, *parsed_neg)):
        kwargs: dict[str, Any] = {"prompt": [p.text for p in parsed]}
        if negatives is not None:
            kwargs["negative_prompt"] = [n.text for n in parsed_neg]
        return kwargs
    # The batch key gives every request of the call the same chunk count (the larger of its
    # prompt's and its negative's); each text is padded to it with empty chunks, as A1111 does.
    chunks = max(len(p.chunks) for p in (*parsed, *parsed_neg))
    encoder = _SDXLEncoder(pipe, chunks)
    embeds, pooled = encoder.batch(parsed, cut=False)
    kwargs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if negatives is None and not pipe.config.get("force_zeros_for_empty_prompt", True):
        # diffusers would encode "" at the embeddings' length, past CLIP's positions.
        parsed_neg = [prompt_weights.parse("")] * len(parsed)
    if parsed_neg:
        neg_embeds, neg_pooled = encoder.batch(parsed_neg, cut=True)
        kwargs.update(negative_prompt_embeds=neg_embeds, negative_pooled_prompt_embeds=neg_pooled)
    return kwargs


class _SDXLEncoder:
    """Encodes parsed prompts with a pipeline's CLIP encoders, each distinct text once."""

    def __init__(self, pipe: Any, chunks: int) -> None:
        from diffusers.utils.torch_utils import get_module_execution_device

        # As encode_prompt: an SDXL variant without the first encoder uses the second alone.
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        self.pairs = [(tok, enc) for tok, enc in pairs if tok is not None]
        self.chunks = chunks
        self.device = get_module_execution_device
        self.memo: dict[tuple[prompt_weights.ParsedPrompt, bool], tuple[Any, Any]] = {}

    def batch(self, parsed: Sequence[prompt_weights.ParsedPrompt], *, cut: bool) -> tuple[Any, Any]:
        import torch

        rows = [self.one(p, cut=cut) for p in parsed]
        return torch.cat([e for e, _ in rows]), torch.cat([p for _, p in rows])

    def one(self, parsed: prompt_weights.ParsedPrompt, *, cut: bool) -> tuple[Any, Any]:
        """(embeddings [1, chunks * max_length, dims], pooled [1, dims_2]) of one prompt,
        encoded on its own: the same values alone or in any batch."""
        import torch

        key = (parsed, cut)
        if key in self.memo:
            return self.memo[key]
        chunks = list(parsed.chunks) + [()] * (self.chunks - len(parsed.chunks))
        per_encoder = []
        pooled = None
        for tokenizer, text_encoder in self.pairs:
            ids, weights = zip(*(_tokens(tokenizer, c, cut=cut) for c in chunks), strict=True)
            out = text_encoder(
                torch.tensor(ids, device=self.device(text_encoder)), output_hidden_states=True
            )
            if pooled is None and out[0].ndim == 2:
                pooled = out[0][:1]
            hidden = _emphasis(out.hidden_states[-2], weights)
            per_encoder.append(hidden.reshape(1, -1, hidden.shape[-1]))
        if pooled is None:
            raise RuntimeError("the SDXL pipeline's second text encoder gave no pooled output")
        self.memo[key] = (torch.cat(per_encoder, dim=-1), pooled)
        return self.memo[key]


def _tokens(
    tokenizer: Any, chunk: Sequence[prompt_weights.Segment], *, cut: bool
) -> tuple[list[int], list[float]]:
    """One chunk's token ids with begin, end and padding (as the tokenizer pads a plain
    prompt), and each token's weight. Segments are tokenized apart, as in A1111."""
    length = int(tokenizer.model_max_length)
    ids: list[int] = []
    weights: list[float] = []
    for segment in chunk:
        tokens = tokenizer(segment.text, add_special_tokens=False)["input_ids"]
        ids += tokens
        weights += [segment.weight] * len(tokens)
    room = length - 2
    if len(ids) > room:
        if not cut:
            # check_prompt refuses these before the request is queued.
            raise ValueError(f"a prompt chunk is {len(ids)} tokens, over {room}")
        log.warning("negative prompt chunk of %d tokens cut to %d", len(ids), room)
        ids, weights = ids[:room], weights[:room]
    pad = length - 2 - len(ids)
    return (
        [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
        [1.0, *weights, 1.0] + [1.0] * pad,
    )


def _emphasis(hidden: Any, weights: Sequence[Sequence[float]]) -> Any:
    """Each chunk's token embeddings times their weights, rescaled to the chunk's old mean."""
    import torch

    if all(w == 1.0 for row in weights for w in row):
        return hidden
    scale = torch.tensor(weights, dtype=hidden.dtype, device=hidden.device).unsqueeze(-1)
    before = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * scale
    after = scaled.mean(dim=(1, 2), keepdim=True)
    # A chunk whose weights zero it all (or whose mean is exactly 0) keeps the plain scale.
    ratio = torch.where(after == 0, torch.ones_like(after), before / after)
    return scaled * ratio
