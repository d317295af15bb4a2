"""Compiled decode steps (``--compile``): the model's forward for one token as one fixed-shape compiled step, the same
for every policy and for `full`.

An eager decode step of a small model spends most of its time on per-operation overhead that no cache policy
touches (Python, dispatch, kernel launches), which compresses every policy's measured difference toward zero.
:class:`CompiledDecode` runs the model's forward for a decode step through ``torch.compile`` (inductor; on cuda
with CUDA graphs, ``mode="reduce-overhead"``), as production engines do with static caches.

The step is pure: it reads the cache's buffers and writes nothing. Every layer attends its whole fixed-shape
buffer (a compressed layer's slots, a full layer's capacity) under a mask made from the slots' token indices, and
the new token's key and value are attended beside it (:func:`attend_with_new`), then returned; the executor writes
them into the cache after the step (:meth:`~kvcompare.engine.cache.BoundedKVCache.write_step`). Writing inside the
compiled graph would make inductor copy a whole buffer per written layer (functionalised mutation of a view).
Eviction, scoring and signal collection stay outside the compiled region and run as in an eager step; a policy
that reads attention gets it from the queries the step returns. Buffer shapes change only between cells, so a cell
compiles (or, after the first, recompiles with dynamic shapes) in its first decode step, a warm-up step.

Deviations from an eager step, all inside float rounding: the softmax is written out instead of SDPA's fused kernel,
and masked slots are attended with weight zero instead of not at all (their buffers are zero-filled, so a never
written slot cannot carry NaN into the sum).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AttentionInterface

from kvcompare.engine.attention import CACHE_KEYWORD, Extras, positive_feature
from kvcompare.engine.cache_protocol import LayerGroup, LayerSlot
from kvcompare.engine.rope import UnsupportedModelError
from kvcompare.engine.timing import synchronize

if TYPE_CHECKING:
    from kvcompare.engine.cache import BoundedKVCache

log = logging.getLogger(__name__)

#: The attention implementation installed while a compiled step runs (see :func:`step_attention`).
STEP_ATTN_IMPLEMENTATION = "kvcompare_step"
#: Recompiles torch allows one compiled step before it fails (each new model, layer grouping or signal need is
#: one; a second buffer shape is one more, after which shapes are dynamic).
RECOMPILE_LIMIT = 64
#: torch.compile's backend for a run's compiled steps. Tests set "eager" (traces the step, generates no code: the
#: same graph, the same fallbacks, in a second instead of a minute).
DEFAULT_BACKEND = "inductor"


class StepCache:
    """What the model sees as its cache inside a compiled step: every layer's whole buffer, read only.

    ``update`` keeps the chunk's new keys and values (``[batch, kv_heads, 1, head_dim]``) aside and returns the
    layer's buffer (``[batch, kv_heads, slots or capacity, head_dim]``); :func:`step_attention` attends the buffer
    under :meth:`visible` and the new token beside it. ``position`` is the new token's index (a 0-d int64 tensor,
    so that a new position is not a new graph); ``layers`` maps model layers to buffers as the cell's cache does;
    ``budgets``, where given, bounds each compressed layer to its first ``budgets[n]`` slots.
    """

    def __init__(
        self,
        compressed_kv: torch.Tensor,
        slot_tokens: torch.Tensor,
        full_kv: torch.Tensor,
        position: torch.Tensor,
        layers: dict[int, LayerSlot],
        budgets: tuple[int, ...] | None,
        keep_queries: bool,
    ) -> None:
        self.compressed_kv, self.slot_tokens, self.full_kv = compressed_kv, slot_tokens, full_kv
        self.position = position
        self.layers = layers
        self.budgets = budgets
        self.keep_queries = keep_queries
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.queries: dict[int, torch.Tensor] = {}
        self.windows: dict[int, float | None] = {}
        self.scaling: float | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the new token's key and value aside; return the layer's whole buffer (the Hugging Face protocol)."""
        self.new[layer_idx] = (key_states, value_states)
        group, n = self.layers[layer_idx]
        if group is LayerGroup.FULL:
            return self.full_kv[0, n], self.full_kv[1, n]
        end = self.compressed_kv.shape[4] if self.budgets is None else self.budgets[n]
        return self.compressed_kv[0, n, :, :, :end], self.compressed_kv[1, n, :, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        """The new token's position (the protocol's tokens seen so far)."""
        return self.position

    def visible(self, layer_idx: int, window: float | None) -> torch.Tensor:
        """Which buffer slots the new token's query attends besides itself, ``[batch, kv_heads or 1, 1, slots]``:
        a held token older than it (on a layer with a sliding ``window``, one of its last ``window`` tokens)."""
        group, n = self.layers[layer_idx]
        if group is LayerGroup.FULL:  # in time order: slot i holds token i
            tokens = torch.arange(self.full_kv.shape[4], device=self.position.device).view(1, 1, -1)
        else:
            end = self.compressed_kv.shape[4] if self.budgets is None else self.budgets[n]
            tokens = self.slot_tokens[n, :, :, :end]
        visible = (tokens >= 0) & (tokens < self.position)
        if window is not None:
            visible = visible & (tokens > self.position - window)
        return visible.unsqueeze(-2)

    def saw(self, layer_idx: int, query: torch.Tensor, window: float | None, scaling: float | None) -> None:
        """Keep a compressed layer's query (``[batch, heads, 1, head_dim]``), window and scaling for the signals a
        policy reads, collected after the step."""
        if self.keep_queries and self.layers[layer_idx].group is LayerGroup.COMPRESSED:
            self.queries[layer_idx] = query
            self.windows[layer_idx] = window
            self.scaling = scaling

    def outputs(self, group: LayerGroup) -> torch.Tensor | None:
        """The new keys and values of a group's layers, ``[2, layers, batch, kv_heads, 1, head_dim]`` (None: the cell
        has no such layer)."""
        by_index = {slot.in_group: layer for layer, slot in self.layers.items() if slot.group is group}
        if not by_index:
            return None
        return torch.stack([torch.stack(self.new[by_index[n]]) for n in range(len(by_index))], dim=1)


def attend_with_new(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    scaling: float | None,
    extra: Extras,
) -> torch.Tensor:
    """One query per row over a buffer and the new token: softmax over ``[buffer slots under visible, new token]``.

    ``query`` ``[batch, heads, 1, head_dim]``; ``key``/``value`` ``[batch, kv_heads, slots, head_dim]`` (query heads
    grouped over KV heads, as Hugging Face's ``repeat_kv``); ``visible`` boolean ``[batch, kv_heads or 1, 1, slots]``;
    ``new_key``/``new_value`` ``[batch, kv_heads, 1, head_dim]``. Soft-capping and learned sinks (``extra``) as
    :func:`~kvcompare.engine.attention._attend_eager`. Logits and softmax in float32 at least; the weighted sum of
    the buffer in the values' dtype, as the eager path. Returns ``[batch, heads, 1, head_dim]``.
    """
    b, heads, _, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    compute = torch.promote_types(query.dtype, torch.float32)
    scale = scaling if scaling is not None else d**-0.5
    grouped = query.reshape(b, kv_heads, groups, d)
    logits = (grouped @ key.transpose(-1, -2)).to(compute) * scale  # [b, kv_heads, groups, slots]
    own = (grouped.to(compute) * new_key.to(compute)).sum(-1, keepdim=True) * scale  # [b, kv_heads, groups, 1]
    if extra.softcap is not None:
        logits = torch.tanh(logits / extra.softcap) * extra.softcap
        own = torch.tanh(own / extra.softcap) * extra.softcap
    logits = logits.masked_fill(~visible, float("-inf"))
    top = torch.maximum(logits.amax(dim=-1, keepdim=True), own)
    sinks = None
    if extra.sinks is not None:
        sinks = extra.sinks.to(compute).reshape(1, kv_heads, groups, 1)
        top = torch.maximum(top, sinks)
    weights, own_weight = torch.exp(logits - top), torch.exp(own - top)
    total = weights.sum(dim=-1, keepdim=True) + own_weight
    if sinks is not None:
        total = total + torch.exp(sinks - top)
    mixed = (weights.to(value.dtype) @ value).to(compute) + own_weight * new_value.to(compute)
    return (mixed / total).to(query.dtype).reshape(b, heads, 1, d)


def step_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The attention function of a compiled step, as Hugging Face calls one: the new token's ``query``
    ``[batch, heads, 1, head_dim]`` over the layer's buffer (what :meth:`StepCache.update` returned) and itself.
    Returns ``([batch, 1, heads, head_dim], None)``. Raises UnsupportedModelError for a model whose layers do not
    pass keyword arguments down to their attention (the step cannot reach its cache)."""
    step = kwargs.get(CACHE_KEYWORD)
    if not isinstance(step, StepCache):
        raise UnsupportedModelError(
            f"{type(module).__name__} does not pass keyword arguments down to its attention, which a compiled step "
            "needs: run without --compile"
        )
    layer: int = module.layer_idx  # type: ignore[assignment]
    window = positive_feature(kwargs.get("sliding_window"))
    extra = Extras(positive_feature(kwargs.get("softcap")), kwargs.get("s_aux"))  # type: ignore[arg-type]
    step.saw(layer, query, window, scaling)
    new_key, new_value = step.new[layer]
    out = attend_with_new(query, key, value, step.visible(layer, window), new_key, new_value, scaling, extra)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(STEP_ATTN_IMPLEMENTATION, step_attention)


def decode_step(
    model: nn.Module,
    ids: torch.Tensor,
    position: torch.Tensor,
    compressed_kv: torch.Tensor,
    slot_tokens: torch.Tensor,
    full_kv: torch.Tensor,
    layers: dict[int, LayerSlot],
    budgets: tuple[int, ...] | None,
    keep_queries: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, dict[int, torch.Tensor], dict[int, Any], Any]:
    """The function compiled: the model's forward for one token ``ids`` (``[1, 1]``) at ``position`` over the
    cache's buffers. Returns the last logits ``[1, 1, vocab]``, the new keys and values of the compressed and of the
    full layers (``[2, layers, 1, kv_heads, 1, head_dim]`` or None), and, with ``keep_queries``, each compressed
    layer's query, window and the attention's scaling."""
    step = StepCache(compressed_kv, slot_tokens, full_kv, position, layers, budgets, keep_queries)
    out = model(
        input_ids=ids,
        position_ids=position.view(1, 1),
        cache=step,
        use_cache=True,
        logits_to_keep=1,
        **{CACHE_KEYWORD: step},
    )
    return (
        out.logits,
        step.outputs(LayerGroup.COMPRESSED),
        step.outputs(LayerGroup.FULL),
        step.queries,
        step.windows,
        step.scaling,
    )


@dataclasses.dataclass
class CompileStatus:
    """Whether decode steps run compiled: asked for (``requested``), still on (``active``; off after a failure),
    why they fell back to eager (``reason``), how many steps ran compiled and the seconds spent in steps that
    compiled (``compile_s``: tracing and code generation, with the one step they ran)."""

    requested: bool
    active: bool
    reason: str | None = None
    steps: int = 0
    compile_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The status as run.json records it."""
        return dataclasses.asdict(self)


class CompiledDecode:
    """The model's decode step compiled once, shared by every cell the executor runs (see the module's docstring).

    ``backend`` is torch.compile's (default :data:`DEFAULT_BACKEND`).
    Construction compiles nothing; the first :meth:`step` of each new cache shape does. Any failure to compile or
    run turns compiled steps off for the executor with the reason in :attr:`status` (the step is then run eagerly
    by the caller), never an error.
    """

    def __init__(self, model: nn.Module, device: torch.device, backend: str | Callable[..., Any] | None = None) -> None:
        backend = backend or DEFAULT_BACKEND
        self._model = model
        self._device = device
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # never a silent eager step
        options: dict[str, Any] = {"fullgraph": True, "backend": backend}
        if backend == "inductor" and device.type == "cuda":
            options["mode"] = "reduce-overhead"  # CUDA graphs: one launch per step
        elif backend == "inductor" and device.type == "cpu":
            options["backend"] = inductor_matrix_vector  # the weights read at the memory's pace, not BLAS's
        self._cuda_graphs = options.get("mode") == "reduce-overhead"
        self._compiled = torch.compile(decode_step, **options)
        self.status = CompileStatus(requested=True, active=True)
        self._marked: set[int] = set()

    def step(self, cache: BoundedKVCache, ids: torch.Tensor) -> torch.Tensor | None:
        """Run one decode step of ``ids`` (``[1, 1]``) over ``cache`` (room already made), write its key and value
        into the cache and collect the signals its policy reads; return the logits ``[1, 1, vocab]``, or None when
        compiled steps are (now) off, the cache untouched, for the caller to run the step eagerly."""
        if not self.status.active:
            return None
        storage = cache.storage
        if self._cuda_graphs:  # the buffers stay where they are: CUDA graphs read them in place, never a copy
            for buffer in (storage.compressed_kv, storage.slot_tokens, storage.full_kv):
                if id(buffer) not in self._marked:
                    torch._dynamo.mark_static_address(buffer)
                    self._marked.add(id(buffer))
            torch.compiler.cudagraph_mark_step_begin()
        graphs = _compiled_graphs()
        config: Any = self._model.config
        attention, config._attn_implementation = config._attn_implementation, STEP_ATTN_IMPLEMENTATION
        started = time.perf_counter()
        try:
            logits, compressed, full, queries, windows, scaling = self._compiled(
                self._model,
                ids,
                torch.tensor(cache.seen, device=self._device),
                storage.compressed_kv,
                storage.slot_tokens,
                storage.full_kv,
                cache.layer_slots,
                cache.attended_budgets,
                cache.recorder is not None,
            )
        except Exception as err:  # compiling (or running compiled) failed: eager from now on, with the reason
            self.status.active = False
            self.status.reason = failure_reason(err)
            log.warning(f"--compile: decode steps run eagerly from now on ({self.status.reason})")
            return None
        finally:
            config._attn_implementation = attention
        if _compiled_graphs() != graphs:  # this step compiled: its time is the compilation's
            synchronize(self._device)
            self.status.compile_s += time.perf_counter() - started
        self.status.steps += 1
        cache.write_step(compressed, full)
        for layer, query in queries.items():
            cache.observe_step(layer, query, windows[layer], scaling)
        return logits


def _matrix_vector(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` for one row ``a`` (``[1, k]``, ``b`` ``[k, n]``) as a product and a sum over ``k`` (``[1, n]``), for
    inductor to generate; None for anything else."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != 1 or not a.dtype.is_floating_point:
        return None
    return (a.t() * b).sum(0, keepdim=True)


def _mm(a: torch.Tensor, b: torch.Tensor) -> Any:
    product = _matrix_vector(a, b)
    return NotImplemented if product is None else product


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> Any:
    product = _matrix_vector(a, b) if beta == 1 and alpha == 1 else None
    return NotImplemented if product is None else bias + product


def inductor_matrix_vector(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """torch.compile's backend for CPU steps: inductor, with every one-row matrix product (a one-token step's linear
    layers and LM head) decomposed into a product and a sum that inductor generates as a vectorised reduction along
    the weight's rows.

    A one-token step is a chain of matrix-vector products over weights far larger than the caches, so it is bound
    by how fast they are read. BLAS serves one row against a row-major ``[out, in]`` weight slowly: on the 2-core
    development CPU MKL's sgemm reads it at about 11 GB/s where the generated reduction reads about 25-30 GB/s
    (``python benchmarks/matrix_vector.py``). Only the order of the float additions differs from BLAS's.
    """
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    table: dict[Any, Callable[..., Any]] = {**select_decomp_table(), aten.mm.default: _mm, aten.addmm.default: _addmm}
    return compile_fx(graph, example_inputs, decompositions=table)


def failure_reason(err: BaseException) -> str:
    """One line on why compiling failed: the error's type and first line, and its root cause's (torch wraps a
    backend's error in BackendCompilerFailed, whose first line names only the backend, the error kept as its
    ``inner_exception``)."""

    def line(error: BaseException) -> str:
        text = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
        return f"{type(error).__name__}: {text}" if text else type(error).__name__

    root = err
    while (cause := getattr(root, "inner_exception", None) or root.__cause__) is not None and cause is not root:
        root = cause
    return line(err) if root is err else f"{line(err)} ({line(root)})"


def _compiled_graphs() -> int:
    """How many graphs torch.compile has produced in this process (a step that raised it compiled)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
