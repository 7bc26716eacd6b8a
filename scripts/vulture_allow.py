"""vulture's allow-list: names that look unused to a static reader but are used all the same.
Keep it short; every entry says who uses the name. (Read by vulture only, never imported.)"""

# ruff: noqa: B018, F821
# mypy: ignore-errors
# Hosted backends are loaded by name: models.hosted.make_hosted_backend imports them on demand.
BFLBackend
MidjourneyBackend
OpenAIImagesBackend
RemoteImagegenBackend
StabilityBackend

# Wire-schema fields (server/http/protocol.py): written to clients by pydantic, read by them.
owned_by
alias_of
queue_position
invalid_rows
manifest_url
archive_url
cost_by_provider
projected_usd
free_bytes
host_used_bytes

# Read by libraries: sqlite3 reads row_factory, uvicorn polls should_exit.
row_factory
should_exit

# Part of the result contract (GenerationResult), read by callers and tests.
fallback_from

# The tiny LoRA builder (models/local/tiny_loras.py): used by the tests and scripts/bench.py.
build_tiny_loras
TINY_LORAS

# The full-size random architectures (models/local/fullsize.py): the tests compare the counts
# with the published figures.
parameter_counts

# Pillow's module-level decompression-bomb guard (server/inputs.py): read by Pillow itself.
MAX_IMAGE_PIXELS
