"""Column layout of the Parquet results: one place that the runner, the writer and the report agree on."""

from __future__ import annotations

import pyarrow as pa

#: One row per cell: (policy with its parameters, cache limit, length, sample, position mode).
RESULT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("cell_id", pa.string()),  # stable hash of the cell's configuration; --resume keys on it
        ("status", pa.string()),  # "ok" or "failed"
        ("error", pa.string()),  # the failure, for status == "failed"
        ("traceback", pa.string()),  # its whole traceback (a policy's bug: file and line of the plugin's code)
        ("task", pa.string()),  # "ppl" (quality and speed on a passage), or a probe task: "passkey", "niah_single"...
        ("task_params", pa.string()),  # JSON: the task's parameters (its spec); "{}" for ppl
        ("probe_params", pa.string()),  # JSON: the probe's own values (e.g. depth, needle_start); null for ppl
        ("model", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),  # book or file the passage came from
        ("token_offset", pa.int64()),  # first token of the passage inside `source`
        ("sample_id", pa.int64()),
        ("policy", pa.string()),  # registered name, e.g. "l2"
        ("policy_label", pa.string()),  # name with non-default parameters, e.g. "l2:mode=random"
        ("policy_params", pa.string()),  # JSON of every parameter, defaults included
        ("plugin", pa.string()),  # plugin that provides the policy
        ("cache_size", pa.int64()),  # limit enforced on compressed layers; null for `full` (no limit)
        ("seq_len", pa.int64()),
        ("bos", pa.bool_()),  # the passage (or prompt) starts with the tokenizer's BOS token (never scored)
        ("stride", pa.int64()),
        ("evict_block", pa.int64()),
        ("positions", pa.string()),  # "true" or "shift"
        ("compression", pa.string()),  # "continuous" (evict before every chunk and step) or "prefill" (once)
        ("ratio", pa.float64()),  # --ratio: the share of the context removed, from which cache_size was derived
        ("query_aware", pa.bool_()),  # prefill: the question was compressed with the context; null: continuous
        ("context_tokens", pa.int64()),  # prefill: the tokens prefilled, then compressed once; null: continuous
        ("skip_layers", pa.string()),  # JSON list of layer indices that keep the full cache
        ("layer_budget", pa.string()),  # how the limit is shared among compressed layers: uniform or pyramid:beta=B
        ("layer_budgets", pa.string()),  # JSON list: the slots each compressed layer may hold (null for `full`)
        ("layer_kinds", pa.string()),  # JSON list: each layer's attention (full, sliding window...) and RoPE
        ("device", pa.string()),
        ("device_name", pa.string()),  # the device that measured the cell, e.g. the GPU's or the CPU's name
        ("host", pa.string()),  # the machine that measured it (a Ray worker's, in a run with --ray)
        ("dtype", pa.string()),
        ("gen_tokens", pa.int64()),
        ("warmup", pa.int64()),
        ("repeats", pa.int64()),  # latency trials of this cell, interleaved with the other cells of its passage
        ("prefill_chunk", pa.int64()),  # tokens per prefill forward in the latency pass
        ("compile", pa.bool_()),  # --compile: decode steps were asked to run as one compiled step
        ("compiled", pa.bool_()),  # every counted decode step of every trial ran compiled (null: no trial)
        ("compile_s", pa.float64()),  # seconds its trials spent compiling (after the TTFT, before the steps), summed
        ("compile_fallback", pa.string()),  # --compile, yet eager: why compiled steps were turned off
        ("threads", pa.int64()),  # torch intra-op threads
        ("max_positions", pa.int64()),  # the model's trained positions (max_position_embeddings), null if unknown
        ("beyond_context", pa.bool_()),  # the latency pass (prompt + warm-up + generated) goes past max_positions
        # Speed: the median over trials of each trial's figure, with a seeded bootstrap 95% interval over trials.
        ("ttft_s", pa.float64()),  # prefill in chunks of prefill_chunk, to the first generated token
        ("ttft_ci_low", pa.float64()),
        ("ttft_ci_high", pa.float64()),
        ("tpot_s", pa.float64()),  # a trial's TPOT is the median of its counted decode steps
        ("tpot_ci_low", pa.float64()),
        ("tpot_ci_high", pa.float64()),
        ("throughput_tok_s", pa.float64()),  # a trial's throughput is gen / its counted decode time
        ("throughput_ci_low", pa.float64()),
        ("throughput_ci_high", pa.float64()),
        ("ttft_oneshot_s", pa.float64()),  # `full` only: the prompt prefilled in one pass (or a few large chunks)
        ("ttft_oneshot_ci_low", pa.float64()),
        ("ttft_oneshot_ci_high", pa.float64()),
        ("ppl", pa.float64()),
        ("accuracy", pa.float64()),
        ("nll_sum", pa.float64()),
        ("tokens_scored", pa.int64()),
        ("peak_kv_bytes", pa.int64()),  # the most held after any chunk or step; prefill: the quality pass's end
        ("kv_bytes_compressed", pa.int64()),  # prefill: key and value bytes held right after the one compression
        # the most memory a single-sequence pass of the cell added above what was in use when it began: allocator
        # bytes (cuda, mps) or resident bytes (cpu); the weights and what earlier cells left are not counted
        ("peak_mem_bytes", pa.int64()),
        ("evict_s", pa.float64()),  # eviction time inside the counted decode steps, summed over trials
        ("evict_share", pa.float64()),  # evict_s / decode_s
        ("compress_s", pa.float64()),  # prefill: the one compression's time inside the TTFT, summed over trials
        ("compress_share", pa.float64()),  # compress_s / the trials' TTFT summed
        # a probe task (kvcompare.task): the prompt prefilled under the policy, then its answer fed (request
        # "answer") or generated greedily (request "generate"), scored by the task
        ("correct", pa.bool_()),  # the task's pass/fail (passkey: greedy decoding gives the key exactly)
        ("score", pa.float64()),  # the task's metric in [0, 1] (RULER: share of expected values in the output)
        ("answer_matched", pa.int64()),  # answer: leading answer tokens that were the arg-max
        ("answer_tokens", pa.int64()),  # answer: tokens of the expected answer
        ("answer_logprob", pa.float64()),  # answer: its teacher-forced log-probability, summed (nats)
        ("generated", pa.string()),  # generate: the decoded output
        ("signal_s", pa.float64()),  # collecting the attention/queries a policy reads, inside counted decode steps
        ("signal_share", pa.float64()),  # signal_s / decode_s
        ("decode_s", pa.float64()),  # counted decode time, summed over trials
        # What the physics predicts for one decode step at the end of the prompt.
        ("kv_read_bytes", pa.int64()),  # keys and values attended, summed over layers
        ("weight_bytes", pa.int64()),  # the model's parameters
        ("tpot_floor_s", pa.float64()),  # (weight_bytes + kv_read_bytes) / the run's measured memory bandwidth
        ("quality_s", pa.float64()),  # wall time of the quality pass; batched: the batch's divided by its cells
        ("quality_batch", pa.int64()),  # cells whose quality passes ran as rows of one batch (1: on its own)
        ("wall_s", pa.float64()),  # wall time of the whole cell
        ("finished_at", pa.string()),
    ]
)

