"""Models and data files from the Hugging Face Hub, through huggingface_hub's own cache.

A source `hf-hub:ORG/NAME[@REVISION]` names a model repo holding an open_clip folder, as
open_clip reads it: `open_clip_config.json` and the weights, `open_clip_model.safetensors`
when the repo has it, else `open_clip_pytorch_model.bin`. Files are fetched one by one with
`hf_hub_download`, so everything huggingface_hub honours applies unchanged: the cache
(`HF_HOME`, `HF_HUB_CACHE`), `HF_HUB_OFFLINE=1`, and the token (`HF_TOKEN` or
`huggingface-cli login`). A file that is neither cached nor downloadable becomes one
FileNotFoundError sentence naming the repo and the cache folder.

Whether the Hub answers is asked once per process, by one HEAD request without retries
(`PROBE_TIMEOUT_S`): left to itself, huggingface_hub retries an unreachable Hub for about
25 s per file before it falls back to the cache. An unreachable Hub is then treated as
HF_HUB_OFFLINE=1 is: cached files are used, and a missing one is the one sentence at once.

The tree-of-life text embeddings that pybioclip pairs with its two models live in dataset
repos (`TREE_OF_LIFE`), under `embeddings/txt_emb_species.npy` and `.json`.
"""

from __future__ import annotations

import dataclasses
import os

PREFIX = "hf-hub:"
CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order

BIOCLIP = "hf-hub:imageomics/bioclip"
BIOCLIP_2 = "hf-hub:imageomics/bioclip-2"
DEFAULT_MODEL = BIOCLIP_2  # pybioclip's default
TREE_OF_LIFE = {BIOCLIP: "imageomics/TreeOfLife-10M", BIOCLIP_2: "imageomics/TreeOfLife-200M"}
TREE_OF_LIFE_FILES = ("embeddings/txt_emb_species.npy", "embeddings/txt_emb_species.json")
PROBE_TIMEOUT_S = 5.0  # a Hub that has not answered one HEAD request by then is taken as unreachable

_unreachable: dict[str, str] = {}  # endpoint -> why it could not be reached (probed once per process)
_reachable: set[str] = set()


@dataclasses.dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source: str) -> HubRef:
    """`hf-hub:ORG/NAME[@REVISION]` -> HubRef; anything else is refused with the expected form."""
    repo, _, revision = source[len(PREFIX):].partition("@")
    parts = repo.split("/")
    if not source.startswith(PREFIX) or len(parts) != 2 or not all(parts) or (_ and not revision):
        raise ValueError(f"{source!r} is not a hub source; expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return HubRef(repo, revision or None)


def cache_dir() -> str:
    """The folder huggingface_hub caches into (HF_HUB_CACHE, or HF_HOME/hub)."""
    from huggingface_hub import constants  # noqa: PLC0415 - keep CLI start-up light

    return str(constants.HF_HUB_CACHE)


def download(repo_id: str, filename: str, *, repo_type: str | None = None, revision: str | None = None) -> str:
    """Local path of one file of a repo, from the cache or downloaded into it."""
    from huggingface_hub import hf_hub_download  # noqa: PLC0415
    from huggingface_hub import errors  # noqa: PLC0415

    kind = "dataset " if repo_type == "dataset" else ""
    where = f"{kind}repo {repo_id}" + (f"@{revision}" if revision else "")
    unreachable = None if _offline() else _unreachable_because(repo_id, filename, repo_type, revision)
    try:
        return hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                               local_files_only=unreachable is not None)
    except errors.LocalEntryNotFoundError:
        offline = (" (HF_HUB_OFFLINE is set)" if _offline() else
                   f" and the Hub cannot be reached ({unreachable})" if unreachable else
                   " and the Hub cannot be reached")
        raise FileNotFoundError(f"{filename} of the Hugging Face {where} is not in the cache at {cache_dir()}"
                                f"{offline}; download it once with network access, or point HF_HOME at a "
                                f"cache that has it") from None
    except errors.GatedRepoError:
        raise FileNotFoundError(f"the Hugging Face {where} is gated: accept its terms on huggingface.co and log in "
                                f"(huggingface-cli login or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"the Hugging Face {where} does not exist or is private "
                                f"(log in with huggingface-cli login or HF_TOKEN if it is yours)") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"the Hugging Face {where}: no such revision") from None
    except errors.EntryNotFoundError:
        raise FileNotFoundError(f"the Hugging Face {where} has no file {filename}") from None


def _offline() -> bool:
    from huggingface_hub import constants  # noqa: PLC0415

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable_because(repo_id: str, filename: str, repo_type: str | None, revision: str | None) -> str | None:
    """None when the Hub answers (any HTTP status), else why not; asked once per endpoint and process."""
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url  # noqa: PLC0415

    endpoint = constants.ENDPOINT
    if endpoint not in _reachable and endpoint not in _unreachable:
        url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
        try:
            get_hf_file_metadata(url, timeout=PROBE_TIMEOUT_S)
            _reachable.add(endpoint)
        except errors.HfHubHTTPError:  # the Hub answered (not found, gated, ...): hf_hub_download says what
            _reachable.add(endpoint)
        except Exception as error:  # noqa: BLE001 - the HTTP client's own network errors differ by version
            reason = str(error).strip().splitlines()
            _unreachable[endpoint] = f"{endpoint}: {type(error).__name__}" + (f": {reason[0]}" if reason else "")
    return _unreachable.get(endpoint)


def model_folder(source: str) -> str:
    """The cached snapshot folder holding a hub model's config and weights (fetched if needed)."""
    ref = parse(source)
    config_path = download(ref.repo_id, CONFIG_FILE, revision=ref.revision)
    missing = None
    for name in WEIGHT_FILES:
        try:
            weights = download(ref.repo_id, name, revision=ref.revision)
        except FileNotFoundError as error:
            missing = missing or error
            continue
        if os.path.dirname(weights) != os.path.dirname(config_path):
            raise FileNotFoundError(f"{source}: the config and weights come from different revisions; "
                                    f"pin one with {PREFIX}{ref.repo_id}@REVISION")
        return os.path.dirname(config_path)
    raise missing


def weights_path(folder: str) -> str:
    """The weights file of a snapshot folder, in open_clip's order of preference."""
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no {' or '.join(WEIGHT_FILES)} in {folder}")


def tree_of_life_repo(source: str | None) -> str | None:
    """The dataset repo of a model's tree-of-life embeddings (pybioclip's pairing), or None."""
    if not is_hub(source):
        return None
    ref = parse(source)
    return TREE_OF_LIFE.get(PREFIX + ref.repo_id)


def tree_of_life_folder(dataset_repo: str, revision: str | None = None) -> str:
    """Local folder with txt_emb_species.npy/.json of a tree-of-life dataset repo (fetched if needed)."""
    paths = [download(dataset_repo, name, repo_type="dataset", revision=revision) for name in TREE_OF_LIFE_FILES]
    return os.path.dirname(paths[0])
