"""How a model source is spelt, for every command and the library alike.

Kept free of jax so that a command's --help (and `is_source` on its arguments) stays fast.
"""

from __future__ import annotations

from bioclip_jax import hub

LOCAL_DIR = "local-dir:"
RANDOM = "random"  # seeded random weights of an architecture name

SOURCES_HELP = ("model source: hf-hub:ORG/NAME[@REVISION] (Hugging Face Hub, cached), local-dir:PATH "
                "(open_clip folder), a .safetensors/.bin state dict, a bioclip_jax model directory or "
                "training workdir, or 'random' (seeded random weights)")


def is_source(name: str | None) -> bool:
    """Whether a model name is really a source, as open_clip accepts `hf-hub:`/`local-dir:` names."""
    return isinstance(name, str) and (hub.is_hub(name) or name.startswith(LOCAL_DIR))
