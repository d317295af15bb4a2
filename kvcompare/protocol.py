"""The measurement protocol as readers see it: written once here, shown verbatim in every report and in the
README (a test keeps the README in step). The code that carries it out is ``kvcompare.run.figures``."""

#: Raised whenever a change to the executor can change a cell's numbers; ``--resume`` never mixes versions.
#: 2: slot reuse, ties in score evicted oldest first (issue 10).
#: 3: per-layer budgets; with uneven budgets every layer frees the same number of slots, empty ones first (issue 11).
#: 4: a task in every cell's identity (ppl, passkey) (issue 12).
#: 5: shift mode in bfloat16/float16 re-rotates moved keys from the written key, rounding once (issue 14).
#: 6: the document start (BOS) in every cell's identity; model families (issue 21).
#: 7: tasks as plugins: task_params and probe_params in every cell's identity, generic probe columns (issue 23).
#: 8: the compression setting (continuous or prefill), ratio and context in every cell's identity (issue 24).
#: 9: --compile (compiled decode steps) in every cell's identity; rows record compiled and compile_s (issue 25).
PROTOCOL_VERSION = 9

#: How the numbers are measured; shown verbatim in every report and in the README.
PROTOCOL_MD = """\
- **Cells.** One measurement per (policy with its parameters, cache limit, passage length, sample, position
  mode, compression setting). The `full` baseline keeps every token and has no limit; every other policy runs
  under the same limit, through the same executor, with the same timers.
- **Cache limit.** Before a chunk of `c` tokens is attended, each compressed layer holding more than
  `limit - c` tokens is reduced by the policy to `limit - c` (or to `evict_block` fewer tokens than it
  holds, whichever is smaller), so no attention call sees more than `limit` keys. Skip layers (default 0
  and 1) keep their full cache. An eviction only frees slots: the next chunk's keys and values are written
  into them, and nothing that stays is moved. Among equally scored tokens the older goes first.
- **Compression setting.** `continuous` (default, StreamingLLM's setting): the limit holds before every chunk
  and decode step, as above. `prefill` (SnapKV's, PyramidKV's, kvpress's): the context is prefilled with
  nothing evicted, then each compressed layer is cut once to its budget by the same policy code, its scores
  made from the whole context (its keys, the attention it drew, the last queries); the kept tokens move in time
  order to buffers sized for them and the tokens still to come, and the rest of the prompt and the answer run
  on a cache that only grows. A probe's context is compressed without its question (query-agnostic, kvpress's
  default) unless `--query-aware`, which compresses the question with it. `ppl` in this setting: the first half
  of each passage is the context; only the tokens after it, each predicted on the compressed cache, are scored,
  and the latency trials prefill the context alone. `--ratio r` gives each layer `int(context × (1 − r))`
  tokens of its cell's context (the whole prompt in the continuous setting); rows record `ratio`,
  `cache_size` and `context_tokens`.
- **Layer budgets.** `--layer-budget uniform` (default) gives every compressed layer the limit. `pyramid`
  (PyramidKV) gives lower layers more and higher layers less, falling linearly, with the same total, so the
  same KV bytes; every layer keeps room for a chunk. Each row records the rule and the budgets. An eviction
  frees the same number of slots in every layer, empty slots first, so a layer with room evicts less. In the
  prefill setting a pyramid keeps its observation window (`pyramid:window=W`, default 32) in every layer
  instead of room for a chunk, as PyramidKV does.
- **Signals.** A policy that reads attention (`h2o`, `tova`) or recent queries (`snapkv`) gets them from
  kvcompare's attention function, for compressed layers only and only when it asks: the weights are
  recomputed there from the post-RoPE queries and the attended keys (softmax of q·k·scale under the same
  mask), so the model's own attention output is the same for every policy. An eviction sees only what
  earlier chunks produced. The time spent collecting inside the counted decode steps is `signal_s`
  (`signal_share = signal_s / decode time`); scoring at eviction is part of `evict_s`.
- **Positions.** `true`: every token keeps its original position. `shift` (StreamingLLM): positions are
  ranks in the cache; after an eviction each kept key is re-rotated in place by the number of evicted
  tokens newer than it, so the held keys sit at consecutive positions ending just before the next token,
  which gives exactly the relative distances of StreamingLLM's cache slots. In bfloat16 and float16 a moved
  key is rebuilt from the key the model wrote, rotated once in float32 by its total move (a copy of the
  compressed keys is kept for it): rotating a rotated key at every eviction would add a rounding each time,
  and a bfloat16 sink key is off by more than 100% after a thousand moves.
- **Passages.** A passage of `L` tokens is a window of a document's tokens, drawn by the seed; it starts as
  the tokenizer starts a document (`--bos auto`: with its BOS token when it adds one, then `L - 1` document
  tokens), or `--bos always` / `never`. The BOS is never scored (the first token is not predicted); `bos`
  says in every row whether it is there. Passkey prompts start the same way.
- **Models.** Before any cell, a probe checks that kvcompare computes what the model computes: `full`'s
  logits through kvcompare's cache and attention against the model's own forward pass, and the keys shift
  mode moves against the keys the model writes at the new positions, layer by layer; a model that fails is
  refused. Each layer gets what the model's own attention gives it: its sliding window (in the mask, on
  true token indices), soft-cap and learned sinks, and its own rotary (frequencies, channel layout) or none.
  A layer with a sliding window is compressed like any other (the policy keeps at most the limit) and, as
  in the model, attends only the held tokens inside its window. `layer_kinds` in every row lists each
  layer's attention and RoPE.
- **Quality pass.** The passage is fed teacher-forced in chunks of `stride` tokens under the policy and the
  limit; every token after the first is scored. `ppl = exp(mean NLL)`; `accuracy` is the share of tokens
  whose arg-max prediction is the next token. NLL is also kept per bucket of positions for the
  perplexity-against-position curve. The quality passes of a passage's cells run as the rows of one batch
  (`--quality-batch`, default as many as fit in half the free memory; `full` cells batch only with
  `full`): each row keeps its own cache, policy and limit and attends only its own slots, so its scores
  equal a pass of its own up to float summation order; a row that has not evicted yet holds what every
  such row holds, so they share one row's computation until then. `quality_s` is the batch's wall time
  divided by its cells, `quality_batch` their number. Latency trials are never batched.
- **Latency trials.** The passage is the prompt, prefilled in chunks of `prefill_chunk` tokens (default
  the stride) under the policy and limit. `ttft_s` runs from the start of the prefill to the first generated
  token (greedy). Then `warmup + gen` tokens are decoded one at a time; the first `warmup` steps are not
  counted. A trial's TPOT is its median counted step (eviction included) and its throughput is `gen` divided
  by its counted steps' total time. Each cell runs `repeats` trials. Eviction time (choosing victims and
  slots, re-rotation) inside the counted steps is `evict_s`, and `evict_share = evict_s / decode time`. In the
  prefill setting `ttft_s` includes the one compression after the prompt, also given alone as `compress_s`
  (`compress_share = compress_s / TTFT`), and every counted step runs on the compressed cache.
- **Compiled steps** (`--compile`). Every decode step, of every policy and of `full`, runs the model's forward
  as one compiled step (torch.compile; on cuda with CUDA graphs) over fixed-shape, zero-filled buffers: each
  layer attends all its slots under a mask of the tokens they hold, and the new key and value beside them;
  they are written into the cache after the step. Eviction, scoring and signal collection run outside the
  compiled step, timed as in an eager step. A cache shape compiles after the TTFT and before the first decode
  step (the step is pure: it runs once on a dummy token, its outputs dropped), so no timed figure contains it;
  `compile_s` is that time. `full`'s first cache shape compiles in the untimed warm-up trial instead; run.json's
  `speed.compile` counts both (`cells_compile_s`, `warm_up_compile_s`, and their sum `compile_s`). A model or
  device that cannot be compiled runs eagerly from then on: `compiled` is false in its rows, `compile_fallback`
  says why, and the report warns. Prefill chunks and quality passes run eagerly.
- **Passkey retrieval** (`--task passkey`). A prompt of exactly the passage length: an instruction, a
  filler (a sentence repeated, or with `--haystack text` a passage of the dataset), the line "The pass key
  is K. Remember it. K is the pass key." with a seeded random 5-digit K at each depth of `--depths` (0:
  just after the instruction, 1: just before the question), then "What is the pass key? The pass key is".
  It is prefilled in chunks of `prefill_chunk` under the policy and limit, then the answer " K" is fed one
  token at a time as decoding feeds tokens. `correct`: every answer token was the arg-max, which
  is exactly when greedy decoding produces the key (while it is right, it is fed the same tokens through
  the same evictions); `answer_logprob`: the answer's teacher-forced log-probability. `--samples` keys per
  length and depth; not timed.
- **Probe tasks** (`--task niah_single,vt,...`, see `kvcompare tasks`). A task plugin builds prompts of
  exactly the passage length (a context, then a question) and scores what the model makes of them. An
  `answer` task feeds its expected answer as passkey does; a `generate` task (RULER's) decodes greedily
  after the prompt, each token fed back through the same evictions, up to the task's token budget or its
  stop string, and `score` is the task's metric (RULER: the share of expected values found in `generated`,
  case-insensitive); `correct` is a full score. `--samples` probes per length (and per depth); not timed.
- **Rounds.** The cells of a passage are measured together: one quality pass each, then `repeats` rounds.
  Round r runs trial r of every cell of the passage, `full` included, and the order rotates by one cell per
  round, so a slow spell of the machine touches every policy alike. Each round also times `full` a second
  time (the A/A control, never shown as a policy) and, for `full` only, the prompt prefilled in one pass
  (chunks of at most 8192 tokens): `ttft_oneshot_s`, what a user of full attention waits for. Every trial's
  raw timings are kept in `timings/`.
- **Speed figures.** A cell's TTFT, TPOT and throughput are the medians over its trials, each with a 95%
  interval from a seeded percentile bootstrap over trials (trials, not steps: the steps of one trial share
  the machine's mood).
- **Timers.** Every timer reads the clock after synchronising the device (cuda, mps). One untimed latency
  trial of `full` on the first cell's prompt (in the prefill setting, its context) runs before anything is
  timed. `--threads` (default: the physical cores) fixes torch's intra-op threads; the load average at start
  and end is recorded.
- **Memory.** `peak_kv_bytes`: the most key/value bytes the cell's cache held after any chunk or step of its
  passes. In the prefill setting that is the quality pass's end: the compressed context plus the passage's second
  half, which is scored on it and never compressed, in every layer (`kv_bytes_compressed` plus those tokens'
  bytes), more than the whole context's before the compression. `kv_bytes_compressed`: in the prefill setting,
  the bytes held right after the compression. `peak_mem_bytes`: the most memory one of the cell's
  single-sequence passes added above what was in use when it began (so neither the weights nor what earlier
  cells left count): allocated device memory (cuda, mps) or resident memory after the C allocator returned
  freed memory (CPU), sampled at chunk boundaries (a batched quality pass's memory is no one cell's). On a CPU
  it is resident memory, so the first pass of a process at a new length also counts the process's one-time growth
  (on the embedded model the first 256-token quality pass read 79 MB, the same pass later 56-57 MB, repeating
  within 0.5 MB: `python benchmarks/peak_memory.py`); `peak_kv_bytes` is exact.
- **Relative change.** Quality: each cell against the `full` cell of the same passage, position mode and
  compression setting (paired), averaged over samples. Speed: each trial against the `full` trial of the same
  passage, position mode, compression setting, session and round, averaged over samples × rounds, with a
  seeded bootstrap 95% interval over those pairs; a change is significant when its interval excludes 0. The
  A/A control's change, paired the same way, is the run's noise floor. Negative TTFT/TPOT change is faster;
  positive PPL change is worse; accuracy change is relative to the baseline's accuracy.
- **Physics.** Beside each TPOT: the bytes one decode step reads (the model's weights, and the keys and
  values it attends at the end of the prompt), and the floor those bytes set at the memory bandwidth
  measured at the start of the run.
"""
