"""LoRA adapters on one loaded pipeline: each file version loaded once, switched per batch with
`set_adapters`, the least recently used deleted past local.max_loaded_loras, and switched off
for a batch without LoRA, whose pixels are then exactly a fresh pipeline's.

The img2img and inpaint pipelines of a model are made with `from_pipe` and share its denoiser
and text encoders, so an adapter loaded through any of them is loaded on all: one Adapters per
model, and `activate` takes whichever pipeline object the batch runs on. Worker thread only.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from models.base import InvalidParamsError, LoraRef
from models.local.loras import LoraFile, LoraLibrary
from models.local.runtime import is_fatal_device_error

log = logging.getLogger(__name__)

# The adapter set applied last: ((adapter name, weight), ...); () = LoRA switched off; None =
# unknown (after a failed load PEFT may have moved its active adapter), so applied again.
_Applied = tuple[tuple[str, float], ...] | None


class Adapters:
    def __init__(self, library: LoraLibrary, *, model: str, kind: str, max_loaded: int) -> None:
        self.library = library
        self.model = model
        self.kind = kind
        self.max_loaded = max_loaded
        # adapter name -> LoRA name, least recently used first.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._applied: _Applied = ()

    @property
    def loaded(self) -> list[str]:
        """The LoRA names loaded on the pipeline, least recently used first."""
        return list(self._loaded.values())

    def check(self, loras: Sequence[LoraRef]) -> list[LoraFile]:
        """The library's files for `loras`, each checked to fit this model and to be the file
        the request was resolved against. Cheap (a header read, a remembered hash): the
        backend calls it before the request is queued."""
        if len(loras) > self.max_loaded:
            raise InvalidParamsError(
                f"loras: {len(loras)} LoRAs in one request, but model '{self.model}' keeps at "
                f"most {self.max_loaded} loaded (local.max_loaded_loras); use fewer or raise "
                "the setting",
                param="loras",
            )
        names = [ref.name for ref in loras]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise InvalidParamsError(
                f"loras: {', '.join(twice)} given more than once; give each LoRA once, with "
                "the weight it should have",
                param="loras",
            )
        files = []
        for ref in loras:
            file = self.library.find(ref.name)
            file.check_fits(self.model, self.kind)
            if file.sha256 != ref.sha256:
                raise InvalidParamsError(
                    f"lora '{ref.name}' ({file.path.name}) changed on disk after the request "
                    "was accepted; send the request again",
                    param="loras",
                )
            files.append(file)
        return files

    def activate(self, pipe: Any, loras: Sequence[LoraRef]) -> None:
        """Make `loras` (with their weights) the adapters `pipe` runs with; none switches
        LoRA off. Loads what is not loaded yet; a file that does not fit leaves the pipeline
        as it was and raises InvalidParamsError naming it."""
        if not loras:
            if self._loaded and self._applied != ():
                pipe.disable_lora()
            self._applied = ()
            return
        files = self.check(loras)
        wanted = [_adapter_name(file) for file in files]
        for file, adapter in zip(files, wanted, strict=True):
            self._ensure_loaded(pipe, file, adapter, keep=wanted)
        state = tuple(
            (adapter, float(ref.weight)) for adapter, ref in zip(wanted, loras, strict=True)
        )
        if state != self._applied:
            pipe.enable_lora()
            pipe.set_adapters(wanted, adapter_weights=[weight for _, weight in state])
            self._applied = state

    def forget(self) -> None:
        """The pipeline was unloaded, and its adapters with it."""
        self._loaded.clear()
        self._applied = ()

    def _ensure_loaded(self, pipe: Any, file: LoraFile, adapter: str, *, keep: list[str]) -> None:
        if adapter in self._loaded:
            self._loaded.move_to_end(adapter)
            return
        while len(self._loaded) >= self.max_loaded:
            victim = next(name for name in self._loaded if name not in keep)
            with _quiet_peft():
                pipe.delete_adapters(victim)
            log.info("%s: unloaded LoRA %s (least recently used)", self.model, victim)
            del self._loaded[victim]
            self._applied = None
        self._applied = None
        try:
            with _quiet_peft():
                pipe.load_lora_weights(str(file.path), adapter_name=adapter)
        except Exception as exc:
            if is_fatal_device_error(exc) or type(exc).__name__ == "OutOfMemoryError":
                raise
            # diffusers' text quotes layer names and shapes: for the log, not the client.
            log.warning("%s: LoRA %s did not load", self.model, file.path, exc_info=True)
            self._discard(pipe, adapter)
            raise self._misfit(file, type(exc).__name__) from None
        if adapter not in _present(pipe):
            # Nothing in the file matched a layer of the model: diffusers skips it quietly.
            raise self._misfit(file, "no tensor matches a layer of the model")
        self._loaded[adapter] = file.name

    def _discard(self, pipe: Any, adapter: str) -> None:
        """Delete what a failed load left behind: diffusers loads the denoiser's part first,
        and a text encoder's part failing after it leaves that half loaded."""
        if adapter in _present(pipe):
            with _quiet_peft():
                pipe.delete_adapters(adapter)

    def _misfit(self, file: LoraFile, why: str) -> InvalidParamsError:
        return InvalidParamsError(
            f"lora '{file.name}' ({file.path.name}) does not fit model '{self.model}' "
            f"({self.kind}): its layers do not match the model's ({why}). Use a LoRA trained "
            f"for this model",
            param="loras",
        )


def _adapter_name(file: LoraFile) -> str:
    """Name and content: a file replaced under the same name is a new adapter. PEFT keeps
    adapters in module dicts, whose keys cannot hold a dot."""
    return re.sub(r"\W", "_", file.name) + "_" + file.sha256[:16]


def _present(pipe: Any) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT warns that a model holds several adapters (the point here) and which adapter
    it made active after a delete (set again before every batch)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
        yield
