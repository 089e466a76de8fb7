"""`python -m bench.grammar_libs`: llguidance against outlines-core (and xgrammar) on tgq's default tokenizer.

In-process, on the CPU, with SmolLM2-135M-Instruct's tokenizer (49152 ids, byte-level BPE), for each library
that imports and three JSON schemas (`flat`: name and age; `nested`: a sub-object, an array of objects, enums,
number bounds; `records200`: bench.structured's array of at least 200 records):
- **index build**: the per-tokenizer structure, once (llguidance's `LLTokenizer`; outlines-core's `Vocabulary`,
  from the token strings turned back into their bytes);
- **compile**: schema to the first allowed-token mask of a fresh matcher (llguidance compiles lazily,
  outlines-core builds its whole token index up front; the first mask makes the two comparable); the median
  over the schema and `--repeats - 1` variants with one property renamed, so no cache hides the cost; a
  schema's repeats stop once they have taken `--budget` seconds;
- **mask per token**: a valid output (`json.dumps` of a valid instance, ", " and ": " separators) is
  tokenized and walked: the mask before each token timed, then the matcher advanced by that token. The table
  shows a second, warm walk of at least 1000 steps (the output repeated; the first, cold walk is in the JSON).
  Then 32 matchers, staggered along the same output (each starting over at its end), for at least 1000 steps,
  timing the fill of all 32 masks per step: one batched call where the library has one (llguidance's
  `fill_next_token_bitmask_par`), else a loop over the matchers ("serial");
- **accepted**: every token allowed by the mask and the matcher, each walk ending in an accepting state.
  Also: whether `{"name": "Ada", "age": 121}` is refused under `flat` (maximum 120).
xgrammar is not measured (installing it pulls in triton, several GB). `--json PATH` writes the raw numbers.
"""
from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import stats
from .cost_probe import cpu_model
from .structured import SCHEMA

