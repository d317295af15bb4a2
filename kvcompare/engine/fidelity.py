"""Before any cell: does kvcompare compute exactly what the model computes? A model it cannot reproduce is
refused, never measured wrongly.

Two probes on a few random tokens, run once the weights are loaded:

1. **Logits.** kvcompare's `full` cache, fed in chunks through kvcompare's attention function, against the
   model's own forward pass (its own attention implementation, one pass, no cache). A feature of the model's
   attention that kvcompare did not give a layer (a soft-cap, learned sinks, a window, another scaling) shows
   here.
2. **Moved keys** (what shift mode relies on). The keys each layer writes when the tokens sit ``SHIFT``
   positions later, against kvcompare's re-rotation of the keys written at their own positions, layer by
   layer. Another rotary layout, other frequencies for a layer, or a layer without RoPE shows here.

Each error is the largest absolute difference relative to the largest magnitude of the reference. The logits
may differ by TOLERANCE for the dtype, or by ROUNDING_FACTOR times what the model's own forward pass differs
from itself when fed in the same chunks through transformers' cache (rounding grows with a model's depth in
bfloat16), whichever is larger. The errors go to run.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvcompare.config import CacheConfig
from kvcompare.core import full_cache
from kvcompare.engine.attention import CACHE_KEYWORD, CALLS, LAYER_FEATURES, forward_cache
from kvcompare.engine.executor import Executor
from kvcompare.engine.rope import Rotary, UnsupportedModelError

#: Tokens of the probe, fed to kvcompare in chunks of PROBE_CHUNK (so the chunked path is exercised).
PROBE_TOKENS = 24
PROBE_CHUNK = 8
#: Positions the keys are moved by in the second probe.
SHIFT = 5
#: The largest relative error always accepted, by dtype.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
#: Beyond it, kvcompare may differ from the model's one pass by this many times the model's own chunked
#: forward does (bfloat16 rounding grows with the depth of a model; a feature kvcompare misses does not).
ROUNDING_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How closely kvcompare reproduced the model (relative errors; see the module docstring)."""

    logit_error: float
    key_error: float
    layer_kinds: list[str] = dataclasses.field(default_factory=list)  # each layer's attention and RoPE
    own_chunked_error: float = 0.0  # the model's own chunked forward against its one pass (its rounding)
    tokens: int = PROBE_TOKENS

    def as_dict(self) -> dict[str, Any]:
        """The probe's findings for run.json."""
        return dataclasses.asdict(self)


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = float(theirs.abs().max())
    return float((ours.float() - theirs.float()).abs().max()) / (scale or 1.0)


@torch.inference_mode()
def _keys_written(executor: Executor, ids: torch.Tensor, offset: int) -> torch.Tensor:
    """The keys every layer writes for ``ids`` placed at positions ``offset``.. (``[layers, heads, T, d]``)."""
    cache = executor.new_cache(full_cache(), CacheConfig(None, ids.shape[1], "true", ()), capacity=ids.shape[1])
    positions = torch.arange(offset, offset + ids.shape[1], device=executor.device).view(1, -1)
    with executor.attached(), forward_cache(cache):
        executor.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, **{CACHE_KEYWORD: cache})
    cache.advance(ids.shape[1])
    return cache.full_kv[0, :, 0, :, : ids.shape[1]].clone()


