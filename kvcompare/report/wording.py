"""The fixed texts of a report: its title, headings, the notes under its tables, the definitions and method
it states, and what it says when there is nothing to show. Tables, notices and sections take their words from
here, so a sentence is edited in one place."""

from __future__ import annotations

from kvcompare.report.formatting import NOT_SIGNIFICANT

TITLE = "KV-cache eviction report"

QUALITY_METHOD = (
    "Quality changes (PPL, accuracy) are paired per sample: each cell is compared with the same sample's `full` "
    "cell, then the per-sample changes are averaged over samples."
)
RELATIVE_METHOD = (
    f"{QUALITY_METHOD} Speed changes (TTFT, TPOT, throughput) are "
    "paired per trial: each latency trial is compared with the `full` trial of the same passage, position mode, "
    "session and round, then averaged over those pairs (samples × rounds), with a 95% bootstrap interval."
)
#: Said once, in the results section: why the baseline's rows carry no position mode.
BASELINE_POSITIONS = (
    "The `full` baseline evicts nothing, so the position mode does not apply to it: it is labelled `full`."
)
#: Added where a run has several position modes, and so one baseline per mode.
BASELINE_PER_MODE = (
    "This run has several position modes; `full` is measured once per mode, as the baseline that mode's "
    "policies are paired with, and named after it: `full (for positions=…)`."
)
RELATIVE_DEFINITION = "Relative change = 100 × (policy − full) / full."
QUALITY_PAIRING = (
    "Quality (PPL, accuracy): the mean over samples of the per-sample change against the same sample's `full` "
    "cell, deterministic, so no interval (paired samples: samples with a `full` cell)."
)
QUALITY_SIGNS = "positive PPL = worse; accuracy is in % of the baseline accuracy (−2.8% = 2.8% lower, relative)."
RELATIVE_NOTE = (
    f"{RELATIVE_DEFINITION} Speed (TTFT, TPOT, throughput): the mean over trial pairs "
    "(speed pairs: samples × rounds) with its seeded bootstrap 95% interval over the pairs in brackets; "
    f"`{NOT_SIGNIFICANT}` marks a change whose interval includes 0 (not significant), and a change without an "
    "interval (one pair, or a run without raw timings) says so and is never significant. With few pairs the "
    "percentile bootstrap interval is close to the range of the pairs and covers less than 95%: with fewer than "
    "6 pairs, read significant as every pair agreed in sign, which chance alone gives 2 in 2^n (25% for 3 "
    "pairs); more --samples or --repeats make it a real 95% statement. TTFT is compared like "
    "for like, with `full` prefilled in the same chunks; TTFT vs one-pass full compares it with `full` prefilling "
    "the prompt in one pass, what a user of full attention waits for. "
    + QUALITY_PAIRING
    + " Signs: negative TTFT/TPOT = faster; positive throughput = faster; "
    + QUALITY_SIGNS
)
#: The relative-change note of a run that measured no speed.
RELATIVE_NOTE_QUALITY = f"{RELATIVE_DEFINITION} {QUALITY_PAIRING} Signs: {QUALITY_SIGNS}"
SAMPLE_COLUMNS = "mean ± standard deviation over samples. n = samples (successful cells only)."
ABSOLUTE_NOTE = (
    "Speed (TTFT, TTFT one pass, TPOT, throughput): a cell's figure is the median over its latency trials. With "
    "one sample: that median and, in brackets, its 95% bootstrap interval over trials. With several samples: the "
    "mean of the samples' medians and, in brackets, the range the samples' intervals cover (lowest low to "
    "highest high), which also spans passage-to-passage differences. TTFT: the prompt prefilled in chunks of "
    "`prefill_chunk` tokens, as every policy prefills it; TTFT one pass (`full` only): the prompt prefilled in "
    "one pass (chunks of at most 8192 tokens). Other columns: " + SAMPLE_COLUMNS
)
#: The absolute-values note of a run that measured no speed.
ABSOLUTE_NOTE_QUALITY = "Columns: " + SAMPLE_COLUMNS
PHYSICS_NOTE = (
    "What one decode step at the end of the prompt must read: the model's weights and the keys and values it "
    "attends, summed over layers (skip layers keep every token). TPOT floor = (weights + KV read) / the memory "
    "bandwidth measured at the start of the run ({bandwidth}): no decode step can be faster. Measured TPOT as in "
    "the absolute table. Where the weights dominate the bytes, evicting tokens cannot save much; where the keys "
    "and values dominate, it can."
)
NOISE_NOTE = (
    "The A/A control: `full` timed a second time in each round, paired with that round's `full` trial exactly "
    "as a policy's trial is. Its true change is 0; its interval shows how far two identical configurations "
    "drift apart on this machine. Noise floor of a metric = the larger of |low| and |high| of its interval over "
    "all lengths."
)
RULES_LEAD_QUALITY = "Rules (quality: mean change over samples):"
RULES_LEAD = (
    f"{RULES_LEAD_QUALITY[:-2]}; speed: mean change over paired trials, with its 95% interval "
    "and the run's noise floor):"
)
NO_RESULTS = "No successful cell: nothing to tabulate."
NO_PERPLEXITY = (
    "This run measured {what} only (no perplexity cell), so the recommendations, which rest on "
    "perplexity, are not made: see the {where} section."
)
RETRIEVAL_HEADING = "Retrieval (passkey)"
RETRIEVAL_DEFINITIONS = (
    "A probe is one prompt of exactly the given length with a random 5-digit pass key hidden at a depth (0: "
    "right after the instruction, 1: just before the question), prefilled under the policy and cache limit; "
    "accuracy = the share of probes whose greedy decoding gives the key exactly (exact match), and log-prob = "
    "the teacher-forced log-probability of the key's tokens, summed (0 = certain, more negative = less likely)."
)
RETRIEVAL_NOTE = (
    "Accuracy (%): over every answered probe of the configuration, all lengths and depths; depth columns: over "
    "the probes at that depth, all lengths. n = answered probes; failed probes are counted beside it and left "
    "out of accuracy and log-prob."
)
TASKS_HEADING = "Tasks"
TASKS_DEFINITIONS = (
    "Each probe task (RULER's synthetic tasks, third-party tasks; see `kvcompare tasks`) builds prompts of exactly "
    "the given length, run under the policy and cache limit and scored by the task: score = the task's metric "
    "averaged over probes (RULER: the share of expected values found in the greedy output, case-insensitive), "
    "accuracy = the share of probes scored fully correct. Where `full` itself scores low, the model fails the task "
    "even with every token kept, and the task says nothing about eviction on this model."
)
TASKS_SUMMARY_NOTE = "Mean score over tasks (each task weighted alike, as RULER's average); `full` first."

