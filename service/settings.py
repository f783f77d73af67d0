"""Service settings: environment variables with the prefix CHARLSTM_, or matching `charlstm serve` flags."""

from __future__ import annotations

from pathlib import Path

import json
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.engine import EngineConfig
from .secrets_rules import check_secret, check_session_key

ENGINE = EngineConfig()  # the engine's own defaults, stated once (service/engine/engine.py)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARLSTM_", extra="ignore", hide_input_in_errors=True)  # keys stay out of messages

    model: str = Field("", description="name, name@version or a model folder; empty: the store's default model "
                                     "(charlstm models --set-default), shakespeare when none is set")
    model_store: str | None = Field(None, description="model store root; default: the repository's model_store/")
    models: str = Field("", description="the models a request may name: empty, the default model alone; all, every model "
                                      "in the store; or a comma-separated list of name (its newest version) and name@version")
    max_loaded_models: int = Field(3, ge=1, le=256, description="models loaded at once; a load at the cap first unloads "
                                                               "the least recently used idle model")
    model_keep_alive_s: float = Field(300.0, ge=-1, description="how long a model stays loaded after its last use; "
                                                               "-1: until the cap needs its place")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int = Field(ENGINE.max_batch_size, ge=1, le=1024, description="streams stepped together")
    max_queue: int = Field(ENGINE.max_queue, ge=0, le=100_000, description="requests waiting for a row before 429")
    max_new_tokens: int = Field(4096, ge=1, le=1_000_000, description="upper bound on max_new_tokens")
    default_max_new_tokens: int = Field(256, ge=1, description="max_new_tokens when a request gives none")
    max_prompt_chars: int = Field(20_000, ge=1, le=10_000_000)
    max_score_chars: int = Field(100_000, ge=1, le=10_000_000, description="longest text POST /score takes")
    max_stop_strings: int = Field(16, ge=0, le=1024)
    max_stop_chars: int = Field(64, ge=1, le=4096, description="longest stop string")
    prefill_chunk: int = Field(ENGINE.prefill_chunk, ge=1, le=4096, description="prompts are cut at multiples of this many characters, from "
                               "each prompt's start: the longest slice a row of a block takes")
    prefill_rows: int = Field(ENGINE.prefill_rows, ge=1, le=256, description="each loop ingests one block of prompt slices, at most this many "
                              "streams' (the oldest, then shortest remaining first), in one backend call. With prefill_chunk, "
                              "bounds how long one decode step can wait for ingestion")
    max_rows_per_request: int | None = Field(ENGINE.max_rows_per_request, ge=1, le=1024, description="rows one request (all its choices) holds at once; "
                                             "its other choices wait in its own line. Unset: a quarter of max_batch_size")
    max_request_work_chars: int | None = Field(None, ge=1, description="most work one request may ask for: prompt characters x "
                                               "choices + characters to generate, over every prompt and choice; beyond it, 422 "
                                               "request_too_large. Unset: 131,072 or max_prompt_chars + max_new_tokens, whichever is "
                                               "more, so a one-choice request within those two limits always fits")
    max_logprob_entries: int = Field(262_144, ge=1, description="most log-probabilities one response may hold: positions with "
                                     "logprobs (echoed prompt included) x (1 + alternatives), over every choice (about 25 bytes each)")
    max_connections: int = Field(1024, ge=1, description="open connections (and requests) the server holds; beyond them a request gets 503")
    max_header_bytes: int = Field(32_768, ge=1024, le=1 << 24, description="request line and headers above this get 431")
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's line and headers; then 408 and the connection closes")
    body_timeout_s: float = Field(30.0, gt=0, description="time a client has to send a request's body once its headers are in; then the connection closes")
    send_timeout_s: float = Field(60.0, gt=0, description="time a response may wait for a client that reads nothing; then the connection closes")
    keep_alive_s: float = Field(5.0, gt=0, description="an idle keep-alive connection closes after this")
    chat_user_speaker: str = Field("FIRST CITIZEN", min_length=1, max_length=64,
                                   description="/v1/chat/completions: the speaker a user's message is written as (the chat template)")
    chat_assistant_speaker: str = Field("ROMEO", min_length=1, max_length=64,
                                        description="/v1/chat/completions: the speaker whose next speech the model writes")
    stream_interval_ms: float = Field(20.0, ge=0, le=1000, description="characters generated within this window go out as one SSE event; 0: one event per step")
    session_ttl_s: float = Field(600.0, gt=0, description="idle time after which a session expires")
    max_session_ttl_s: float = Field(86_400.0, gt=0)
    max_sessions: int = Field(10_000, ge=1)
    torch_threads: int = Field(1, ge=0, description="OpenMP threads inside each torch kernel; 0: torch's default. One serves best on two "
                               "cores: the step workers already use both, and OpenMP threads meet at a barrier after every kernel")
    gil_switch_interval_ms: float = Field(1.0, gt=0, le=100, description="how long a thread may hold Python's interpreter "
                                          "lock while another waits for it (sys.setswitchinterval; Python's default is 5). "
                                          "The engine thread, back from a step that released the lock, waits at most this "
                                          "long for the event loop: 1 ms served more characters at less CPU each than 5 "
                                          "(benchmarks/README.md)")
    step_workers: int | None = Field(None, ge=1, le=64, description="threads that step shares of a large batch at once (at least 16 rows "
                                     "each); 1: the engine thread steps every row. Unset: the backend's default (torch 2, torch-int8 1, "
                                     "whose step is mostly small kernels that two threads only queue on; onnx 2; benchmarks/README.md)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies above this get 413")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time running streams get to finish on SIGTERM")
    api_key: str | None = Field(None, description="when set, every route but /health and /ready needs Authorization: Bearer <key>")
    api_keys_file: Path | None = Field(None, description="a JSON file of named API keys, read at start (README, \"Clients and "
                                       "fairness\"): each client is its key's name, with an optional weight and request limit; "
                                       "works beside api_key")
    protect_metrics: bool | None = Field(None, description="/metrics needs the API key too; unset: yes whenever api_key or "
                                         "api_keys_file is set (set false to let a scraper without the key read it)")
    prompt_cost: float = Field(ENGINE.prompt_cost, gt=0, le=10, description="what one prompt character counts against its client's fair share, "
                               "in generated characters (prompts go in by blocks of several rows, cheaper a character)")
    trusted_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Host headers the server answers, comma-separated or a JSON list (for example "
        "charlstm.example.org,*.internal); others get 400 invalid_host. /health and /ready answer any host, for the "
        "orchestrator's probes. Unset: any host")
    session_db: str = Field("data/sessions.sqlite3", description="SQLite file the sessions are saved to and restored from; empty: off")
    snapshot_interval_s: float = Field(5.0, gt=0, description="how often changes no answer waits on (a lease given back, an "
                                       "expiry) are written to session_db; an acknowledged change is written before its answer")
    session_fsync: Literal["always", "everysec", "os"] = Field(
        "always", description="how far session_db's write goes before a change is acknowledged, as Redis's appendfsync: always "
        "(fsynced: a lost machine loses nothing acknowledged), everysec (fsynced within a second: a lost machine loses up to a "
        "second), os (the OS writes it when it will); a killed server loses nothing acknowledged under any of them")
    log_level: str = "info"
    session_lease_s: float = Field(30.0, gt=0, le=3600, description="a call's hold on its session; renewed while the call runs, "
                                   "so it only matters when the holder dies (then the session is free again after this)")
    session_key: str | None = Field(None, description="key that signs exported sessions (HMAC-SHA256); replicas that share "
                                    "sessions set the same one. Unset: a random key kept in <session_db>.key")
    session_blob_max_age_s: float | None = Field(7 * 86_400.0, gt=0, description="an exported session imports for this long "
                                                 "after its export (checked after the signature; then 422 session_blob_expired); "
                                                 "unset: for ever")
    drain_delay_s: float = Field(5.0, ge=0, description="on SIGTERM, keep accepting connections this long with /ready 503 and new work "
                                 "refused, so load balancers stop sending before the port closes; 0: close at once")
    backend: Literal["auto", "torch", "torch-int8", "onnx", "onnx-int8", "cuda"] = Field(
        "auto", description="the compute backend (service/backends/): auto measures every CPU backend on the loaded model at "
        "start-up (speed at 1 and max_batch_size rows, the row guarantee, quality within 0.01 bits/char of fp32, in a child "
        "process) and serves the fastest; torch and onnx are fp32, torch-int8 and onnx-int8 have int8 step weights; cuda: the "
        "GPU's CUDA graphs")
    backend_cache: str = Field("data/backend-choices.json", description="where auto remembers its choice, keyed by the weights, "
                               "the CPU and its flags, the runtimes' versions and the backends' code: a start that finds its key "
                               "builds the winner without measuring; empty: measure at every start")
    quantize: Literal["none", "int8"] | None = Field(None, description="narrows backend auto to backends with these step weights "
                                                     "(none: fp32, int8); unset: any")
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the model runs: cpu; cuda (a GPU holds the weights, "
                                                   "every row's state and the sampling, and replays each step as a CUDA graph); "
                                                   "auto: cuda when torch sees a GPU, else cpu")
    decode_steps: int | None = Field(None, ge=1, le=256, description="steps a look: the batch takes this many steps before the "
                                     "host updates the rows' text, once for all of them (a GPU returns their characters in "
                                     "one copy); rows join, leave and end between looks. Unset: 16 on a GPU, 1 on the CPU")
    quiet_steps: int = Field(ENGINE.quiet_steps, ge=1, le=64, description="on the CPU, with decode_steps 1: the steps of a look "
                             "while no row has just joined and nothing waits or is being ingested, so each loop's fixed work is "
                             "shared by that many characters; a request or a cancellation that comes ends the look after the "
                             "step in progress. 1: a look a step (newcomers' first characters a few ms sooner under load, at "
                             "more CPU a character: benchmarks/README.md)")
    session_create_rate: float = Field(5.0, gt=0, description="sessions one client (API key, or address without a key) may "
                                       "create, import or fork per second, sustained; beyond it 429 rate_limited with Retry-After")
    session_create_burst: int = Field(50, ge=1, description="sessions one client may make at once before session_create_rate applies")
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-For names the client (uvicorn's "
                                     "forwarded_allow_ips; comma-separated, or *): the address the session quota counts")
    session_store_timeout_s: float = Field(1.0, gt=0, le=30, description="Redis: the connect timeout and the timeout of each "
                                           "reply; a read that times out is not retried, a broken connection once, so one "
                                           "store operation takes at most about 4 x this")
    session_store_threads: int = Field(16, ge=1, le=256, description="threads that run session store calls (their own: a "
                                       "hanging store holds these, not the threads the rest of the server uses)")
    session_store: str = Field("memory", description="where sessions live: 'memory' (this process, saved to session_db) or "
                               "redis://host:port/db, shared by every replica pointed at it (they need the same model and session_key)")

    @property
    def metrics_protected(self) -> bool:
        return self.protect_metrics if self.protect_metrics is not None else self.requires_key

    @property
    def requires_key(self) -> bool:
        return self.api_key is not None or self.api_keys_file is not None

    @field_validator("trusted_hosts", mode="before")
    @classmethod
    def _host_list(cls, value):
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else [h.strip() for h in value.split(",") if h.strip()]
        return value or None

    @field_validator("api_key")
    @classmethod
    def _real_api_key(cls, value: str | None) -> str | None:
        if value is not None:
            check_secret(value, "CHARLSTM_API_KEY")
        return value

    @field_validator("session_key")
    @classmethod
    def _strong_key(cls, value: str | None) -> str | None:
        if value is not None:
            check_session_key(value)
        return value

    @field_validator("session_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            scheme = value.split("://", 1)[0] if "://" in value else "no scheme"  # the URL may hold a password: never echo it
            raise ValueError(f"session_store must be 'memory' or a Redis URL (redis://host:port/db); this one has {scheme!r}")
        return value

    @property
    def request_work_limit(self) -> int:
        """max_request_work_chars in force."""
        if self.max_request_work_chars is not None:
            return self.max_request_work_chars
        return max(131_072, self.max_prompt_chars + self.max_new_tokens)

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        """Settings that contradict each other fail at start, with one message naming both."""
        pairs = [("default_max_new_tokens", "max_new_tokens"), ("session_ttl_s", "max_session_ttl_s")]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low}={getattr(self, low):g} is more than {high}={getattr(self, high):g}: "
                                 f"lower {low} (CHARLSTM_{low.upper()}) or raise {high} (CHARLSTM_{high.upper()})")
        if self.quantize == "int8" and (self.device == "cuda" or self.backend == "cuda"):
            raise ValueError(f"quantize={self.quantize} is a CPU kernel and {'device' if self.device == 'cuda' else 'backend'}=cuda runs on a GPU: "
                             "set CHARLSTM_QUANTIZE=none or CHARLSTM_DEVICE=cpu")
        if self.backend == "cuda" and self.device == "cpu":
            raise ValueError("backend=cuda runs on a GPU and device=cpu asks for the CPU: set CHARLSTM_DEVICE=cuda or auto, "
                             "or another CHARLSTM_BACKEND")
        if self.backend not in ("auto", "cuda") and self.device == "cuda":
            raise ValueError(f"backend={self.backend} runs on the CPU and device=cuda asks for a GPU: set CHARLSTM_BACKEND=cuda or auto")
        if self.quantize is not None and self.backend not in ("auto", "cuda"):
            kind = "int8" if self.backend.endswith("int8") else "none"
            if kind != self.quantize:
                raise ValueError(f"quantize={self.quantize} contradicts backend={self.backend}: unset CHARLSTM_QUANTIZE, "
                                 "or pick a backend with those weights")
        return self


