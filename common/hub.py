"""Resolve a CLIP name or directory before ``from_pretrained``, and fail fast without a hub.

Why this exists: when a file is not in the local cache, huggingface_hub (2.4) first sends
one HEAD request without retries, then, finding no cached copy, retries it with
``http_backoff`` (``_hf_hub_download_to_cache_dir``): 6 attempts with a 60 s timeout each
and sleeps of 1, 2, 4, 8 and 8 s in between (23 s). transformers then asks for each
optional file in turn, each with its own backoff: ``CLIPProcessor`` makes nine such
lookups (processor_config.json three times, the preprocessor, model, chat-template and
audio-tokenizer configs, a tree listing). Here, where DNS fails at once,
``CLIPModel.from_pretrained("openai/clip-vit-base-patch32")`` fails after 35 s and
``CLIPProcessor.from_pretrained`` after 223 s, both with a traceback. Where the hub
accepts connections but never answers (a dropping firewall or a stuck proxy; tested
with a silent loopback port), it is worse: transformers' first request,
``resolve_revision`` -> ``HfApi.model_info``, has no timeout, and ``CLIPModel`` was
still waiting, silently, when ``timeout 300`` killed it.

``resolve_pretrained`` decides before any of that starts, with one request of a few
seconds, and returns what to pass to ``from_pretrained``:

| given                                  | returns / raises                               |
|----------------------------------------|------------------------------------------------|
| an existing local directory            | it, unchanged (no network)                     |
| a hub name, the hub answers            | the name, unchanged (the normal hub path)      |
| a hub name, hub unreachable or         | the cached snapshot directory, if the name is  |
| ``HF_HUB_OFFLINE=1``                   | cached; else ``PretrainedUnavailable``         |
| neither a directory nor a hub name     | ``PretrainedUnavailable``                      |

Where the hub is reachable nothing changes: its own retries still cover passing errors.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

# The CLIP a model starts from by default; here (no torch) so entry points can show it in --help.
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
PROBE_TIMEOUT_S = 5.0  # one HEAD request; a reachable hub answers in well under a second
LOCAL_DIR_HINT = ("pass a local CLIP directory instead (one saved with save_pretrained, e.g. written by "
                  "`python models/tiny_clip.py --out DIR`)")


class PretrainedUnavailable(OSError):
    """The CLIP named cannot be loaded here: not a local directory, not in the local
    cache, and the hub is unreachable or switched off. The message is one line that says
    what to do; entry points print it as ``error: ...``. An ``OSError``, like the error
    transformers raises for the same case, so existing ``except OSError`` still holds."""


def resolve_pretrained(name_or_path: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """What to pass to ``from_pretrained`` for ``name_or_path`` (see the module table).

    Raises ``PretrainedUnavailable`` within about ``timeout`` seconds when the model
    cannot be had: never the minutes of retries huggingface_hub would spend.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name_or_path).is_dir():
        return str(name_or_path)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise PretrainedUnavailable(f"cannot load {name_or_path!r}: no such directory, and not a hub model name "
                                    "(namespace/name)") from None
    if constants.is_offline_mode():
        why, fix = "HF_HUB_OFFLINE is set", "or unset HF_HUB_OFFLINE where the hub is reachable, to download it"
    else:
        fix = "or download it where the hub is reachable and set HF_HUB_OFFLINE=1 to load it from the local cache"
        why = probe_hub(name_or_path, timeout)
        if why is None:
            return name_or_path  # the hub answers: let huggingface_hub download or revalidate as usual
    cached = cached_snapshot(name_or_path)
    if cached is not None:
        logger.info("%s; loading %s from the local cache: %s", why, name_or_path, cached)
        return cached
    raise PretrainedUnavailable(f"cannot load {name_or_path!r}: it is not a local directory, it is not in the "
                                f"local Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}: "
                                f"{LOCAL_DIR_HINT}, {fix}")


def probe_hub(repo_id: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if the hub answers a HEAD for ``repo_id``'s config (any HTTP status), else why not.

    Uses huggingface_hub's own client, so proxies, certificates and ``HF_ENDPOINT`` are
    the ones the download would use. The request runs in a daemon thread joined with a
    deadline, because a DNS lookup is not bounded by the HTTP timeout.
    """
    import httpx2
    from huggingface_hub import constants, get_session, hf_hub_url

    url = hf_hub_url(repo_id, "config.json")  # the hub checkpoint's own HF config, not a model artifact's
    outcome: dict[str, str | None] = {}

    def attempt() -> None:
        try:
            get_session().head(url, timeout=timeout, follow_redirects=False)
            outcome["why"] = None  # 200, 302, 401, 404...: the hub is there; from_pretrained reports the rest
        except (httpx2.TransportError, OSError) as e:  # DNS, refused, TLS, proxy, timeout
            outcome["why"] = f"the hub at {constants.ENDPOINT} is not reachable ({type(e).__name__}: {e})"

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():  # still resolving the host name
        return f"the hub at {constants.ENDPOINT} is not reachable (no answer within {timeout:g} s)"
    return outcome["why"]


def cached_snapshot(repo_id: str) -> str | None:
    """The directory of ``repo_id``'s cached ``main`` snapshot, or None; never uses the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:  # not cached, or cached only in part (IncompleteSnapshotError)
        return None
