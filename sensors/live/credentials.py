"""Secrets (broker passwords, TLS keys) come from files, never the command line.

A secret is named by a *spec*:

- ``credential:NAME``: the systemd credential NAME, i.e. the file
  ``$CREDENTIALS_DIRECTORY/NAME`` (``LoadCredential=`` / ``LoadCredentialEncrypted=``
  in the unit; systemd sets CREDENTIALS_DIRECTORY for the service);
- anything else: a path to a file holding the secret.

Command-line arguments are visible to every user in ``ps``; files (mode 0600
or a systemd credential) are not.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from edgefuse.runtime.core.errors import ConfigError

log = logging.getLogger(__name__)

CREDENTIAL_PREFIX = "credential:"
MAX_SECRET_BYTES = 64 * 1024


def resolve_secret_path(spec: str) -> Path:
    """The file a spec names; ConfigError when the credential directory is not set."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"a secret spec must be a non-empty string, found {spec!r}")
    if spec.startswith(CREDENTIAL_PREFIX):
        name = spec[len(CREDENTIAL_PREFIX):]
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"credential name must be a plain file name, found {name!r}")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"secret {spec!r} names a systemd credential but CREDENTIALS_DIRECTORY is not "
                "set; add LoadCredential=" + name + ":/path/to/file to the service unit, "
                "or give a file path instead")
        return Path(directory) / name
    return Path(spec).expanduser()


def read_secret(spec: str) -> str:
    """The secret text (one trailing newline stripped).

    Raises ConfigError when the file is missing, unreadable, empty or larger
    than MAX_SECRET_BYTES. Warns when a plain file is readable by others.
    """
    path = resolve_secret_path(spec)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"secret {spec!r}: {path} is not a regular file")
        if st.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"secret {spec!r}: {path} holds {st.st_size} bytes, more than "
                              f"the {MAX_SECRET_BYTES} a secret may have; wrong file?")
        if st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and not spec.startswith(CREDENTIAL_PREFIX):
            log.warning("secret file %s is readable by group/others; chmod 600 it", path)
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read secret {spec!r} from {path}: {exc.strerror or exc}; "
                          "check the path and its permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"secret {spec!r} in {path} is not UTF-8 text") from exc
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise ConfigError(f"secret {spec!r} in {path} is empty")
    return text


def secret_file(spec: str) -> str:
    """Path of a file-valued secret (TLS key/cert/CA) after checking it is readable."""
    path = resolve_secret_path(spec)
    if not os.access(path, os.R_OK) or not path.is_file():
        raise ConfigError(f"file {spec!r} ({path}) does not exist or is not readable")
    return str(path)
