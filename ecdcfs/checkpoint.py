"""Encodec checkpoints without torch: found and downloaded like torch.hub, read safely
(:mod:`ecdcfs.torchfile`), each model's and LM's file named once (:data:`CHECKPOINTS`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import IO

import numpy as np

from .decoder import ModelUnavailable
from .settings import checkpoint_dir, write_atomically
from .torchfile import CheckpointError, one_line, read_state_dict

log = logging.getLogger(__name__)

BASE_URL = "https://dl.fbaipublicfiles.com/encodec/v0/"  # encodec.model.ROOT_URL
CHECKPOINTS = {
    "encodec_48khz": "encodec_48khz-7e698e3e.th",
    "encodec_24khz": "encodec_24khz-d7cc33bc.th",
}
LM_CHECKPOINTS = {
    "encodec_48khz": "encodec_lm_48khz-7add9fc3.th",
    "encodec_24khz": "encodec_lm_24khz-1608e3c0.th",
}

DOWNLOAD_TIMEOUT = 30.0  # seconds per socket operation
DOWNLOAD_CHUNK = 1 << 16
HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub.HASH_REGEX: the sha256 prefix in a name


def checkpoint_url(file_name: str) -> str:
    """Where Encodec downloads ``file_name`` from (``BASE_URL`` read now: tests move it)."""
    return BASE_URL + file_name


def checkpoint_path(file_name: str) -> Path:
    """Where torch.hub keeps ``file_name``: ``$TORCH_HOME/hub/checkpoints/<file_name>``."""
    return checkpoint_dir() / file_name


def fingerprint(file_name: str) -> tuple[object, ...]:
    """The checkpoint ``file_name`` as it is now: its path, size, mtime and inode, or
    ``(path, None)`` when missing; a changed fingerprint means a load is worth retrying."""
    path = checkpoint_path(file_name)
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


# --------------------------------------------------------------------------------------
# Finding and downloading
# --------------------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """A short, one-line account of a failed download."""
    if isinstance(error, urllib.error.HTTPError):
        text = f"HTTP {error.code} {error.reason}"
    elif isinstance(error, urllib.error.URLError):
        text = str(error.reason)
    else:
        text = str(error) or type(error).__name__
    return one_line(text) or type(error).__name__


def download(url: str, path: Path) -> None:
    """Stream ``url`` into ``path`` through a temp file beside it, checking its length and
    the sha256 prefix in its name exactly as torch.hub does; nothing is left on failure."""
    from tqdm import tqdm  # only a download pays for it

    match = HASH_PREFIX.search(path.name)
    prefix = match.group(1) if match else None
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        length_header = response.headers.get("Content-Length")
        expected = int(length_header) if length_header and length_header.isdigit() else None

        def write(out: IO[bytes]) -> None:
            sha = hashlib.sha256()
            done = 0
            with tqdm(
                total=expected,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=path.name,
                disable=None,
                file=sys.stderr,
            ) as bar:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and done != expected:
                raise CheckpointError(f"truncated: got {done} of {expected} bytes")
            digest = sha.hexdigest()
            if prefix is not None and not digest.startswith(prefix):
                raise CheckpointError(
                    f"its sha256 {digest} does not match the hash prefix {prefix} of its name"
                )

        write_atomically(path, write)


def fetch(file_name: str, what: str) -> Path:
    """The path of checkpoint ``file_name`` of ``what`` (a model's name, for messages),
    downloaded first if it is missing.

    Like torch.hub: a file already there is used as is (its hash is checked only on
    download), and a download is renamed into place only once complete and verified, so
    concurrent fetches of one file cannot corrupt it.
    """
    path = checkpoint_path(file_name)
    if path.exists():
        return path
    url = checkpoint_url(file_name)
    log.info("downloading %s from %s to %s", file_name, url, path.parent)
    try:
        download(url, path)
    except (OSError, HTTPException, ValueError, CheckpointError) as e:
        # URLError, HTTPError and timeouts are OSErrors; ValueError: a malformed URL.
        raise ModelUnavailable(
            f"{what} checkpoint {file_name} is missing and could not be downloaded from "
            f"{url} ({_reason(e)}); put it in {path.parent}/ (or set TORCH_HOME)"
        ) from e
    return path


def load_state_dict(file_name: str, what: str) -> dict[str, np.ndarray]:
    """The state dict of checkpoint ``file_name`` (fetched if missing) as numpy arrays.

    Raises ModelUnavailable, with a one-line message, for any failure.
    """
    path = fetch(file_name, what)
    try:
        return read_state_dict(path)
    except (CheckpointError, OSError) as e:
        raise ModelUnavailable(
            f"cannot load {what} from {path}: {_reason(e)} "
            f"(a partial or damaged copy? it comes from {checkpoint_url(file_name)})"
        ) from e
