from __future__ import annotations

import re

from hypothesis import given, strategies as st

from common.schemas import FinishReason
from worker.stopping import StoppingCriteria


def test_length_comes_first_even_for_eos():
    stop = StoppingCriteria(eos_token_id=2, max_new_tokens=2)
    assert stop(5, "a") == (False, None)
    assert stop(2, "</s>") == (True, FinishReason.LENGTH)


def test_eos_before_stop_strings():
    stop = StoppingCriteria(eos_token_id=2, max_new_tokens=10, stop=("x",))
    assert stop(2, "x") == (True, FinishReason.EOS_TOKEN)


def test_stop_sequence_is_a_suffix_of_the_accumulated_text():
    stop = StoppingCriteria(eos_token_id=None, max_new_tokens=10, stop=("lo w",))
    assert stop(1, "hel") == (False, None)
    assert stop(1, "lo") == (False, None)
    assert stop(1, " w") == (True, FinishReason.STOP_SEQUENCE)


def test_dollar_matches_before_a_final_newline():
    stop = StoppingCriteria(eos_token_id=None, max_new_tokens=10, stop=("end",))
    assert stop(1, "the end\n") == (True, FinishReason.STOP_SEQUENCE)
    other = StoppingCriteria(eos_token_id=None, max_new_tokens=10, stop=("end",))
    assert other(1, "the end\n\n") == (False, None)
    assert other(1, "x") == (False, None)


def test_empty_stop_string_matches_at_once():
    stop = StoppingCriteria(eos_token_id=None, max_new_tokens=10, stop=("",))
    assert stop(1, "") == (True, FinishReason.STOP_SEQUENCE)


def test_max_new_tokens_one_beats_empty_stop():
    stop = StoppingCriteria(eos_token_id=None, max_new_tokens=1, stop=("",))
    assert stop(1, "") == (True, FinishReason.LENGTH)


@given(pieces=st.lists(st.text(alphabet="ab\n", max_size=3), min_size=1, max_size=8),
       stops=st.lists(st.text(alphabet="ab\n", max_size=3), min_size=1, max_size=3))
def test_matches_tgi_regex_semantics(pieces, stops):
    """Reference: TGI 0.5's `re.findall(".*" + re.escape(s) + "$", output)` after each token."""
    stop = StoppingCriteria(eos_token_id=None, max_new_tokens=100, stop=tuple(stops))
    output = ""
    for piece in pieces:
        output += piece
        expected = any(re.findall(f".*{re.escape(s)}$", output) for s in stops)
        done, reason = stop(1, piece)
        assert done == expected
        if done:
            assert reason is FinishReason.STOP_SEQUENCE
            break