PREFIX = Settings.model_config["env_prefix"]


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """`CHARLSTM_` variables no setting reads (a misspelt one is otherwise silently ignored), each with the
    nearest setting's variable when there is one, for the warning a server logs at its start."""
    import difflib

    known = [name.upper() for name in Settings.model_fields]
    out = []
    for var in sorted(v for v in environ if v.upper().startswith(PREFIX) and v.upper()[len(PREFIX):] not in known):
        near = difflib.get_close_matches(var.upper()[len(PREFIX):], known, n=1, cutoff=0.8)  # on the names, not the prefix
        out.append(f"{var} (did you mean {PREFIX}{near[0]}?)" if near else var)
    return out


def settings_table() -> str:
    """Every setting as a Markdown table, from the fields themselves: the README's copy is kept in sync by a
    test (tests/unit/test_architecture.py), and `python -m service.settings` prints it."""
    rows = ["| variable | `charlstm serve` flag | default | what it does |", "|---|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = "unset" if f.default is None else repr(f.default) if isinstance(f.default, str) else f.default
        words = (f.description or "").replace("|", "\\|")
        flag = "--store" if name == "model_store" else "--" + name.replace("_", "-")  # the store's flag is every command's
        rows.append(f"| `{PREFIX}{name.upper()}` | `{flag}` | `{default}` | {words} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
