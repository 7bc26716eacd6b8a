"""Reading a form body within bounds: how many files and fields it may have, and how large a
field may be (Starlette's max_part_size, 1 MB; files are bounded by server.max_body_mb). The
parser's refusal becomes a 400 naming the field and the bound."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from server import errors

# A text field larger than this is refused (a prompt is at most a few kB).
MAX_FIELD_BYTES = 1024 * 1024


async def read_form(
    request: Request, *, max_files: int, max_fields: int, param: str, bounds: str
) -> FormData:
    """The parsed form; the caller closes it (`await form.close()`). `bounds` tells the
    client what the route takes (e.g. "at most 16 images and one mask")."""
    try:
        return await request.form(
            max_files=max_files, max_fields=max_fields, max_part_size=MAX_FIELD_BYTES
        )
    except HTTPException as exc:
        # The parser's own refusals (too many files or fields, a field over its size).
        if exc.status_code != 400:
            raise
        raise errors.InvalidRequestError(
            f"the form could not be read: {exc.detail} ({bounds})", param=param
        ) from None
