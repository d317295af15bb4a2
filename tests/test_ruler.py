"""RULER's synthetic tasks (plugins/niah.py, variable_tracking.py, common_words.py, frequent_words.py): exact
prompt lengths, seeded probes, needle positions, how often the answers appear, and the scorer; no model.

Two tokenizers: a small byte-level BPE trained on the test corpus (a real tokenizer, whose pieces merge) and a
word-level stand-in (one token per word with its leading whitespace). Both decode losslessly, so the prompts'
text can be checked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import pytest

from kvcompare.ruler import NOISE, depth_grid, weave
from kvcompare.task import Outcome, Probe, Task, TaskError, TaskInputs
from kvcompare.words import english_words

ROOT = Path(__file__).resolve().parents[1]


def plugin(name: str) -> ModuleType:
    """This checkout's ``plugins/<name>.py`` as ``kvcompare_plugins.<name>`` (the installed kvcompare_plugins
    may be another checkout's folder, so it is loaded from the file)."""
    full, path = f"kvcompare_plugins.{name}", ROOT / "plugins" / f"{name}.py"
    loaded = sys.modules.get(full)
    if loaded is not None and Path(str(loaded.__file__)).resolve() == path:
        return loaded
    spec = importlib.util.spec_from_file_location(full, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


niah, vt, cwe, fwe = (plugin(name) for name in ("niah", "variable_tracking", "common_words", "frequent_words"))


class WordTokenizer:
    """One token per word with its leading whitespace (or per run of trailing whitespace)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        return [self.ids.setdefault(piece, len(self.ids)) for piece in re.findall(r"\s*\S+|\s+", text)]

    def decode(self, ids: Sequence[int]) -> str:
        if len(self.pieces) < len(self.ids):
            self.pieces = sorted(self.ids, key=self.ids.__getitem__)
        return "".join(self.pieces[i] for i in ids)


#: A tokenizer: encode and decode.
Tokenizer = tuple[Callable[[str], list[int]], Callable[[Sequence[int]], str]]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    text = (ROOT / "tests" / "data" / "tiny_corpus.txt").read_text()
    tokenizer.train_from_iterator([text], vocab_size=300, min_frequency=1, show_progress=False)
    return (lambda text: tokenizer.encode(text).ids), (lambda ids: tokenizer.decode(list(ids)))


@pytest.fixture(params=["bpe", "words"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which tokenizer: the tiny BPE or the word-level stand-in."""
    return str(request.param)


def tokenizer_of(kind: str, request: pytest.FixtureRequest) -> Tokenizer:
    if kind == "bpe":
        return request.getfixturevalue("bpe")
    words = WordTokenizer()
    return words.encode, words.decode


def make_inputs(
    tokenizer: Tokenizer,
    bos: int | None = None,
    seed: int = 0,
) -> TaskInputs:
    encode, decode = tokenizer
    book = encode((ROOT / "tests" / "data" / "tiny_corpus.txt").read_text())

    def filler(sample: int, tokens: int) -> tuple[Sequence[int], str]:
        start = 97 * sample % len(book)
        return (book[start:] + book * (tokens // len(book) + 1))[: max(tokens, 1)], "tiny_corpus"

    return TaskInputs(
        encode=encode,
        bos=bos,
        seed=seed,
        filler=filler,
        word_list=english_words,
        decode=decode,
    )


@pytest.fixture
def inputs(kind: str, request: pytest.FixtureRequest) -> TaskInputs:
    return make_inputs(tokenizer_of(kind, request))


def text(inputs: TaskInputs, tokens: Sequence[int]) -> str:
    assert inputs.decode is not None
    return inputs.decode(tokens)


#: Every task as RULER configures it, and the variants that change how a prompt is built.
TASKS: list[Task] = [
    niah.NiahSingle(),
    niah.NiahSingle(haystack="text", value="uuids"),
    niah.NiahMultikey(),
    niah.NiahMultikey(haystack="needles", keys=1),
    niah.NiahMultikey(haystack="needles", keys=1, key="uuids", value="uuids"),
    niah.NiahMultivalue(),
    niah.NiahMultiquery(haystack="repeat"),
    vt.VariableTracking(),
    vt.VariableTracking(haystack="text", chains=2),
    cwe.CommonWords(),
    fwe.FrequentWords(),
]
NIAH = [task for task in TASKS if isinstance(task, niah.NeedleTask)]


def lengths(task: Task, tokenizer: str) -> list[int]:
    """Lengths the task fits at with the tokenizer (the tiny BPE spends many tokens on a word)."""
    if isinstance(task, cwe.CommonWords):
        return [2048, 8192] if tokenizer == "bpe" else [512, 1024, 4096]
    return [1024, 2048] if tokenizer == "bpe" else [300, 1024, 2048]


# --- the contract ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS, ids=Task.label)
def test_prompts_are_exactly_the_length(task: Task, kind: str, request: pytest.FixtureRequest) -> None:
    tokenizer = tokenizer_of(kind, request)
    for bos in (None, 0):
        inputs = make_inputs(tokenizer, bos=bos)
        for length in lengths(task, kind):
            probes = task.probes(inputs, length, 2)
            assert len(probes) == 2
            for probe in probes:
                assert len(probe.context) + len(probe.question) == length
                assert len(probe.tokens) == length
                if bos is not None:
                    assert probe.context[0] == bos
                assert probe.expected and all(value for value in probe.expected)
                json.dumps(dict(probe.params))  # a report can store them


@pytest.mark.parametrize("task", TASKS, ids=Task.label)
def test_probes_are_seeded_and_samples_differ(task: Task, bpe: Tokenizer) -> None:
    inputs = make_inputs(bpe)
    length = lengths(task, "bpe")[0]
    first, again = task.probes(inputs, length, 3), task.probes(inputs, length, 3)
    assert first == again
    assert len({probe.tokens for probe in first}) == 3
    assert len({probe.expected for probe in first}) == 3
    other_seed = task.probes(make_inputs(bpe, seed=1), length, 1)[0]
    assert other_seed.tokens != first[0].tokens
    # A probe depends on its sample, not on how many were asked for.
    assert task.probes(inputs, length, 1)[0] == first[0]


@pytest.mark.parametrize(
    ("task", "tokens", "stop"),
    [
        (niah.NiahSingle(), 128, ()),
        (vt.VariableTracking(), 30, ()),
        (cwe.CommonWords(), 120, ()),
        (fwe.FrequentWords(), 50, ()),
    ],
    ids=lambda value: getattr(value, "name", None),
)
def test_tokens_to_generate_are_ruler_s(task: Task, tokens: int, stop: tuple[str, ...], bpe: Tokenizer) -> None:
    probe = task.probes(make_inputs(bpe), lengths(task, "bpe")[0], 1)[0]
    assert (probe.max_new_tokens, probe.stop) == (tokens, stop)
    assert task.request == "generate" and task.metric.startswith("RULER's string_match_all")


@pytest.mark.parametrize("task", TASKS, ids=Task.label)
def test_a_length_too_short_is_a_task_error(task: Task, bpe: Tokenizer) -> None:
    with pytest.raises(TaskError, match=r"at least|too short|fewer than"):
        task.probes(make_inputs(bpe), 60, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: niah.NiahSingle(haystack="needles"),
        lambda: niah.NiahSingle(value="letters"),
        lambda: niah.NiahMultikey(keys=0),
        lambda: niah.NiahMultivalue(values=41),  # more needles than depths
        lambda: niah.NiahMultiquery(depths=0),
        lambda: vt.VariableTracking(hops=0),
        lambda: vt.VariableTracking(haystack="needles"),
        lambda: cwe.CommonWords(freq_cw=3, freq_ucw=3),
        lambda: cwe.CommonWords(num_cw=0),
        lambda: fwe.FrequentWords(alpha=1.0),
        lambda: fwe.FrequentWords(vocab=3),
    ],
)
def test_bad_parameters_are_task_errors(make: Callable[[], Task]) -> None:
    with pytest.raises(TaskError):
        make()


def test_the_plugins_register_their_tasks() -> None:
    found: list[type[Task]] = []
    for module in (niah, vt, cwe, fwe):
        module.register_tasks(register=found.append)
    names = [cls.name for cls in found]
    assert names == ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
    for cls in found:
        assert issubclass(cls, Task) and dataclasses.is_dataclass(cls)
        task = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.name = "x"  # type: ignore[misc]
        fields = dataclasses.fields(cls)
        assert fields and all(f.metadata.get("help") and f.default is not dataclasses.MISSING for f in fields)
        assert cls.axes == (("depth",) if cls.name == "niah_single" else ())
    assert niah.NiahSingle(haystack="text").label() == "niah_single:haystack=text"


# --- the scorer -----------------------------------------------------------------------------------------------


ALL = [niah.NiahSingle(), niah.NiahMultikey(), niah.NiahMultivalue(), niah.NiahMultiquery()]
ALL += [vt.VariableTracking(), cwe.CommonWords(), fwe.FrequentWords()]


@pytest.mark.parametrize("task", ALL, ids=Task.label)
def test_the_score_is_the_share_of_expected_values_found(task: Task) -> None:
    probe = Probe(context=(1,), question=(2,), expected=("fluffy-ocean", "1234567", "QWERT", "apple"))
    found = task.score(probe, Outcome(text=" 1. FLUFFY-Ocean 2. 1234567, qwert and Apple."))
    assert (found.score, found.correct) == (1.0, True)
    half = task.score(probe, Outcome(text="fluffy-ocean, qwer, appl, 1234567"))
    assert (half.score, half.correct) == (0.5, False)
    assert task.score(probe, Outcome(text="nothing here")) == task.score(probe, Outcome(text=None))
    assert task.score(probe, Outcome(text="")).score == 0.0 and not task.score(probe, Outcome(text="")).correct


# --- needles --------------------------------------------------------------------------------------------------

NEEDLE = re.compile(r"One of the special magic (\w+) for ([\w-]+) is: ([\w-]+)\.")


def queried_keys(question: str) -> list[str]:
    match = re.search(r"magic \w+ for (.+?) mentioned", question)
    assert match
    return re.split(r", and |, ", match.group(1))


@pytest.mark.parametrize("task", NIAH, ids=Task.label)
def test_each_queried_needle_appears_once_and_distractors_differ(task: Task, inputs: TaskInputs) -> None:
    keys, values, queries = task.shape()  # type: ignore[attr-defined]
    for probe in task.probes(inputs, 2048, 3):
        context, question = text(inputs, probe.context), text(inputs, probe.question)
        needles = NEEDLE.findall(context)
        queried = queried_keys(question)
        assert len(queried) == queries == len(set(queried))
        assert len(probe.expected) == queries * values
        for key in queried:
            assert context.count(f" for {key} is: ") == values
        for answer in probe.expected:
            assert context.count(answer) == 1
            assert [key for _, key, value in needles if value == answer][0] in queried
        found_values = [value for _, _, value in needles]
        assert len(found_values) == len(set(found_values))  # distractor values differ from the answers
        if task.haystack == "needles":  # type: ignore[attr-defined]
            assert len(needles) > 5
        else:
            assert len(needles) == keys * values == probe.param("needles")
            assert len({key for _, key, _ in needles}) == keys
        assert all(kind == task.value for kind, _, _ in needles)  # type: ignore[attr-defined]
        singular = queries * values == 1
        assert question.endswith(f"mentioned in the provided text {'is' if singular else 'are'}")
        assert context.lstrip().startswith("A special magic" if singular else "Some special magic")


@pytest.mark.parametrize("haystack", ["repeat", "text"])
def test_the_single_needle_sits_at_its_depth(haystack: str, inputs: TaskInputs) -> None:
    task = niah.NiahSingle(haystack=haystack)
    lines = haystack == "repeat"
    prefix = len(inputs.encode(niah.singular(niah.INSTRUCTION).format(kind="number") + ("" if lines else "\n")))
    grid = set(depth_grid(40))
    sentences = re.findall(r"\s*[^.]+\.", "\n" + NOISE)
    tolerance = max(len(inputs.encode(sentence)) for sentence in sentences) / 2 + 0.5
    seen = set()
    for length in (1024, 2048):
        for probe in task.probes(inputs, length, 12):
            depth = probe.param("depth")
            assert depth in grid
            seen.add(depth)
            (key,) = queried_keys(text(inputs, probe.question))
            sentence = niah.NEEDLE.format(kind="numbers", key=key, value=probe.expected[0])
            tokens = inputs.encode(("\n" if lines else " ") + sentence)
            starts = [i for i in range(len(probe.context)) if probe.context[i : i + len(tokens)] == tuple(tokens)]
            assert len(starts) == 1
            haystack_tokens = len(probe.context) - prefix - len(tokens)
            # In book text the needle goes before the very token; in the noise, at the nearest sentence start.
            assert abs(starts[0] - prefix - depth * haystack_tokens) <= (tolerance if lines else 0.5)
            if lines:
                assert text(inputs, probe.context[: starts[0]]).endswith((".", "afterwards."))
            assert probe.source == ("repeat" if lines else "tiny_corpus")
    assert len(seen) > 6


def test_the_noise_haystack_is_ruler_s_sentence(inputs: TaskInputs) -> None:
    probe = niah.NiahSingle().probes(inputs, 1024, 1)[0]
    assert text(inputs, probe.context).count(NOISE) > 5


def test_multiple_needles_sit_at_distinct_depths(inputs: TaskInputs) -> None:
    for probe in niah.NiahMultiquery().probes(inputs, 2048, 5):
        depths = probe.param("depths")
        assert len(depths) == len(set(depths)) == 4 and list(depths) == sorted(depths)


def test_weave_places_inserts_before_their_offsets() -> None:
    assert weave([0, 1, 2, 3], [(2, [8]), (0, [9]), (4, [7]), (2, [6])]) == [9, 0, 1, 8, 6, 2, 3, 7]
    with pytest.raises(TaskError):
        weave([0], [(2, [1])])


# --- variable tracking ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chains", [1, 3])
def test_vt_chains_appear_once_in_order(chains: int, inputs: TaskInputs) -> None:
    task = vt.VariableTracking(chains=chains, hops=5)
    for probe in task.probes(inputs, 2048, 3):
        context, question = text(inputs, probe.context), text(inputs, probe.question)
        value = re.search(r"assigned the value (\d{5}) in", question).group(1)  # type: ignore[union-attr]
        assert f"6 variables are assigned the value {value}, they are: " in question
        names = probe.expected
        assert len(names) == 6 == len(set(names)) and all(re.fullmatch("[A-Z]{5}", name) for name in names)
        main = context[context.rindex(vt.INSTRUCTION) :]
        assert context.count(vt.INSTRUCTION) == 2  # the worked example comes first
        assert context.count(value) == 1
        statements = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(5)]
        assert all(main.count(statement) == 1 for statement in statements)
        positions = [main.index(statement) for statement in statements]
        assert positions == sorted(positions)
        assert len(re.findall(r"VAR [A-Z]{5} = \d{5}", main)) == chains
        assert len(re.findall(r"VAR [A-Z]{5} = ", main)) == 6 * chains


def test_vt_without_the_example(inputs: TaskInputs) -> None:
    probe = vt.VariableTracking(fewshot=False).probes(inputs, 1024, 1)[0]
    assert text(inputs, probe.context).count(vt.INSTRUCTION) == 1 and probe.param("example") == 0


# --- common words ---------------------------------------------------------------------------------------------


def common_list(inputs: TaskInputs, probe: Probe) -> list[str]:
    """The words of the probe's (last) list, checking it is numbered 1, 2, 3, ..."""
    context = text(inputs, probe.context)
    listed = context[context.rindex(cwe.INSTRUCTION) + len(cwe.INSTRUCTION) :]
    entries = re.findall(r"(\d+)\. ([a-z]+)", listed)
    assert [int(number) for number, _ in entries] == list(range(1, len(entries) + 1))
    assert listed.rstrip("\n").endswith(entries[-1][1])
    return [word for _, word in entries]


@pytest.mark.parametrize(
    ("task", "sizes", "common", "other"),
    [
        (cwe.CommonWords(), {"words": 4096, "bpe": 8192}, 30, 3),
        (cwe.CommonWords(), {"words": 1024, "bpe": 2048}, 6, 1),  # RULER's frequencies below 4096 tokens
        (cwe.CommonWords(freq_cw=5, freq_ucw=2, short_below=0), {"words": 1024, "bpe": 4096}, 5, 2),
        (cwe.CommonWords(num_cw=4, fewshot=False), {"words": 4096, "bpe": 4096}, 30, 3),
    ],
    ids=lambda value: value.label() if isinstance(value, Task) else None,
)
def test_cwe_words_appear_their_number_of_times(
    task: cwe.CommonWords, sizes: dict[str, int], common: int, other: int, kind: str, inputs: TaskInputs
) -> None:
    for probe in task.probes(inputs, sizes[kind], 2):
        counts = Counter(common_list(inputs, probe))
        assert {word: counts[word] for word in probe.expected} == dict.fromkeys(probe.expected, common)
        others = {word: n for word, n in counts.items() if word not in probe.expected}
        assert others and set(others.values()) == {other}
        assert len(probe.expected) == task.num_cw
        assert f"What are the {task.num_cw} most common words" in text(inputs, probe.question)
        assert probe.param("words") == len(counts)
        # The padding is less than the entries of one more word would take.
        longest_word = max(len(inputs.encode(f" {word}")) for word in inputs.words)
        longest_number = len(inputs.encode(f" {sum(counts.values()) + other}."))
        assert probe.param("padding") < other * (longest_word + longest_number)
        context = text(inputs, probe.context)
        if task.fewshot:  # the example's words are not the list's
            example = context[: context.rindex(cwe.INSTRUCTION)]
            assert not set(re.findall(r"\d+\. ([a-z]+)", example)) & set(counts)


def test_cwe_fails_clearly_when_the_word_list_runs_out(inputs: TaskInputs) -> None:
    small = dataclasses.replace(inputs, word_list=lambda: english_words()[:200])
    with pytest.raises(TaskError, match="word list"):
        cwe.CommonWords().probes(small, 16384, 1)


# --- frequent words -------------------------------------------------------------------------------------------


def test_fwe_answers_are_the_three_most_frequent_coded_words(inputs: TaskInputs) -> None:
    task = fwe.FrequentWords()
    for length in (1024, 4096):
        for probe in task.probes(inputs, length, 2):
            context = text(inputs, probe.context)
            coded = context[len(fwe.INSTRUCTION) :].split()
            assert probe.param("words") == len(coded)
            counts = Counter(coded)
            assert counts.most_common(1)[0][0] == "..."
            del counts["..."]
            assert all(re.fullmatch("[a-z]{6}", word) for word in counts)
            answers = set(probe.expected)
            assert len(answers) == 3 and answers <= set(counts)
            assert min(counts[word] for word in answers) > max(n for word, n in counts.items() if word not in answers)
            assert probe.param("vocab") == length // 50 and probe.param("padding") < 20


def test_fwe_counts_follow_the_zipf_law() -> None:
    counts = fwe.FrequentWords().counts(1000, 6)
    assert counts == [int(1000 / k**2 / (3.141592653589793**2 / 6)) for k in range(1, 7)]


# --- words ----------------------------------------------------------------------------------------------------


def test_english_words_are_wonderwords_lists() -> None:
    pytest.importorskip("wonderwords")
    words = english_words()
    assert len(words) > 5000 and words == tuple(sorted(set(words)))
    assert all(word.isascii() and word.isalpha() and word.islower() for word in words)
    assert {"ocean", "fluffy", "accept"} <= set(words) and "tv" not in words
    assert english_words() is words


def test_english_words_without_wonderwords(monkeypatch: pytest.MonkeyPatch) -> None:
    english_words.cache_clear()
    monkeypatch.setitem(sys.modules, "wonderwords", None)
    try:
        with pytest.raises(TaskError, match="pip install wonderwords"):
            english_words()
    finally:
        english_words.cache_clear()