@torch.inference_mode()
def check_fidelity(executor: Executor, shift: bool = True) -> Fidelity:
    """Refuse KV-shared layers (:func:`refuse_shared_kv`), then run both probes; raise UnsupportedModelError naming
    what differs when the logits' error is over
    TOLERANCE, or the moved keys' error when the run uses shift mode (``shift``; else it is only recorded).

    Where a layer's keys do not move as its rotary was read (:func:`kvcompare.engine.rope.layer_rotaries`), the other
    layouts are tried against the model's own keys (adjacent pairs instead of halves, or no RoPE at all), and
    one that reproduces them exactly is adopted in ``executor.rotary``: what the model computes decides.
    """
    model, dtype = executor.model, executor.layout.dtype
    limit = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    name = type(model).__name__
    refuse_shared_kv(model.config, name, model)
    ids = torch.randint(0, executor.vocab, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    ids = ids.to(executor.device)
    own = model(input_ids=ids, use_cache=False).logits  # the model alone: its own errors are its own
    cache = executor.new_cache(full_cache(), CacheConfig(None, PROBE_CHUNK, "true", ()), capacity=PROBE_TOKENS)
    features: dict[int, tuple[float | None, float | None, bool]] = {}
    calls, token = CALLS[0], LAYER_FEATURES.set(features)
    try:
        with executor.attached():
            chunks = [ids[:, start : start + PROBE_CHUNK] for start in range(0, PROBE_TOKENS, PROBE_CHUNK)]
            ours = torch.cat([executor.forward(cache, chunk)[0] for chunk in chunks], dim=1)
        at_zero, shifted = _keys_written(executor, ids, 0), _keys_written(executor, ids, SHIFT)
    except UnsupportedModelError:
        raise
    except Exception as err:  # the model's code does not run with kvcompare's cache and attention
        raise UnsupportedModelError(_failed_to_run(name, err, CALLS[0] == calls)) from err
    finally:
        LAYER_FEATURES.reset(token)
    if CALLS[0] == calls:
        raise UnsupportedModelError(_failed_to_run(name, None, True))
    logit_error = _relative(ours, own)
    own_error = _own_chunked_error(executor, ids, own)
    allowed = max(limit, ROUNDING_FACTOR * own_error)  # the model's own rounding, chunked against one pass
    if not logit_error <= allowed:
        raise UnsupportedModelError(
            f"kvcompare does not reproduce {name}'s own forward pass: its logits differ by {logit_error:.2e} "
            f"(relative) on a {PROBE_TOKENS}-token probe, over the {allowed:.2g} allowed in {str(dtype)[6:]}. Its "
            "attention has a feature kvcompare does not model, so it is refused rather than measured wrongly"
        )
    rotaries, errors = [], []
    others: dict[int, Rotary] = {}  # each rotary's other layout, made once: layers that share one keep sharing
    for layer, rotary in enumerate(executor.rotary):
        error, chosen = min(
            ((_moved_error(at_zero[layer], shifted[layer], option), option) for option in _layouts(rotary, others)),
            key=lambda found: found[0],
        )
        if error > limit:  # none reproduces the model: keep what was read, and say so below if it matters
            error, chosen = _moved_error(at_zero[layer], shifted[layer], rotary), rotary
        rotaries.append(chosen)
        errors.append(error)
    executor.rotary = tuple(rotaries)
    key_error = max(errors, default=0.0)
    if shift and not key_error <= limit:
        worst = errors.index(key_error)
        raise UnsupportedModelError(
            f"kvcompare cannot move {name}'s cached keys as shift mode needs: re-rotating layer {worst}'s keys "
            f"by {SHIFT} positions differs by {key_error:.2e} (relative) from the keys the model writes there in "
            f"every layout kvcompare knows (halves, adjacent pairs, no RoPE), over the {limit:g} allowed; use "
            "--positions true, which never moves a key"
        )
    kinds = [layer_kind(features.get(n), r) for n, r in enumerate(rotaries)]
    return Fidelity(logit_error, key_error, kinds, own_error)


def kv_shared_layers(config: Any, model: torch.nn.Module | None = None) -> list[int]:
    """The layers that attend to an earlier layer's keys and values instead of caching their own (KV sharing:
    Gemma-3n's last ``num_kv_shared_layers``), from the configuration's ``kv_sharing_modes`` (or that count), and
    from ``model``'s attention modules (``is_kv_shared_layer``) where given; sorted layer indices."""
    config = getattr(config, "text_config", None) or config
    try:
        modes = list(getattr(config, "kv_sharing_modes", None) or [])
    except Exception:  # noqa: BLE001 - a configuration whose own consistency check fails: the count decides
        modes = []
    shared = {n for n, mode in enumerate(modes) if isinstance(mode, str) and mode.startswith("reuse")}
    count, layers = getattr(config, "num_kv_shared_layers", 0), getattr(config, "num_hidden_layers", None)
    if not shared and isinstance(count, int) and count > 0 and isinstance(layers, int):
        shared = set(range(max(layers - count, 0), layers))
    for module in model.modules() if model is not None else ():
        index = getattr(module, "layer_idx", None)
        if getattr(module, "is_kv_shared_layer", False) and isinstance(index, int):
            shared.add(index)
    return sorted(shared)


def refuse_shared_kv(config: Any, name: str, model: torch.nn.Module | None = None) -> None:
    """Raise UnsupportedModelError for a model with KV-shared layers (:func:`kv_shared_layers`): such a layer
    reads another layer's cache, so the caches cannot be compressed layer by layer as kvcompare does."""
    shared = kv_shared_layers(config, model)
    if shared:
        span = f"{shared[0]}-{shared[-1]}" if shared == list(range(shared[0], shared[-1] + 1)) else str(shared)[1:-1]
        raise UnsupportedModelError(
            f"{name}'s layers {span} reuse the keys and values of an earlier layer instead of caching their own "
            "(KV sharing, as in Gemma-3n): layers that reuse another layer's cache cannot be compressed "
            "independently, as kvcompare compresses each layer's own cache, so it is refused rather than measured "
            "wrongly; use a model without KV-shared layers"
        )


def _own_chunked_error(executor: Executor, ids: torch.Tensor, own: torch.Tensor) -> float:
    """How far the model's own forward pass, fed in PROBE_CHUNK chunks through transformers' own cache, is from
    its one pass: the rounding the model itself shows, which kvcompare (also chunked) may not be held below.
    0 where the model cannot be run so (then only TOLERANCE applies)."""
    from transformers import DynamicCache

    try:
        config: Any = executor.model.config
        cache = DynamicCache(config=config)
        chunks = []
        for start in range(0, ids.shape[1], PROBE_CHUNK):
            positions = torch.arange(start, start + PROBE_CHUNK, device=ids.device).view(1, -1)
            chunk = ids[:, start : start + PROBE_CHUNK]
            chunks.append(executor.model(input_ids=chunk, position_ids=positions, cache=cache, use_cache=True).logits)
        return _relative(torch.cat(chunks, dim=1), own)
    except Exception:  # noqa: BLE001 - a model whose own cache does not run chunked: the fixed tolerance decides
        return 0.0


def layer_kind(features: tuple[float | None, float | None, bool] | None, rotary: Rotary | None) -> str:
    """One layer in words, e.g. 'sliding window 4096, soft-cap 50, RoPE (base 10000, halves)'."""
    window, softcap, sinks = features or (None, None, False)
    parts = [f"sliding window {window:g}" if window else "full attention"]
    parts += [f"soft-cap {softcap:g}"] if softcap else []
    parts += ["learned sinks"] if sinks else []
    if rotary is None:
        parts.append("no RoPE")
    else:
        layout = "adjacent pairs" if rotary.interleaved else "halves"
        parts.append(f"RoPE ({rotary.rotary_dim} channels, {layout}, slowest period {_period(rotary):.3g})")
    return ", ".join(parts)


def _period(rotary: Rotary) -> float:
    return float(2 * torch.pi / rotary.inv_freq.min())


def _layouts(rotary: Rotary | None, others: dict[int, Rotary]) -> list[Rotary | None]:
    """The rotary as read first, then the other layout of the same frequencies (kept in ``others``), then no
    RoPE."""
    if rotary is None:
        return [None]
    if id(rotary) not in others:
        others[id(rotary)] = dataclasses.replace(rotary, interleaved=not rotary.interleaved, _tables={})
    return [rotary, others[id(rotary)], None]


def _moved_error(at_zero: torch.Tensor, shifted: torch.Tensor, rotary: Rotary | None) -> float:
    """How far ``at_zero`` keys re-rotated by SHIFT with ``rotary`` are from the keys written at SHIFT (rotated
    in float32, as shift mode rebuilds low-precision keys)."""
    moved = at_zero.to(torch.float32, copy=True)  # rotated in place: never the probe's own keys
    if rotary is not None:
        rows = moved.view(-1, moved.shape[-1])
        rotary.rotate_rows_(rows, torch.arange(rows.shape[0], device=rows.device), SHIFT)
    return _relative(moved, shifted)


def _failed_to_run(name: str, err: Exception | None, never_called: bool) -> str:
    if never_called:
        return (
            f"{name} computes attention in its own code instead of through transformers' attention interface, "
            "so kvcompare cannot give its layers their masks over an evicted cache; it is refused before any cell"
        )
    assert err is not None
    return f"{name} does not run under kvcompare's cache and attention ({type(err).__name__}: {err}); it is refused"