# --- The compression setting and ratios (protocol 8) -----------------------------------------------------------

#: Each compression setting in the words of "What was compared" (the prefill one followed by how the question
#: was treated).
SETTING_WORDS = {
    "continuous": "evicted continuously, each compressed layer cut to its limit before every chunk of the prompt "
    "and every decode step, as StreamingLLM does",
    "prefill": "compressed once after the prefill, the context prefilled whole and each compressed layer cut once "
    "to its budget, then the question and answer run on a cache that only grows, as SnapKV, PyramidKV and kvpress "
    "do",
}
QUERY_AGNOSTIC = "query-agnostic: a probe's question is not part of the compressed context, kvpress's default"
QUERY_AWARE = "query-aware: a probe's question is compressed with its context (--query-aware)"
#: Said in the results section of a run with the prefill setting: which `full` its cells are paired with.
PREFILL_PAIRING = (
    "A cell of the prefill setting is compared with the `full` of the prefill setting (`full (prefill)`), which "
    "prefills the same context and scores the same tokens (for `ppl`, only the second half of each passage); a "
    "continuous cell with the continuous `full`."
)
COMPRESSION_HEADING = "Compression"
COMPRESSION_INTRO = (
    "How much each policy keeps of what `full` scores as more of the context is removed: the budgets of this run "
    "are compression ratios, the share of each context removed, as kvpress and the literature state them."
)
COMPRESSION_INTRO_LIMITS = "What the prefill setting costs and keeps, per policy and cache limit."
COMPRESSION_LEAD = "The columns of every result row that say how and how much was compressed:"
#: The columns the compression setting added to every result row, as the report defines them (a run without the
#: prefill setting is told only of `ratio`: the others are null in it).
COMPRESSION_DEFINITIONS = {
    "compression": "`continuous` (evicted before every chunk and decode step) or `prefill` (the context "
    "prefilled whole, each compressed layer cut once to its budget, then the rest on a growing cache).",
    "ratio": "the share of the context removed (kvpress's compression ratio); a cell's cache limit is "
    "int(context × (1 − ratio)) of its own context, so probes of one ratio can have limits a few tokens apart: "
    "tables key them on the ratio and show the range of their limits.",
    "query_aware": "prefill: whether a probe's question was compressed with its context (query-aware) or not "
    "(query-agnostic).",
    "context_tokens": "prefill: the tokens prefilled, then compressed once (for `ppl`, the first half of each "
    "passage; only the tokens after it are scored).",
    "kv_bytes_compressed": "prefill: the key and value bytes held right after the compression (`peak_kv_bytes` is "
    "the quality pass's end: these plus the passage's second half, scored on them and never compressed).",
    "compress_s, compress_share": "prefill: the one compression's time inside the TTFT, summed over the latency "
    "trials, and its share of their TTFT.",
}
PREFILL_TABLE_NOTE = (
    "The prefill setting only. TTFT includes the one compression after the context; compression in TTFT = "
    "`compress_share`, its share of the TTFT. TPOT: every counted decode step runs on the compressed cache. Peak "
    "KV: the most key and value bytes the cache held in any of the cell's passes (at least the whole context's, "
    "before it was compressed; for `ppl` the quality pass then grows the cache by the passage's second half); KV "
    "after compression = `kv_bytes_compressed`. Speed figures as in the absolute tables; the others are means over "
    "samples."
)
PREFILL_TABLE_NOTE_QUALITY = (
    "The prefill setting only. Peak KV: the most key and value bytes the cache held in any of the cell's passes (at "
    "least the whole context's, before it was compressed); KV after compression = `kv_bytes_compressed`. Means "
    "over samples."
)
