"""The modes of what the session layer writes: the database holds every session id (a session's only
credential) and every state, and the key file signs every blob, so none of it is for other users."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("charlstm.sessions")

FILE_MODE = 0o600  # the database holds every session id, which is a session's only credential
FOLDER_MODE = 0o700


def private_folder(folder: Path) -> None:
    """Make the session folder 0700 when this server creates it; an existing folder is the operator's,
    so it is only reported when others can read it."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=FOLDER_MODE, exist_ok=True)
        os.chmod(folder, FOLDER_MODE)
    elif folder.stat().st_mode & 0o077:
        log.warning("the session folder %s can be read by other users (mode %o): make it 0700", folder,
                    folder.stat().st_mode & 0o777)
