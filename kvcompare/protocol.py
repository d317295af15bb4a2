"""The measurement protocol as readers see it: written once here, shown verbatim in every report and in the
README (a test keeps the README in step). The code that carries it out is ``kvcompare.measure``."""

#: How the numbers are measured; shown verbatim in every report and in the README.
PROTOCOL_MD = """\
- **Cells.** One measurement per (policy with its parameters, cache limit, passage length, sample, position
  mode). The `full` baseline keeps every token and has no limit; every other policy runs under the same
  limit, through the same executor, with the same timers.
- **Cache limit.** Before a chunk of `c` tokens is attended, each compressed layer holding more than
  `limit - c` tokens is reduced by the policy to `limit - c` (or to `evict_block` fewer tokens than it
  holds, whichever is smaller), so no attention call sees more than `limit` keys. Skip layers (default 0
  and 1) keep their full cache. One gather moves the kept keys and values of all compressed layers.
- **Positions.** `true`: every token keeps its original position. `shift` (StreamingLLM): positions are
  slots in the cache; after an eviction the kept keys are re-rotated so that they sit at consecutive
  positions ending just before the next token, which gives exactly the relative distances of cache slots.
- **Quality pass.** The passage is fed teacher-forced in chunks of `stride` tokens under the policy and the
  limit; every token after the first is scored. `ppl = exp(mean NLL)`; `accuracy` is the share of tokens
  whose arg-max prediction is the next token. NLL is also kept per bucket of positions for the
  perplexity-against-position curve.
- **Latency pass.** The passage is the prompt, prefilled in chunks of `stride` under the policy and limit.
  `ttft_s` runs from the start of the prefill to the first generated token (greedy). Then `warmup + gen`
  tokens are decoded one at a time; the first `warmup` steps are not counted. `tpot_s` is the median counted
  step (eviction included), `throughput_tok_s` is `gen` divided by the counted steps' total time. Eviction
  time inside the counted steps is `evict_s`, and `evict_share = evict_s / decode time`.
- **Timers.** Every timer reads the clock after synchronising the device (cuda, mps). One untimed warm-up
  pass runs before the first cell.
- **Memory.** `peak_kv_bytes`: the most key/value bytes the cache held. `peak_mem_bytes`: peak resident memory
  of the process (CPU), or peak allocated device memory (cuda, mps), sampled at chunk boundaries.
- **Relative change.** Each cell is compared with the `full` cell of the same passage, length and position
  mode (paired), then averaged over samples. Negative TTFT/TPOT change is faster; positive PPL change is
  worse; accuracy change is relative to the baseline's accuracy.
"""