_obj = lambda **props: {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
_int = lambda lo, hi, kind="integer": {"type": kind, "minimum": lo, "maximum": hi}
_str = lambda n: {"type": "string", "maxLength": n}
FLAT = _obj(name=_str(24), age=_int(0, 120))
NESTED = _obj(user=_obj(id=_int(1, 99999), email=_str(40), role={"enum": ["admin", "editor", "viewer"]}),
              items={"type": "array", "items": _obj(sku=_str(12), qty=_int(1, 100), price=_int(0, 10000, "number")),
                     "minItems": 1, "maxItems": 8},
              status={"enum": ["open", "paid", "shipped"]}, notes={"type": "array", "items": _str(30), "maxItems": 3})
COLORS = ["red", "green", "blue", "alpha", "beta"]
CASES: dict[str, tuple[dict[str, Any], Any]] = {  # schema, a valid instance
    "flat": (FLAT, {"name": "Ada Lovelace", "age": 36}),
    "nested": (NESTED, {"user": {"id": 4821, "email": "ada@example.com", "role": "editor"},
                        "items": [{"sku": "AB-1234", "qty": 2, "price": 19.99},
                                  {"sku": "ZX-9", "qty": 10, "price": 0.5}],
                        "status": "paid", "notes": ["leave at the door", "fragile"]}),
    "records200": (SCHEMA, [{"id": i * 479 % 100000, "name": f"record {i}",
                             "tags": [COLORS[(i + k) % 5] for k in range(i % 5)], "score": i % 97 / 100}
                            for i in range(200)]),
}
OUT_OF_RANGE = {"name": "Ada", "age": 121}
BATCH = 32
_dumps = lambda value: json.dumps(value, separators=(", ", ": "))  # the output a valid generation writes


def _variant(schema: dict[str, Any], i: int) -> dict[str, Any]:
    """The same schema with its first object's first property renamed (`i` = 0: unchanged)."""
    schema = copy.deepcopy(schema)
    obj = schema if "properties" in schema else schema["items"]
    old = next(iter(obj["properties"]))
    new = f"{old}_{i}" if i else old
    obj["properties"] = {new if k == old else k: v for k, v in obj["properties"].items()}
    obj["required"] = [new if k == old else k for k in obj["required"]]
    return schema


class LLGuidance:
    dist, batched, info = "llguidance", True, {}

    def __init__(self) -> None:  # imports, not timed
        import llguidance.hf
        import llguidance.torch

        from common.grammars import JSON_OPTIONS, parser_limits

        self._llg, self._options, self._limits = llguidance, JSON_OPTIONS, parser_limits()

    def build(self, tok: Any) -> None:
        self._llt = self._llg.hf.from_tokenizer(tok, n_vocab=len(tok), eos_token=tok.eos_token_id)
        self._executor = self._llg.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self._llg.LLMatcher.grammar_from_json_schema(schema, defaults=self._options)
        matcher = self._llg.LLMatcher(self._llt, grammar, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    matchers = staticmethod(lambda compiled, n: [compiled.deep_copy() for _ in range(n)])
    def mask(self, matchers: list[Any], bitmask: Any) -> None:
        if len(matchers) == 1:
            self._llg.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            items = [(m, i) for i, m in enumerate(matchers)]
            self._llg.torch.fill_next_token_bitmask_par(self._executor, items, bitmask)

    advance = staticmethod(lambda matcher, token: bool(matcher.consume_token(token)))
    accepting = staticmethod(lambda matcher: bool(matcher.is_accepting()))


def byte_level_vocab(tok: Any) -> dict[bytes, list[int]]:
    """Token bytes -> ids for a byte-level BPE tokenizer (GPT-2's byte <-> printable char table undone),
    special tokens and EOS left out, as outlines-core's own `Vocabulary.from_pretrained` does."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    byte_of = {chr(c): b for c, b in zip(chars, printable + [b for b in range(256) if b not in printable])}
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special} | {tok.eos_token_id}
    vocab: dict[bytes, list[int]] = {}
    for text, i in tok.get_vocab().items():
        if i not in special:
            vocab.setdefault(bytes(byte_of[c] for c in text), []).append(i)
    return vocab


class OutlinesCore:
    dist, batched = "outlines-core", False

    def __init__(self) -> None:
        import outlines_core

        self._oc = outlines_core

    def build(self, tok: Any) -> None:
        self._raw = byte_level_vocab(tok)
        self._vocab = self._oc.Vocabulary(tok.eos_token_id, self._raw)

    def check(self, tok: Any) -> None:
        """The vocabulary's size, and its tokens whose bytes (valid UTF-8) differ from the tokenizer's decoding."""
        text = {raw: raw.decode("utf-8", "replace") for raw in self._raw}
        self.info = {"vocab_entries": sum(map(len, self._raw.values())), "decode_mismatches": sum(
            tok.decode([i]) != text[raw] for raw, ids in self._raw.items() for i in ids if "\ufffd" not in text[raw])}

    def compile(self, schema: dict[str, Any]) -> Any:
        return self._oc.Index(self._oc.json_schema.build_regex_from_schema(json.dumps(schema)), self._vocab)

    matchers = lambda self, compiled, n: [self._oc.Guide(compiled) for _ in range(n)]
    def mask(self, guides: list[Any], bitmask: Any) -> None:
        base, words = bitmask.data_ptr(), bitmask.shape[1]
        for i, guide in enumerate(guides):
            guide.write_mask_into(base + 4 * words * i, words, 4)

    advance = staticmethod(lambda guide, token: guide.accepts_tokens([token]) and not guide.advance(token, False))
    accepting = staticmethod(lambda guide: bool(guide.is_finished()))


def walk(lib: Any, compiled: Any, tokens: list[int], n: int, vocab_size: int, steps: int = 0) -> dict[str, Any]:
    """n matchers walk `tokens`, matcher j starting j/n of the way in and restarting at the end, for
    max(steps, len(tokens)) steps; per step, the time to fill all n masks. Stops at the first token that
    the mask or the matcher refuses."""
    bitmask = torch.zeros((n, (vocab_size + 31) // 32), dtype=torch.int32)
    bits, ms, times, fail = bitmask.numpy(), lib.matchers(compiled, n), [], None
    pos = [j * len(tokens) // n for j in range(n)]
    for j, m in enumerate(ms):
        fail = next((p for p, t in enumerate(tokens[:pos[j]]) if not lib.advance(m, t)), fail)
    while fail is None and len(times) < max(steps, len(tokens)):
        t0 = time.perf_counter()
        lib.mask(ms, bitmask)
        times.append(time.perf_counter() - t0)
        for j, m in enumerate(ms):
            t = tokens[pos[j]]
            if not (int(bits[j, t >> 5]) >> (t & 31)) & 1 or not lib.advance(m, t):
                fail = pos[j]
                break
            pos[j] += 1
            if pos[j] == len(tokens):
                if not lib.accepting(m):
                    fail = pos[j]
                    break
                m.reset()
                pos[j] = 0
    us = [s * 1e6 for s in times]
    return {"accepted": fail is None, "refused_at_token": fail, "steps": len(us), "us_mean": sum(us) / max(len(us), 1),
            "us_p50": stats.percentile(us, 50), "us_p99": stats.percentile(us, 99)}


def compile_times(lib: Any, schema: dict[str, Any], args: argparse.Namespace, vocab_size: int) -> dict[str, Any]:
    """The schema (variant 0, kept for the walks), then variants, each to a first mask; ends past `args.budget` s."""
    bitmask, runs, first = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32), [], None
    for i in range(args.repeats):
        t0 = time.perf_counter()
        compiled = lib.compile(_variant(schema, i))
        t1 = time.perf_counter()
        lib.mask(lib.matchers(compiled, 1), bitmask)
        runs.append({"compile_ms": (t1 - t0) * 1e3, "to_first_mask_ms": (time.perf_counter() - t0) * 1e3})
        first = compiled if first is None else first
        if sum(r["to_first_mask_ms"] for r in runs) > args.budget * 1e3:
            break
    return {"compiled": first, "n": len(runs), "runs": runs,
            "to_first_mask_ms_median": stats.median(r["to_first_mask_ms"] for r in runs),
            "compile_ms_median": stats.median(r["compile_ms"] for r in runs)}


def measure(cls: Any, tok: Any, args: argparse.Namespace) -> dict[str, Any]:
    lib, vocab_size = cls(), len(tok)
    t0 = time.perf_counter()
    lib.build(tok)
    res: dict[str, Any] = {"version": importlib.metadata.version(cls.dist), "batched": cls.batched, "schemas": {},
                           "index_build_ms": (time.perf_counter() - t0) * 1e3}
    if hasattr(lib, "check"):
        lib.check(tok)
    res.update(lib.info)
    for name, (schema, instance) in CASES.items():
        tokens = tok.encode(_dumps(instance), add_special_tokens=False)
        try:
            comp = compile_times(lib, schema, args, vocab_size)
        except Exception as exc:  # a schema the library cannot compile is a result, not a crash
            res["schemas"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        compiled = comp.pop("compiled")
        walks = (("cold", 1, 0), ("one", 1, 1000), ("batch", BATCH, 1000))
        res["schemas"][name] = {"tokens": len(tokens), **comp,
                                **{k: walk(lib, compiled, tokens, n, vocab_size, steps) for k, n, steps in walks}}
        if name == "flat":
            bad = tok.encode(_dumps(OUT_OF_RANGE), add_special_tokens=False)
            res["refuses_age_121"] = not walk(lib, compiled, bad, 1, vocab_size)["accepted"]
    return res


def _row(lib: str, r: dict[str, Any], repeats: int) -> str:
    if "skipped" in r:
        return f"| {lib} | — | {r['skipped']} | | | | |"
    cell = lambda f: " · ".join("error" if "error" in x else f(x) for x in r["schemas"].values())
    refused = lambda x: [w["refused_at_token"] for w in (x["cold"], x["one"], x["batch"]) if not w["accepted"]]
    p50_p99 = lambda w: f"{w['us_p50']:.0f} / {w['us_p99']:.0f}"
    return " | ".join(["", lib, r["version"], f"{r['index_build_ms']:.0f}",
                       cell(lambda x: f"{x['to_first_mask_ms_median']:.1f}" + ("*" if x["n"] < repeats else "")),
                       cell(lambda x: p50_p99(x["one"])),
                       cell(lambda x: p50_p99(x["batch"])) + (" (batched)" if r["batched"] else " (serial)"),
                       cell(lambda x: f"no (token {refused(x)[0]})" if refused(x) else "yes"), ""]).strip()


def table(out: dict[str, Any]) -> str:
    lines = [f"JSON schemas, SmolLM2-135M-Instruct's tokenizer ({out['vocab_size']} ids); CPU {out['cpu']} x "
             f"{out['cpus']}; cells list {' · '.join(CASES)}",
             "| library | version | index build ms | compile ms per schema, to first mask (median) | mask µs per token "
             f"p50 / p99 (one matcher) | mask µs per step, {BATCH} matchers, p50 / p99 | output accepted |",
             "|---|---|---|---|---|---|---|"]
    lines += [_row(lib, r, out["repeats"]) for lib, r in out["libraries"].items()]
    if any(x.get("n", out["repeats"]) < out["repeats"] for r in out["libraries"].values()
           for x in r.get("schemas", {}).values()):
        lines.append(f"\\* fewer than {out['repeats']} compilations: they had taken over {out['budget']:.0f} s.")
    for lib, r in out["libraries"].items():
        if "refuses_age_121" in r:
            lines.append(f"{lib}: refuses age 121 under `flat` (maximum 120): {'yes' if r['refuses_age_121'] else 'NO'}"
                         + (f"; token byte strings that differ from the tokenizer's decoding: {r['decode_mismatches']} "
                            f"of {r['vocab_entries']}" if "decode_mismatches" in r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grammar_libs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--repeats", type=int, default=5, help="compilations per schema (equivalent variants)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds after which a schema's compilations stop")
    args = p.parse_args(argv)
    import jsonschema

    from tests.support.tiny_model import smollm2_tokenizer

    for schema, instance in CASES.values():
        jsonschema.validate(instance, schema)
    tok = smollm2_tokenizer()
    out: dict[str, Any] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "vocab_size": len(tok), "repeats": args.repeats,
                           "budget": args.budget, "libraries": {}}
    for cls, module in ((LLGuidance, "llguidance"), (OutlinesCore, "outlines_core")):
        found = importlib.util.find_spec(module) is not None
        out["libraries"][cls.dist] = measure(cls, tok, args) if found else \
            {"skipped": f"skipped: not importable (`.venv/bin/pip install {cls.dist}`)"}
    why = "installed, but this script has no xgrammar adapter" if importlib.util.find_spec("xgrammar") else \
        "not installed: pulls in triton (`pip install xgrammar`)"
    out["libraries"]["xgrammar"] = {"skipped": f"not measured: {why}"}
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
