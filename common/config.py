"""Small helpers every entry point shares: typed configs, logging, provenance, atomic JSON.

Configs are dataclasses whose fields carry ``help`` metadata; ``parse_config`` turns one
into an argparse parser, so every default and its explanation sit in one place
(HF examples' ``HfArgumentParser`` idea, without the dependency).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def field(default=dataclasses.MISSING, *, help: str, **kw):
    """A dataclass field with help text (and ``choices=`` if given; ``positional=True`` makes
    it a positional argument, ``script DIR`` rather than ``script --dir DIR``)."""
    metadata = {"help": help}
    for key in ("choices", "positional"):
        if key in kw:
            metadata[key] = kw.pop(key)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


def _arg_type(tp):
    # ``X | None`` (types.UnionType) and ``Optional[X]`` (typing.Union): parse as X.
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _arg_type(args[0])
    return tp


def parse_config(cls, argv=None, description: str | None = None):
    """Parse ``argv`` into an instance of dataclass ``cls`` (``__post_init__`` validates)."""
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _arg_type(hints[f.name])
        if f.metadata.get("positional"):  # argparse names a positional by its dest
            parser.add_argument(f.name, type=tp if tp in (int, float, str) else str, help=f.metadata.get("help", ""))
            continue
        name = "--" + f.name.replace("_", "-")
        kw = {"help": f.metadata.get("help", ""), "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = f.default
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if required:
                kw["required"] = True
            else:
                kw["default"] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(name, **kw)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:  # __post_init__ checks: a usage error, not a traceback
        parser.error(str(e))


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once, in entry points; library modules only call getLogger."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # not a line per image download
    if not sys.stderr.isatty():
        # transformers' and huggingface_hub's own bars ("Writing model shards", downloads) follow
        # ours: off a terminal. Read when they are first imported, which entry points do later.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def git_commit() -> str | None:
    """The repo's HEAD commit (with ``-dirty`` if the tree has changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def share_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and all it holds) the modes of the user's umask.

    ``tempfile.mkstemp``/``mkdtemp`` create 0600 files and 0700 directories, and safetensors
    writes 0600 files: renamed into place, an artifact would be unreadable by a server that
    runs as another user. A plain ``open`` would have given 0644/0755 (umask 022), so this
    gives the same.
    """
    mask = _umask()
    path = Path(path)
    entries = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in entries:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write JSON via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    share_modes(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temp dir beside ``final``; when the block succeeds, swap it in as ``final``.

    On any exception the temp dir is removed and ``final`` is left as it was. Readers see
    the complete old directory or the complete new one, never a half-written mix: the
    old one is moved aside before the rename and removed only afterwards.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    share_modes(tmp)
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # rename over a non-empty directory is not allowed
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def config_dict(cfg) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def bar_disabled(show: bool = True) -> bool | None:
    """tqdm's ``disable`` for a progress bar: off where ``show`` is false, and off a terminal.

    tqdm's ``None`` means "only on a TTY": written to a file or a pipe (CI, ``make demo |
    tee``) a redrawn bar becomes one line per update, while the per-epoch log lines stay.
    """
    return None if show else True
