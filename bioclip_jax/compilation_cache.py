"""JAX's persistent compilation cache, switched on the same way by every command.

A requeued training job, or a second `predict`, then loads its compiled programs from
disk instead of compiling them again (minutes for a large model on a pod). Call
`enable_compilation_cache` at start-up, before the first compile.
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

AUTO = "auto"
CACHE_SUBDIR = "xla"


def user_cache_dir() -> str:
    """bioclip_jax's own cache: $BIOCLIP_JAX_CACHE, else $XDG_CACHE_HOME/bioclip_jax (~/.cache/bioclip_jax)."""
    return os.environ.get("BIOCLIP_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bioclip_jax")


def enable_compilation_cache(setting: str = AUTO, min_compile_secs: float | None = None) -> str | None:
    """Turns the persistent cache on; returns its folder, or None when it stays off.

    `setting` (config.compilation_cache_dir): "auto" keeps a folder JAX was already given
    (JAX_COMPILATION_CACHE_DIR, jax.config), else uses user_cache_dir()/xla; a path (local
    or gs://) is used as given; "" adds no cache. `min_compile_secs` lowers or raises JAX's
    threshold for what is worth keeping (default: JAX's, 1 s).
    """
    setting = (setting or "").strip()
    current = jax.config.jax_compilation_cache_dir
    if not setting:
        return current or None
    if setting == AUTO:
        path = current or os.path.join(user_cache_dir(), CACHE_SUBDIR)
    else:
        path = setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
    if "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as error:
            raise OSError(f"compilation_cache_dir {path} cannot be created ({error.strerror}); give a writable "
                          f"folder, or --config.compilation_cache_dir= to turn the cache off") from None
    if min_compile_secs is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    if path != current:
        jax.config.update("jax_compilation_cache_dir", path)
        jax_cache.reset_cache()  # a cache opened earlier in this process would keep the old folder
    return path
