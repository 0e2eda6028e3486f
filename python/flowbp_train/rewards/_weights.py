"""Finding reward weights offline: local paths first, then the Hugging Face cache, never a hanging retry.

Every loader resolves a file or a model directory from an explicit local path option, else from the
Hugging Face cache with ``local_files_only=True`` (downloading only when the caller passes
``allow_download=True``). A miss raises ``FileNotFoundError`` at once, naming the file(s) needed, where
they are published and the option to point at them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["hf_offline", "load_hf_pretrained", "resolve_file"]


def _missing(what: str, needs: str, source: str, option: str, detail: str = "") -> FileNotFoundError:
    msg = (f"{what}: cannot load its weights offline. It needs {needs} (published at {source}). "
           f"Pass {option}=<local path>, or put the files in the Hugging Face cache, or pass allow_download=True "
           f"where network is available.")
    return FileNotFoundError(msg + (f" ({detail})" if detail else ""))


def resolve_file(path: str | os.PathLike | None, *, what: str, option: str, repo_id: str | None, filename: str,
                 source: str, allow_download: bool = False) -> Path:
    """A local file for ``filename``: ``path`` if given (must exist; a directory is joined with
    ``filename``), else the HF cache copy of ``repo_id/filename`` (downloaded only if ``allow_download``)."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / filename
        if not p.is_file():
            raise _missing(what, f"the file {filename!r}", source, option, f"{str(p)!r} does not exist")
        return p
    if repo_id is None:
        raise _missing(what, f"the file {filename!r}", source, option)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=not allow_download))
    except Exception as e:  # noqa: BLE001 - any hub error (offline, not cached, gated) means: not available
        raise _missing(what, f"the file {filename!r}", source, option, f"{type(e).__name__}") from e


def load_hf_pretrained(cls, name_or_path: str | os.PathLike, *, what: str, option: str, needs: str,
                       allow_download: bool = False, **kwargs):
    """``cls.from_pretrained(name_or_path, local_files_only=not allow_download)`` with a fast, explicit
    failure when the files are neither local nor cached."""
    try:
        return cls.from_pretrained(str(name_or_path), local_files_only=not allow_download, **kwargs)
    except (OSError, ValueError) as e:
        raise _missing(what, needs, f"https://huggingface.co/{name_or_path}", option,
                       f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


@contextlib.contextmanager
def hf_offline(enabled: bool = True) -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration (for third-party code that calls ``from_pretrained``
    without ``local_files_only``), restoring the previous value."""
    if not enabled:
        yield
        return
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
