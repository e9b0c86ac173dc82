"""Talking to the Hugging Face hub: the token, a fast reachability probe, and the push of a folder.

Writing and checking the folder itself is :mod:`block_transformer.export`. Nothing is sent to a hub
until the folder is verified complete and loadable, and the token is only ever handed to
``huggingface_hub``: never logged, printed or written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import BlockTransformerError, first_line
from .export import verify_folder

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


class HubError(BlockTransformerError):
    """A hub that refused, could not be reached, or may not be used (no token, offline mode, bad repo id)."""


def hub_token() -> str:
    """The user's token (``HF_TOKEN`` or the ``hf auth login`` file); never logged or printed."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login`.")
    return token


def probe_hub(why: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Fail in seconds (not after the ~25 s default) when the hub cannot be reached.

    Goes through huggingface_hub's own HTTP session, so proxies, certificates and client factories
    configured for it apply here too. ``why`` ends the error message: what the user should do instead.
    """
    from huggingface_hub import constants, get_session
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except OfflineModeIsEnabled as err:
        raise HubError(f"HF_HUB_OFFLINE is set, so the hub is not contacted {why}.") from err
    except _transport_error() as err:
        raise HubError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({first_line(err)}) {why}.") from err


def check_repo_id(repo_id: str) -> None:
    """A malformed repo id is a typo: say so before any network traffic."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"{repo_id!r} is not a valid hub repo id ({first_line(err)}): use OWNER/NAME.") from err


def check_push_possible() -> str:
    """The cheap checks of a push (token present, hub reachable): run them before long work. Returns the token."""
    token = hub_token()
    probe_hub("to push; check your network or HF_ENDPOINT, then push the folder with bt-push")
    return token


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Verify ``folder``, then create ``repo_id`` (if needed) and upload the folder as one commit.

    Returns the commit URL. Nothing is sent before the folder passes
    :func:`block_transformer.export.verify_folder`, and the local folder is only read. Hidden files
    and ``__pycache__`` are not uploaded.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    summary = verify_folder(folder)
    token = check_push_possible()
    _refuse_leaked_token(folder, summary["files"], token)
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} (Block Transformer, block-transformer {__version__})"
    with _hub_errors(repo_id, token):
        role = (api.whoami().get("auth", {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise HubError(f"your Hugging Face token is read-only and cannot push to {repo_id}: use a write token.")
        # not private: None, so an organization whose default is private keeps it
        url = api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        logger.info("uploading %d files from %s to %s", len(summary["files"]), folder, url.repo_id)
        info = api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=message,
            ignore_patterns=[".*", "**/.*", "__pycache__", "**/__pycache__/*"],
        )
    return info.commit_url


def _refuse_leaked_token(folder: Path, files: list[str], token: str) -> None:
    """A token pasted into a card or config would be published: refuse, without printing it."""
    needle = token.encode()
    for name in files:
        path = folder / name
        if path.suffix == ".safetensors" or path.stat().st_size > 50_000_000:
            continue
        if needle in path.read_bytes():
            raise HubError(f"{path} contains your Hugging Face token: remove it before pushing.")


@contextmanager
def _hub_errors(repo_id: str, token: str) -> Iterator[None]:
    """Turn huggingface_hub / transport failures into one actionable line (with the token masked)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled as err:
        raise HubError("HF_HUB_OFFLINE is set: unset it to push.") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            text = "the hub rejected your token (401 Unauthorized): set HF_TOKEN to a valid write token, or run `hf auth login`."
        elif status == 403:
            text = (
                f"your token may not write to {repo_id} (403 Forbidden): use a write token that has access to "
                "that namespace, or push to your own namespace."
            )
        elif status == 404:
            text = f"{repo_id} or its namespace was not found (404): check the owner part of the repo id."
        else:
            text = f"the hub refused the push to {repo_id} ({status}: {first_line(err)})."
        raise HubError(text.replace(token, "***")) from err
    except ValueError as err:  # huggingface_hub's own validation, e.g. "Invalid metadata in README.md"
        text = f"the hub rejected the folder: {' '.join(str(err).split())}"
        raise HubError(text.replace(token, "***")) from err
    except _transport_error() as err:
        raise HubError(f"lost the connection to the Hugging Face hub while pushing to {repo_id} ({first_line(err)}): "
                       "the local folder is unchanged; run bt-push again.") from err


def _transport_error() -> type[Exception]:
    """The HTTP client's network-failure base class: huggingface_hub 2.x uses httpx2, 1.x httpx."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.TransportError
