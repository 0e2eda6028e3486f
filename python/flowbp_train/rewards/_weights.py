"""Finding reward weights offline: local paths first, then the Hugging Face cache, never a hanging retry.

Every loader resolves a file or a model directory from an explicit local path option, else from the
Hugging Face cache with ``local_files_only=True`` (downloading only when the caller passes
``allow_download=True``). A miss raises ``FileNotFoundError`` at once, naming the file(s) needed, where
they are published and the option to point at them. The ``check_*`` functions answer the same question
without loading or downloading anything (the rewards' ``check_files``, run before any model loads).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["check_file", "check_hf_dir", "check_module", "hf_offline", "load_hf_pretrained", "resolve_file"]


def _missing(what: str, needs: str, source: str, option: str, detail: str = "") -> FileNotFoundError:
    bare = option.split(".")[-1].split(":")[-1]  # option may carry the CLI's prefix: reward_kwargs.<bare>
    allow = f"{option[: len(option) - len(bare)]}allow_download=true"
    msg = (f"{option}: {what} cannot load its weights offline. It needs {needs} (published at {source}). "
           f"Pass {option}=<local path>, or put the files in the Hugging Face cache, or pass {allow} "
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


def _in_cache(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # noqa: BLE001 - an id the cache cannot hold is not in it
        return False


def check_file(path: str | os.PathLike | None, *, what: str, option: str, repo_id: str | None, filename: str,
               source: str, allow_download: bool = False) -> None:
    """What :func:`resolve_file` would find, without downloading: ``path`` (a file, or a folder holding
    ``filename``) must exist; without ``path``, ``repo_id/filename`` must be in the Hugging Face cache
    unless ``allow_download``. Raises the same FileNotFoundError, naming ``option``."""
    if path is not None:
        p = Path(path).expanduser()
        p = p / filename if p.is_dir() else p
        if not p.is_file():
            raise _missing(what, f"the file {filename!r}", source, option, f"{str(p)!r} does not exist")
        return
    if repo_id is None:
        raise _missing(what, f"the file {filename!r}", source, option)
    if not allow_download and not _in_cache(repo_id, filename):
        raise _missing(what, f"the file {filename!r}", source, option, "not in the Hugging Face cache")


def check_hf_dir(name_or_path: str | os.PathLike, *, what: str, option: str, needs: str,
                 files: tuple[str, ...] = ("config.json",), allow_download: bool = False) -> None:
    """A transformers model or tokenizer folder (or a hub id in the cache) holding one of ``files``."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not any((p / f).is_file() for f in files):
            raise _missing(what, needs, f"https://huggingface.co/{name_or_path}", option,
                           f"{str(p)!r} has none of {', '.join(files)}")
        return
    if str(name_or_path).startswith((".", "/", "~")):
        raise _missing(what, needs, "a local folder", option, f"{str(p)!r} does not exist")
    if not allow_download and not any(_in_cache(str(name_or_path), f) for f in files):
        raise _missing(what, needs, f"https://huggingface.co/{name_or_path}", option, "not in the Hugging Face cache")


def check_module(module: str, message: str) -> None:
    """ImportError(``message``) unless ``module`` can be imported (checked without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(message)
