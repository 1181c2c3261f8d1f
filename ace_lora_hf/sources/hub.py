"""Sources that are a local folder or a Hugging Face Hub repository, resolved to a local folder.

Hub repositories are downloaded with `huggingface_hub` into its cache, which `HF_HOME`/`HF_HUB_CACHE`,
`HF_HUB_OFFLINE` and revisions control as for any transformers model; a cached repository is used without network.
"""

from pathlib import Path

from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..errors import ModelSourceError


OFFLINE_ADVICE = ("Run once with network access (the download is cached and later runs work offline), or download "
                  "the files elsewhere and pass a local folder (README: 'Without network').")


def local_folder(source: str | Path, option: str, revision: str | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """`source` itself if it is a folder, else the Hub repository `source` downloaded (only `allow_patterns`)."""
    path = Path(source)
    if path.is_dir():
        return path
    repo_id = _repo_id(source, option)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:
        raise _download_error(error, option, repo_id, revision) from None


def hub_file(source: str | Path, filename: str, option: str, revision: str | None = None) -> Path | None:
    """`filename` of a local folder or Hub repository, or `None` if the source has no such file."""
    path = Path(source)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    repo_id = _repo_id(source, option)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError:
        return None
    except Exception as error:
        raise _download_error(error, option, repo_id, revision) from None


def _repo_id(source: str | Path, option: str) -> str:
    if Path(source).exists():
        raise ModelSourceError(f"{option} {source}: a file, not a folder or a Hugging Face Hub repository.")
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise ModelSourceError(f"{option} {source}: no such folder, and not a Hugging Face Hub repository id "
                               "(owner/name).") from None
    return str(source)


def _download_error(error: Exception, option: str, repo_id: str, revision: str | None) -> Exception:
    """One line for the ways a download fails; anything unforeseen is re-raised as it is."""
    where = f"{option} {repo_id}" + (f" (revision {revision})" if revision else "")
    if isinstance(error, LocalEntryNotFoundError):
        reason = "offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub is unreachable"
        return ModelSourceError(f"{where}: {reason} and the repository is not in the cache ({constants.HF_HUB_CACHE}). "
                                f"{OFFLINE_ADVICE}")
    if isinstance(error, RevisionNotFoundError):
        return ModelSourceError(f"{where}: no such revision on the Hub; pass an existing branch, tag or commit.")
    if isinstance(error, GatedRepoError):
        return ModelSourceError(f"{where}: the repository is gated; accept its terms on the Hub and log in "
                                "(hf auth login).")
    if isinstance(error, RepositoryNotFoundError):
        return ModelSourceError(f"{where}: no such repository on the Hub (or it is private: log in with "
                                "hf auth login), and no such local folder.")
    if isinstance(error, HfHubHTTPError):
        return ModelSourceError(f"{where}: the Hub answered {error.response.status_code}. {OFFLINE_ADVICE}")
    return error


__all__ = ["hub_file", "local_folder"]
