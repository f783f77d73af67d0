"""Choosing the next character: per-stream random numbers and vectorised sampling controls.

Each stream owns its random state as two integers, a seed and a counter. The uniform number a stream
draws at its n-th character is a hash of (seed, n), so it does not depend on which other streams share
the batch, and a stream's random state can be saved, restored or forked by copying two integers.

The hash and the samplers are written once, over the array API (`array_api_compat`): the engine runs
them on numpy arrays on the host, and the CUDA backend (backends/cuda.py) on torch tensors on its
device, inside a CUDA graph (`branch_free=True`: no decision is taken from the data, so nothing waits
for the device). Two primitives take each library's own kernel (`softmax`, `_take_rows`). A few shortcuts
for tiny host batches (Python's integers and floats instead of a dozen numpy calls) compute the same
bits; tests/unit/test_sampling.py pins each against the definition, tests/unit/test_cuda.py the torch
form against the numpy one.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field, fields

import array_api_compat
import numpy as np
from array_api_compat import numpy as numpy_xp

MAX_SEED = 2**53 - 1  # the largest integer every JSON client holds exactly
# Below this temperature a row samples greedily (vLLM's floor): a logit divided by 1e-40 overflows float32
# to inf, the softmax of inf is NaN, and a NaN distribution draws the vocabulary's last character for ever.
MIN_TEMPERATURE = 1e-5
# The repetition penalty's bounds (the protocols refuse others): at 1e-40 a logit overflows the same way.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
SMALL_BATCH = 8  # up to this many rows, Python's integers and floats beat a dozen numpy calls on tiny arrays


def namespace(x):
    """The array API namespace of x: numpy's at once (the host's every call), else array_api_compat's look-up."""
    return numpy_xp if type(x) is np.ndarray else array_api_compat.array_namespace(x)


# SplitMix64 (Steele, Lea and Flood), in int64 arithmetic so that every array library runs it: a product
# wraps modulo 2**64 as uint64's does, and a logical right shift is the arithmetic one with the sign's
# copies masked off. The constants are the uint64 ones as the int64s with the same bits.
def _int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


_MASK = (1 << 64) - 1
_GOLDEN_U, _M1_U, _M2_U = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GOLDEN, _M1, _M2 = _int64(_GOLDEN_U), _int64(_M1_U), _int64(_M2_U)


def _shr(z, k: int):
    """Logical right shift of int64 bits (>> on int64 is arithmetic: mask the sign's copies)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def mix64(z):
    """SplitMix64's finaliser, a bijective 64-bit hash, elementwise over an int64 array of any library."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniforms_from_keys(keys, counters):
    """Each stream's `counter`-th uniform in [0, 1) from its key (its seed hashed once, `stream_key`).
    keys, counters int64, broadcasting: (1, B) keys with (k, B) counters give every row's next k draws.
    -> float64 of their shape."""
    xp = namespace(keys)
    z = mix64(keys + (counters + 1) * _GOLDEN)
    return xp.astype(_shr(z, 11), xp.float64) * (1.0 / 2**53)


def _mix64_int(z: int) -> int:
    """`mix64` of one Python integer in [0, 2**64) (the same bits: every product taken modulo 2**64)."""
    z = ((z ^ (z >> 30)) * _M1_U) & _MASK
    z = ((z ^ (z >> 27)) * _M2_U) & _MASK
    return z ^ (z >> 31)


def stream_key(seed: int) -> int:
    """A stream's key: its seed hashed once, as the int64 with the uint64's bits."""
    return _int64(_mix64_int(seed & _MASK))


def _uniform_int(key: int, counter: int) -> float:
    """`uniforms_from_keys` of one stream in Python's integers: key the uint64 key, the same bits."""
    return (_mix64_int((key + (counter + 1) * _GOLDEN_U) & _MASK) >> 11) * (1.0 / 2**53)


def look_uniforms(keys: np.ndarray, counters: np.ndarray, k: int) -> np.ndarray:
    """Every stream's next k uniforms at once, on the host: keys (B,) int64 (`stream_key` of each seed, which
    a batch keeps), counters (B,) the draws made so far -> (k, B) float64, row j the draws at counter + j.
    The same bits as `uniforms`; one call a look instead of one a step and no seed hashed again (a
    64-row look of 4: measured in benchmarks/README.md)."""
    if len(keys) * k <= 2 * SMALL_BATCH:  # Python's integers, about 1.2 us a draw, beat numpy's 12 us a call up to here
        return np.array([[_uniform_int(key & _MASK, c + j) for key, c in zip(keys.tolist(), counters.tolist())]
                         for j in range(k)], dtype=np.float64).reshape(k, len(keys))
    return uniforms_from_keys(keys[None, :], counters.astype(np.int64)[None, :] + np.arange(k, dtype=np.int64)[:, None])


def uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per stream for its `counter`-th draw, on the host. seeds, counters: (B,)
    integers -> (B,) float64. A few rows take Python's integers: the same bits as `uniforms_from_keys`."""
    if len(seeds) <= SMALL_BATCH:
        return np.array([_uniform_int(_mix64_int(int(s) & _MASK), int(c)) for s, c in zip(seeds.tolist(), counters.tolist())],
                        dtype=np.float64)
    return uniforms_from_keys(mix64(np.asarray(seeds).astype(np.int64)), np.asarray(counters).astype(np.int64))


def control(default, doc: str, *, native: bool = True, openai: dict | bool = True, **bounds):
    """A sampling control: its default, what it does and its bounds, the one statement every protocol and the
    command line read (service/api/fields.py builds their fields from it, the CLI its flags). `native`: the
    native routes take it; `openai`: the /v1 routes take it (a dict: with these bounds or words instead;
    False: the protocol spells it otherwise, as OpenAI's logprobs do)."""
    return field(default=default, metadata={"doc": doc, "bounds": bounds, "native": native, "openai": openai})


@dataclass(frozen=True)
class SamplingParams:
    """One stream's controls. The defaults switch every filter off (plain sampling at temperature 1). A control is
    one field here and its arithmetic in `sample_next` (on the host and on a device): the batch, the protocols
    and the command line take every field."""

    temperature: float = control(1.0, f"0 (or anything below {MIN_TEMPERATURE:g}) means greedy", ge=0.0, le=100.0,
                                 openai={"le": 2.0})
    top_k: int = control(0, "keep the k most likely characters; 0 means off", ge=0, le=1_000_000,
                         openai={"ge": -1, "doc": "extension: keep the k most likely characters; 0 or -1 means off"})
    top_p: float = control(1.0, "nucleus sampling: keep the most likely characters until their probabilities sum to "
                           "top_p; 1 means off", gt=0.0, le=1.0)
    min_p: float = control(0.0, "keep only the characters at least min_p times as likely as the most likely one (after "
                           "temperature and top-k); 0 means off", ge=0.0, le=1.0)
    repetition_penalty: float = control(1.0, "divides the logits of characters already in the prompt or text; 1 means off",
                                        ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    presence_penalty: float = control(0.0, "subtracted from the logit of every character generated so far; 0 means off",
                                      ge=-2.0, le=2.0, native=False)
    frequency_penalty: float = control(0.0, "subtracted once per time a character was generated so far; 0 means off",
                                       ge=-2.0, le=2.0, native=False)
    top_logprobs: int = control(0, "how many most likely alternatives to report at each position; never changes the "
                                "draw", ge=0, le=5, native=False, openai=False)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


CONTROLS = tuple(f.name for f in fields(SamplingParams))


def controls_for(route: str) -> list:
    """The SamplingParams fields a route takes ("native" also serves the command line; "openai")."""
    return [f for f in fields(SamplingParams) if f.metadata[route]]


def control_type(f) -> type:
    """A control field's type, int or float (the annotations are strings here: `from __future__ import annotations`)."""
    return int if f.type in (int, "int") else float


_BOUNDS = {"ge": (">=", lambda x, v: x >= v), "gt": (">", lambda x, v: x > v), "le": ("<=", lambda x, v: x <= v),
           "lt": ("<", lambda x, v: x < v)}


def bound_error(name: str, value: float) -> str | None:
    """What is wrong with `value` for the control `name` against its bounds; None when it is within them."""
    bounds = next(f for f in fields(SamplingParams) if f.name == name).metadata["bounds"]
    if all(_BOUNDS[k][1](value, v) for k, v in bounds.items()):
        return None
    return f"{name} must be {' and '.join(f'{_BOUNDS[k][0]} {v:g}' for k, v in bounds.items())}, got {value:g}"


def filtering(top_k, top_p, min_p=None, **_):
    """(B,) bool: the rows with a filter on (top-k, nucleus or min-p), which sample in order of probability.
    Takes a batch's controls by name (`filtering(**controls)`); the others are ignored."""
    on = (top_k > 0) | (top_p < 1.0)
    return on if min_p is None else on | (min_p > 0.0)


def sample_next(
    logits,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    seen,
    u,
    want_logprobs: bool = True,
    *,
    min_p=None,
    presence_penalty=None,
    frequency_penalty=None,
    counts=None,
    top_logprobs=None,
    raw=None,
    branch_free: bool = False,
):
    """Pick one character per row, each row with its own controls, without a Python loop over rows.

    logits (B, V) float32; temperature, top_p, min_p, repetition_penalty (B,) float32; top_k (B,) int64;
    seen (B, V) bool or None: characters already in each stream's prompt or text; u (B,) float64 uniforms.
    presence_penalty, frequency_penalty (B,) float32 with counts (B, V): how often each row generated
    each character (OpenAI's penalties; None when no row asks, and a row with 0 keeps its logits
    bit for bit). top_logprobs is a reporting control (see `top_alternatives`): the draw ignores it.
    raw: the model's logits when `logits` were masked (a constraint), for the log-probabilities.
    branch_free: take every row through every filter instead of skipping what no row asks for (what a
    CUDA graph needs: a skip is a decision read from the device); the picks are the same either way.
    Returns (ids (B,) int64, logprobs (B,) float32 or None): the log-probability of each chosen
    character under the model's own distribution, before penalty, temperature and filters.
    A row picks the first character whose cumulative probability exceeds its uniform, in descending
    order of probability when a filter is on and in vocabulary order otherwise. Numpy arrays on the
    host, torch tensors on a device: the same steps (a GPU's exp and sums round otherwise than numpy's,
    so a seed's text is the same on every device of one kind, not across kinds).
    """
    xp = namespace(logits)
    B, V = logits.shape
    raw = logits if raw is None else raw
    if seen is not None:  # a row whose penalty is 1 keeps its logits bit for bit
        pen = repetition_penalty[:, None]  # (B, 1)
        logits = xp.where(seen, xp.where(logits > 0, logits / pen, logits * pen), logits)
    if counts is not None:  # x - 0 * c - 0 * [c > 0] is x bit for bit, so rows without these penalties keep their logits
        c = xp.astype(counts, logits.dtype, copy=False)  # (B, V)
        logits = logits - frequency_penalty[:, None] * c - presence_penalty[:, None] * xp.astype(c > 0, logits.dtype)
    greedy, scale = temperature_scale(temperature)  # (B,), (B,)
    filtered = filtering(top_k, top_p, min_p)  # (B,) rows with a top-k, nucleus or min-p filter
    if not branch_free and not filtered.any():
        return sample_plain(logits, scale, greedy, u, want_logprobs, any_greedy=bool(greedy.any()), raw=raw)
    # Filtered rows work in descending order of probability; the others keep vocabulary order, so
    # a row draws the same character whatever the other rows of the batch ask for.
    scaled = logits / scale[:, None]  # (B, V)
    ranks = xp.arange(V, device=array_api_compat.device(logits))[None, :]  # (1, V)
    descending = xp.argsort(-scaled, axis=-1, stable=True)  # (B, V): ties keep vocabulary order
    order = xp.where(filtered[:, None], descending, ranks)  # (B, V)
    ordered = _take_rows(scaled, order)  # (B, V)
    k = xp.where((top_k > 0) & (top_k < V), top_k, V)[:, None]  # (B, 1)
    probs = softmax(xp.where(ranks >= k, -xp.inf, ordered))  # (B, V)
    before = xp.cumulative_sum(probs, axis=-1, dtype=xp.float32) - probs  # mass strictly above each rank
    keep = before < top_p[:, None]  # (B, V)
    if min_p is not None:  # a rank's probability against the most likely character's (rank 0)
        keep = keep & (probs >= min_p[:, None] * probs[:, :1])
    keep = keep | (ranks == 0) | ~filtered[:, None]  # the top character stays; unfiltered rows keep everything
    pick = _draw(probs * keep, u)  # (B,) a rank
    pick = _take_rows(order, pick[:, None])[:, 0]  # (B,) a character
    if branch_free or greedy.any():
        pick = xp.where(greedy, xp.argmax(logits, axis=-1), pick)
    return pick, _logprobs(raw, pick) if want_logprobs else None


def temperature_scale(temperature):
    """temperature (B,) -> (greedy (B,) bool: rows below MIN_TEMPERATURE, scale (B,): what each row's
    logits are divided by, its temperature, 1 for greedy rows (their pick is the argmax anyway))."""
    xp = namespace(temperature)
    greedy = temperature < MIN_TEMPERATURE
    return greedy, xp.astype(xp.where(greedy, 1.0, temperature), xp.float32)


def softmax(x):
    """Row-wise softmax in float32. x (B, V) -> (B, V). Each row alone: the same bits in any batch. A primitive
    with each library's own kernel: numpy's, and torch's fused one on tensors (torch's general sum lays its
    threads out on a GPU by the number of rows, so a row would sum in another order alone than in a batch)."""
    if type(x) is not np.ndarray:
        return x.softmax(-1)
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # (B, V), contiguous: numpy's vector exp on every element
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    """Row-wise log-softmax in float32. x (B, V) -> (B, V). Each library's own kernel, as `softmax`."""
    if type(x) is not np.ndarray:
        return x.log_softmax(-1)
    shifted = x - x.max(axis=-1, keepdims=True)  # (B, V)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_plain(logits, scale, greedy, u, want_logprobs: bool = True, *, any_greedy: bool = True, raw=None,
                 unit_scale: bool = False):
    """`sample_next` for rows with no filter or penalty: temperature and greedy only, in vocabulary order,
    with no sort. A batch that worked out its scale once calls it directly, and so does a device step
    whose rows ask for nothing more (the lean graph).

    logits (B, V); scale (B,) the temperature, 1 for greedy rows; greedy (B,) bool; u (B,) float64.
    any_greedy False (the caller knows no row is greedy) skips the argmax; raw: the logits before any
    penalty, for the log-probabilities (default: logits). unit_scale True (the caller knows every scale is 1)
    skips the division, which would leave every bit as it is. Returns (ids (B,) int64, logprobs (B,) or None)."""
    xp = namespace(logits)
    pick = _draw(softmax(logits if unit_scale else logits / scale[:, None]), u)  # (B,)
    if any_greedy:
        pick = xp.where(greedy, xp.argmax(logits, axis=-1), pick)
    return pick, _logprobs(logits if raw is None else raw, pick) if want_logprobs else None


