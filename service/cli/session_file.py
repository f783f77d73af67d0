"""Portable sessions on the command line: continue an exported session offline, write it back.

`charlstm sample --session-in FILE` reads the JSON that `GET /sessions/{id}/export` returns, checks
and decodes its blob with the server's key, and generates from that state through the serving
engine itself, so the text is the server's to the character: the prompt is fed after the state,
then draws continue the session's random stream at its counter (a --seed re-seeds it, as a seed in
a session call does). `--session-out FILE` writes the advanced session as an export again, which
`POST /sessions/import` takes back. Without --session-in, --session-out starts a new session from
--prompt, as `POST /sessions` would.

The key is the server's: --session-key, else CHARLSTM_SESSION_KEY, else the key file the server
keeps beside its session database (--session-key-file, default `<CHARLSTM_SESSION_DB>.key`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..model import store
from ..secrets_rules import check_session_key
from ..backends.selector import CPU_BACKENDS
from ..sessions import blob as session_blob
from ..sessions.blob import InvalidSessionBlob, SessionValue
from ..engine.types import GenerationRequest
from .generation import DEFAULT_BACKEND, constraint, print_text, run, sampling_params

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session-in", metavar="FILE", default=None,
                   help="continue the session exported in FILE (the JSON of GET /sessions/{id}/export)")
    p.add_argument("--session-out", metavar="FILE", default=None,
                   help="write the continued session to FILE as an export that POST /sessions/import takes")
    p.add_argument("--session-key", default=None,
                   help="the server's session key (default: $CHARLSTM_SESSION_KEY, else the key file)")
    p.add_argument("--session-key-file", metavar="FILE", default=None,
                   help="file holding the server's key (default: <$CHARLSTM_SESSION_DB, else the server's "
                        "default session_db>.key)")
    p.add_argument("--no-verify", action="store_true",
                   help="read --session-in without checking its integrity tag (the values are still checked)")


def wants_session(args) -> bool:
    return bool(args.session_in or args.session_out)


def read_key(args) -> bytes | None:
    """The key in force for this command, or None when none is given and no key file exists: the server's
    session_key and session_db settings (its environment) unless the command line names a key or a file."""
    from ..settings import Settings  # pydantic: only when a session file is read or written

    server = Settings()
    configured = args.session_key or server.session_key
    if configured:
        check_session_key(configured)
        return configured.encode("utf-8")
    path = Path(args.session_key_file or f"{server.session_db or Settings.model_fields['session_db'].default}.key")
    if not path.exists():
        if args.session_key_file:
            raise OSError(f"the key file {path} does not exist")
        return None
    return session_blob.read_key_file(path)


def read_export(path: str) -> dict:
    try:
        export = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InvalidSessionBlob(f"{path} is not JSON: {e}") from None
    if not isinstance(export, dict) or not isinstance(export.get("data"), str):
        raise InvalidSessionBlob(f"{path} is not an exported session: it has no \"data\"")
    if export.get("format", session_blob.FORMAT) != session_blob.FORMAT:
        raise InvalidSessionBlob(f"{path} is in format {export.get('format')!r}; this version reads {session_blob.FORMAT}")
    return export


def write_export(path: str, model: str, value: SessionValue, key: bytes, backend: str) -> None:
    export = {"format": session_blob.FORMAT, "model": model, "position": value.position, "backend": backend,
              "data": session_blob.to_text(session_blob.encode(value, key))}
    Path(path).write_text(json.dumps(export, indent=2) + "\n", encoding="utf-8")


def sample_session(args) -> int:
    """`charlstm sample` with --session-in and/or --session-out."""
    key = read_key(args)
    if args.session_out and key is None:
        raise ValueError("--session-out signs the session with the server's key: give --session-key, "
                         "CHARLSTM_SESSION_KEY or --session-key-file")
    if args.session_in and key is None and not args.no_verify:
        raise ValueError("--session-in is checked with the server's key: give --session-key, CHARLSTM_SESSION_KEY "
                         "or --session-key-file, or --no-verify")
    export = read_export(args.session_in) if args.session_in else None
    loaded = store.load(args.model or (export or {}).get("model") or store.default_model(args.store), args.store)
    model_name, cfg, fingerprint = f"{loaded.name}@{loaded.version}", loaded.model.config, loaded.card["weights_sha256"]
    prompt_ids, _ = loaded.vocab.encode_with_policy(args.prompt, getattr(args, "unknown_chars", "error"),
                                                    getattr(args, "replacement", None))
    if export is None:  # a new session, primed by the prompt as POST /sessions primes it
        seed, counter, state, position = args.seed, 0, None, 0
    else:
        value = session_blob.decode(session_blob.from_text(export["data"]), key or b"", fingerprint=fingerprint,
                                    layers=cfg.num_layers, hidden=cfg.hidden_size, verify=not args.no_verify,
                                    model=model_name)
        # a seed re-seeds the session, as a seed in a session call does
        seed, counter = (value.seed, value.counter) if args.seed is None else (args.seed, 0)
        state, position = value.state, value.position
    request = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=args.length, params=sampling_params(args),
                                seed=seed, counter=counter, state=state, stop=tuple(getattr(args, "stop", None) or ()),
                                constraint=constraint(args, loaded), return_state=True)
    backend = backend_for(args, export)
    done = print_text(run(loaded, request, backend))
    if not done.completed:
        raise ValueError(f"generation did not complete ({done.finish_reason}): {done.error or 'no session written'}")
    if args.session_out:
        advanced = SessionValue(state=done.state, seed=done.seed, counter=done.counter,
                                position=position + done.prompt_tokens + done.completion_tokens,
                                created_at=time.time(), fingerprint=fingerprint)
        write_export(args.session_out, model_name, advanced, key, backend)
    return 0


def backend_for(args, export: dict | None) -> str:
    """--backend, else the backend the export was drawn with (the same text as that server), else the default."""
    if args.backend:
        return args.backend
    exported = (export or {}).get("backend")
    if exported in CPU_BACKENDS:
        return exported
    if exported:
        print(f"note: the session was exported by a server on {exported}, which runs only there; continuing on "
              f"{DEFAULT_BACKEND}, so the text differs from that server's", file=sys.stderr)
    return DEFAULT_BACKEND
