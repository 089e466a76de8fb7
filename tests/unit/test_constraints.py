"""Output constraints in the engine (worker/constraints.py through worker/chooser.py), on the tiny random
model with SmolLM2's tokenizer: a random model picks among whatever the mask allows, so every output
that is well-formed is so because of the constraint."""
from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest

from common.grammars import Constraint, ConstraintError
from common.settings import WorkerSettings
from common.schemas import ErrorEvent, FinalEvent, FinishReason, GenerationJob, SamplingParams, StoppingParams

from .test_engine import PROMPTS, job, run_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.25},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "kind": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "score", "tags", "address", "kind"],
    "additionalProperties": False,
}


def constrained(rid, prompt, constraint: Constraint, n=160, **sampling) -> GenerationJob:
    return GenerationJob(rid, tuple(prompt), SamplingParams(**sampling), StoppingParams(max_new_tokens=n), "chan",
                         want_tokens=True, attempt=1, grammar=constraint.grammar())


def texts(loaded, jobs):
    settings = WorkerSettings(max_batch_size=32, waiting_served_ratio=0.0)
    _, _, sink = run_engine(loaded, {0: jobs}, settings=settings, max_steps=2000)
    return {j.request_id: sink.result(j.request_id) for j in jobs}


def test_fifty_sampled_generations_under_a_nested_schema_all_validate(tiny_loaded):
    """Temperature 1.0, a seed each: every output parses and validates, and ends the row (EOS)."""
    jobs = [constrained(f"s{i}", PROMPTS[i % len(PROMPTS)], Constraint("json", SCHEMA), n=256,
                        do_sample=True, temperature=1.0, seed=i) for i in range(50)]
    results = texts(tiny_loaded, jobs)
    for rid, final in results.items():
        assert isinstance(final, FinalEvent), final
        assert final.finish_reason == FinishReason.EOS_TOKEN, (rid, final.generated_text)
        jsonschema.validate(json.loads(final.generated_text), SCHEMA)


def test_every_sampled_output_matches_a_regex_and_a_choice(tiny_loaded):
    pattern = r"[a-z]{3,6}-[0-9]{2}"
    jobs = [constrained(f"r{i}", PROMPTS[0], Constraint("regex", pattern), do_sample=True, seed=i) for i in range(20)]
    jobs += [constrained(f"c{i}", PROMPTS[1], Constraint("choice", ["red", "green", "blue sky"]), do_sample=True,
                         seed=i) for i in range(20)]
    results = texts(tiny_loaded, jobs)
    for rid, final in results.items():
        if rid.startswith("r"):
            assert re.fullmatch(pattern, final.generated_text), final.generated_text
        else:
            assert final.generated_text in ("red", "green", "blue sky")
        assert final.finish_reason == FinishReason.EOS_TOKEN


def test_a_lark_grammar_is_followed(tiny_loaded):
    grammar = 'start: "(" num " + " num ")" | num\nnum: /[1-9][0-9]?/'
    [final] = texts(tiny_loaded, [constrained("g", PROMPTS[0], Constraint("lark", grammar), n=64)]).values()
    assert re.fullmatch(r"\([1-9][0-9]? \+ [1-9][0-9]?\)|[1-9][0-9]?", final.generated_text), final.generated_text
    assert final.finish_reason == FinishReason.EOS_TOKEN


def test_logprobs_are_those_of_the_masked_distribution(tiny_loaded):
    """A choice between one string: every token is forced, so each chosen token has all the mass."""
    [final] = texts(tiny_loaded, [constrained("f", PROMPTS[0], Constraint("choice", ["forced output"]))]).values()
    assert final.generated_text == "forced output"
    assert all(math.isclose(t.logprob, 0.0, abs_tol=1e-6) for t in final.tokens)


def test_unconstrained_rows_beside_constrained_ones_keep_their_tokens(tiny_loaded):
    alone = texts(tiny_loaded, [job("u", PROMPTS[2], n=12)])["u"]
    mixed = texts(tiny_loaded, [job("u", PROMPTS[2], n=12),
                                constrained("j", PROMPTS[0], Constraint("json", SCHEMA), n=256)])
    assert [t.id for t in mixed["u"].tokens] == [t.id for t in alone.tokens]
    jsonschema.validate(json.loads(mixed["j"].generated_text), SCHEMA)


def test_the_length_limit_ends_a_constrained_row_with_length(tiny_loaded):
    [final] = texts(tiny_loaded, [constrained("l", PROMPTS[0], Constraint("json", SCHEMA), n=3)]).values()
    assert final.finish_reason == FinishReason.LENGTH and final.generated_tokens == 3


def test_a_grammar_the_worker_cannot_compile_fails_that_job_only(tiny_loaded):
    bad = GenerationJob("bad", tuple(PROMPTS[0]), SamplingParams(), StoppingParams(max_new_tokens=8), "chan",
                        attempt=1, grammar='{"grammars": [{"lark_grammar": "start: nowhere"}]}')
    results = texts(tiny_loaded, [bad, job("ok", PROMPTS[1], n=5)])
    assert isinstance(results["bad"], ErrorEvent) and "invalid grammar" in results["bad"].message
    assert isinstance(results["ok"], FinalEvent) and results["ok"].generated_tokens == 5


