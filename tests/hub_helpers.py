"""A Hugging Face cache written in huggingface_hub's own layout, so tests never download.

The layout (huggingface_hub's file_download.py and its "Manage the cache" guide):

    HF_HOME/hub/models--ORG--NAME/            (datasets--ORG--NAME for a dataset repo)
        blobs/<etag>                          the file contents (LFS files: their sha256)
        snapshots/<commit>/<path in repo>     relative symlink to ../../blobs/<etag>
        refs/main                             the commit hash the branch points at (no newline)

Offline, `hf_hub_download(repo, file)` reads refs/main, then snapshots/<commit>/<file>.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_repo(hf_home: Path, repo_id: str, files: dict[str, bytes | Path], *, repo_type: str = "model",
             revision: str = "main") -> Path:
    """Puts `files` (path in repo -> contents or a file to copy) into the cache; returns the snapshot folder."""
    contents = {name: (data.read_bytes() if isinstance(data, Path) else data) for name, data in files.items()}
    commit = hashlib.sha1(repr(sorted((n, hashlib.sha256(d).hexdigest()) for n, d in contents.items()))
                          .encode()).hexdigest()
    storage = Path(hf_home) / "hub" / "--".join([f"{repo_type}s", *repo_id.split("/")])
    snapshot = storage / "snapshots" / commit
    for name, data in contents.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def add_model_folder(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """An exported open_clip folder (open_clip_config.json + weights) as a model repo."""
    return add_repo(hf_home, repo_id, {p.name: p for p in Path(folder).iterdir() if p.is_file()})


def offline_env(monkeypatch, hf_home: Path) -> dict:
    """HF_HOME + HF_HUB_OFFLINE=1 for subprocesses, and the same for huggingface_hub in this process."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(Path(hf_home) / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return dict(os.environ)
