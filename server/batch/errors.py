"""BatchError, and how each edge spells the batch options its messages name: the HTTP API by
its JSON fields (the default), `imagegen batch` by its flags (server/batch_cmd.py)."""

from __future__ import annotations

from collections.abc import Mapping

from server import errors

# The options a batch message may name, spelled as the HTTP API's JSON fields and form fields.
FIELD_NAMES: Mapping[str, str] = {
    "file": "file",
    "out": "batch folder",
    "resume": "resume",
    "concurrency": "concurrency",
    "budget_usd": "budget_usd",
    "model": "model",
    "preset": "preset",
}


class BatchError(errors.InvalidRequestError):
    """The batch as a whole cannot run: unreadable input, bad options, a folder that holds
    another run. `param` names the option at fault; the message names options through
    `{option}` fields of `template`, which each edge fills with its own spelling (`spelled`).
    Over HTTP it is a 400 invalid_request like any other bad input."""

    def __init__(
        self,
        template: str,
        *,
        param: str,
        names: Mapping[str, str] = FIELD_NAMES,
        **facts: object,
    ) -> None:
        super().__init__(template.format_map({**names, **facts}), param=param)
        self.template = template
        self.facts = facts

    def spelled(self, names: Mapping[str, str]) -> BatchError:
        """The same error worded for an edge that names the options `names`."""
        return type(self)(self.template, param=self.param or "", names=names, **self.facts)