def test_the_engine_reports_mask_time_and_compiles_each_grammar_once(tiny_loaded):
    jobs = [constrained(f"m{i}", PROMPTS[0], Constraint("regex", "[0-9]{4}"), do_sample=True, seed=i) for i in range(6)]
    eng, _, sink = run_engine(tiny_loaded, {0: jobs})
    assert all(isinstance(sink.result(j.request_id), FinalEvent) for j in jobs)
    assert eng.grammars.compilations == 1
    text = eng.metrics.registry.get_sample_value("tgq_grammar_mask_duration_count")
    assert text is not None and text >= 4


@pytest.mark.parametrize("kind, value, message", [
    ("json", {"type": "nonsense"}, "invalid JSON schema"),
    ("json", [1, 2], "must be an object or a boolean"),
    ("json", False, "accepts no output"),
    ("regex", "[a-", "invalid regex constraint"),
    ("regex", "", "non-empty string"),
    ("lark", "start: undefined_rule", "invalid lark constraint"),
    ("choice", [], "list of 1 to"),
    ("choice", ["a", 3], "list of 1 to"),
    ("xml", "<a/>", "unknown constraint type `xml`"),
    ("regex", "a" * 70_000, "at most 65536"),
])
def test_constraints_that_cannot_be_followed_are_refused_with_a_reason(kind, value, message):
    with pytest.raises(ConstraintError, match=re.escape(message)):
        Constraint(kind, value).grammar()


def test_constrained_greedy_bf16_rows_take_the_kernel_with_the_reference_paths_tokens(tiny_model_dir, tmp_path):
    """A bf16 model on an AVX-512 CPU: constrained greedy rows are masked on the model's logits and chosen
    by the fused greedy kernel; the tokens and logprobs are those of the fp32 processors path."""
    from common.model_files import resolve
    from worker.model import load_model

    loaded = load_model(resolve(str(tiny_model_dir)), str(tmp_path), "cpu", "bf16", 1)
    if loaded.fast is None or not loaded.fast.kernel_greedy:
        pytest.skip("no greedy kernel on this CPU")
    jobs = lambda: [constrained(f"k{i}", PROMPTS[i], Constraint("json", SCHEMA), n=48) for i in range(3)]
    with_kernel = texts(loaded, jobs())
    loaded.fast.kernel_greedy = False
    try:
        reference = texts(loaded, jobs())
    finally:
        loaded.fast.kernel_greedy = True
    for rid, final in reference.items():
        got = with_kernel[rid]
        assert [t.id for t in got.tokens] == [t.id for t in final.tokens]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got.tokens, final.tokens))


def test_a_constrained_prompt_served_from_the_prefix_cache_gives_the_same_tokens(tiny_model_dir, tmp_path):
    """The paged KV cache with prefix caching: the second run of a constrained job reuses its prompt's
    blocks and follows its grammar to the same tokens."""
    from common.model_files import resolve
    from worker.model import load_model

    loaded = load_model(resolve(str(tiny_model_dir)), str(tmp_path), "cpu", "fp32", 1)
    settings = WorkerSettings(max_batch_size=4, waiting_served_ratio=0.0, kv_cache="paged", kv_block_size=4)
    prompt = list(range(300, 340))
    job = lambda rid: constrained(rid, prompt, Constraint("json", SCHEMA), n=60)
    eng, _, sink = run_engine(loaded, {0: [job("a")], 3: [job("b")]}, settings=settings, max_steps=400)
    assert eng.blocks is not None and eng.blocks.hit_tokens >= 36
    first, second = sink.result("a"), sink.result("b")
    assert [t.id for t in first.tokens] == [t.id for t in second.tokens]
    jsonschema.validate(json.loads(first.generated_text), SCHEMA)


def test_penalties_and_alternatives_apply_under_a_constraint(tiny_loaded):
    """Sampling with OpenAI's penalties and top alternatives: the output still validates, and the
    alternatives are ranked from the masked distribution (ids the grammar forbade come last, at -inf)."""
    jobs = [constrained(f"p{i}", PROMPTS[i % 4], Constraint("json", SCHEMA), n=256, do_sample=True, seed=i,
                        frequency_penalty=0.5, presence_penalty=0.3, top_n_tokens=3) for i in range(4)]
    for final in texts(tiny_loaded, jobs).values():
        jsonschema.validate(json.loads(final.generated_text), SCHEMA)
        for token in final.tokens:
            assert math.isfinite(token.logprob) and token.logprob <= 0.0
            ranked = [a.logprob for a in token.top]
            assert len(ranked) == 3 and ranked == sorted(ranked, reverse=True) and math.isfinite(ranked[0])