def _draw(probs, u):
    """The first column whose cumulative probability exceeds each row's uniform. probs (B, V), u (B,) -> (B,) int64.
    On the host the cumulative sum runs left to right in float64, one addition at a time (numpy's cumsum does
    the same), so a few rows take Python's floats: the same bits, without numpy's fixed cost per call."""
    B, V = probs.shape
    if B <= SMALL_BATCH and type(probs) is np.ndarray:
        picks = []
        for row, x in zip(probs.tolist(), u.tolist()):
            cdf = list(itertools.accumulate(row))
            picks.append(min(bisect.bisect_right(cdf, x * cdf[-1]), V - 1))
        return np.array(picks, dtype=np.int64)
    if type(probs) is np.ndarray:  # numpy's own calls: the array API's wrappers cost a quarter of the draw
        cdf = np.cumsum(probs, axis=-1, dtype=np.float64)  # (B, V)
        return np.minimum(np.count_nonzero(cdf <= (u * cdf[:, -1])[:, None], axis=1), V - 1)
    xp = namespace(probs)
    cdf = xp.cumulative_sum(probs, axis=-1, dtype=xp.float64)  # (B, V)
    target = (u * cdf[:, -1])[:, None]  # (B, 1): the rows' mass need not sum to 1
    count = xp.sum(cdf <= target, axis=1)  # (B,) int64: searchsorted, right side, row by row
    return xp.where(count < V, count, V - 1)


def _logprobs(raw, pick):
    """Each picked character's log-probability under the model's own distribution. raw (B, V), pick (B,) -> (B,)."""
    return _take_rows(log_softmax(raw), pick[:, None])[:, 0]


def _take_rows(x, idx):
    """out[r, j] = x[r, idx[r, j]]. x (B, V), idx (B, J) -> (B, J). numpy's take_along_axis; torch's gather
    (array_api_compat's take_along_axis adds three kernels a call for negative indices, which never occur here)."""
    if type(x) is np.ndarray:
        return np.take_along_axis(x, idx, axis=1)
    return x.gather(1, idx)


def top_alternatives(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely characters of each row and their log-probabilities under the model's own
    distribution (as the sampled character's figure), most likely first; ties in vocabulary order.
    logits (B, V) -> ids (B, k) int64, logprobs (B, k) float32."""
    lps = log_softmax(logits)  # (B, V)
    ids = np.argsort(-lps, axis=-1, kind="stable")[:, : min(k, logits.shape[1])]  # (B, k)
    return ids, np.take_along_axis(lps, ids, axis=1)
