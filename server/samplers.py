"""A1111's sampler names for our schedulers: what the PNG metadata writes and what the
/sdapi/v1 API reads back. Naming at the server's edges (models.local.schedulers owns what
each name builds), so server.http reads it without reaching into models.local."""

from __future__ import annotations

# Our scheduler names -> the sampler names AUTOMATIC1111 uses (in its PNG "parameters" text and
# its /sdapi/v1 API): the one table both directions read (server/pngmeta.py writes these names,
# server/http/a1111_schema.py maps a client's sampler_name back). "Euler (flow)" is no A1111
# name: A1111 has no flow-matching sampler, and the PNG must not claim Flux ran "Euler".
A1111_SAMPLERS: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "flow_euler": "Euler (flow)",
}
