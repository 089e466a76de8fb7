from __future__ import annotations

import pytest

from worker.detokenize import IncrementalDecoder, make_decoder


@pytest.fixture(scope="module")
def tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


def stream(tokenizer, prompt_ids, generated):
    decode = make_decoder(tokenizer)
    detok = IncrementalDecoder(decode, len(prompt_ids))
    ids = list(prompt_ids)
    texts = []
    for t in generated:
        ids.append(t)
        texts.append(detok.step(ids))
    return texts


@pytest.mark.parametrize("text", ["Hello world", "naïve café 東京 🎉🎉 end", "  spaced\n\nlines\t ok",
                                  "emoji 👩‍👩‍👧 family"])
def test_stream_concatenates_to_full_decode(tokenizer, text):
    prompt = tokenizer("Say:")["input_ids"]
    generated = tokenizer(text)["input_ids"]
    texts = stream(tokenizer, prompt, generated)
    assert "".join(texts) == tokenizer.decode(generated, skip_special_tokens=False)
    assert all("\ufffd" not in t for t in texts)


def test_multibyte_character_over_byte_tokens_is_emitted_once_whole(tokenizer):
    # Byte-level pieces: " 🎉" is 3 ids and 東京 is 4; no piece decodes to a whole character alone.
    generated = tokenizer(" 🎉")["input_ids"]
    assert len(generated) == 3
    assert stream(tokenizer, tokenizer("a")["input_ids"], generated) == ["", "", " 🎉"]
    generated = tokenizer("東京")["input_ids"]
    assert stream(tokenizer, tokenizer("a")["input_ids"], generated) == ["", "東", "", "京"]


def test_special_tokens_carry_their_literal_text(tokenizer):
    eos = tokenizer.eos_token_id
    texts = stream(tokenizer, tokenizer("hi")["input_ids"], [eos])
    assert texts == [tokenizer.eos_token]


def test_decoder_matches_tokenizer_decode(tokenizer):
    ids = tokenizer("The quick brown fox <|im_end|> ✓")["input_ids"]
    assert make_decoder(tokenizer)(ids) == tokenizer.decode(ids, skip_special_tokens=False)