#: Perplexity against position: NLL summed over buckets of positions in the passage, one row per bucket.
CURVE_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("cell_id", pa.string()),
        ("policy", pa.string()),
        ("policy_label", pa.string()),
        ("cache_size", pa.int64()),
        ("seq_len", pa.int64()),
        ("positions", pa.string()),
        ("compression", pa.string()),
        ("sample_id", pa.int64()),
        ("bucket_start", pa.int64()),  # first predicted position in the bucket (token index in the passage)
        ("bucket_end", pa.int64()),  # one past the last
        ("nll_sum", pa.float64()),
        ("tokens", pa.int64()),
    ]
)

#: Curve columns copied from the cell's row: the rest (bucket_*, nll_sum, tokens) are the curve's own.
CURVE_CELL_COLUMNS: tuple[str, ...] = (
    "run_id",
    "cell_id",
    "policy",
    "policy_label",
    "cache_size",
    "seq_len",
    "positions",
    "compression",
    "sample_id",
)

#: Every latency trial's raw timings, one row per TTFT or counted decode step, so that a report can always be
#: recomputed from them. One file per passage and session: timings/<group>.parquet.
TIMINGS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("cell_id", pa.string()),  # the cell whose configuration was timed (the `full` cell for the A/A control)
        ("role", pa.string()),  # "cell"; "aa_control": a second `full` trial; "baseline": `full` re-timed on resume
        ("session", pa.int64()),  # 0 for the first run, k for the k-th --resume: pairs never cross sessions
        ("round", pa.int64()),  # trial r of every cell of a passage runs in round r
        ("order", pa.int64()),  # position of this trial within its round (the order rotates between rounds)
        ("kind", pa.string()),  # "ttft", "ttft_oneshot" or "step"
        ("step", pa.int64()),  # counted decode step index; null for TTFT
        ("seconds", pa.float64()),
        ("evict_seconds", pa.float64()),  # eviction inside this step; null for TTFT
        ("signal_seconds", pa.float64()),  # signal collection inside this step; null for TTFT
        ("compress_seconds", pa.float64()),  # TTFT in the prefill setting: the compression inside it
        # the keys a trial is paired on with its baseline: same passage, position mode, setting, session and round
        ("seq_len", pa.int64()),
        ("sample_id", pa.int64()),
        ("positions", pa.string()),
        ("compression", pa.string()),
    ]
)
TRIAL_ROLES = ("cell", "aa_control", "baseline")

RESULTS_GLOB = "cells/*.parquet"
TIMINGS_GLOB = "timings/*.parquet"
CURVES_GLOB = "curves/*.parquet"
RUN_JSON = "run.json"
