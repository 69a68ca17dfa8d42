"""Batched generation: batching does not change greedy output, sampling is seeded, prompts are not returned."""
from __future__ import annotations

import pytest
import torch

from cpwb.core.errors import InputError
from cpwb.engine.generate import generate, prompt_ids

PROMPTS = ["The weather today is", "Once upon a time, in a land far away, there lived a", "I think that", "Hello",
           "", "You are a"]


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    model, tokenizer = tiny_lm
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(c) == 1 and c[0] for c in batched)


def test_continuation_excludes_the_prompt(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    with torch.no_grad():
        full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    assert generate(model, tokenizer, [prompt], max_new_tokens=10) == [[expected]]
    assert not expected.startswith(prompt)


def test_seeded_sampling_is_reproducible(tiny_lm):
    model, tokenizer = tiny_lm
    kwargs = dict(max_new_tokens=6, do_sample=True, top_p=0.9, num_return_sequences=3, batch_size=2)
    first = generate(model, tokenizer, PROMPTS[:4], seed=1, **kwargs)
    assert first == generate(model, tokenizer, PROMPTS[:4], seed=1, **kwargs)
    assert first != generate(model, tokenizer, PROMPTS[:4], seed=2, **kwargs)
    assert [len(c) for c in first] == [3] * 4


def test_chat_prompt_holds_system_examples_and_generation_prompt(tiny_lm):
    model, tokenizer = tiny_lm
    ids = prompt_ids(tokenizer, "Name a fruit.", chat=True, system="Be brief.", examples=[("Name a color.", "Blue")])
    text = tokenizer.decode(ids)
    assert text.index("Be brief.") < text.index("Name a color.") < text.index("Blue") < text.index("Name a fruit.")
    assert text.endswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                       add_generation_prompt=True).split("x")[-1])
    side = tokenizer.padding_side
    model.train()
    out = generate(model, tokenizer, ["Name a fruit.", "Hi"], chat=True, max_new_tokens=4)
    assert len(out) == 2 and model.training and tokenizer.padding_side == side
    model.eval()


def test_peft_wrapped_model_generates_like_its_base(fresh_tiny_lm):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = fresh_tiny_lm
    base = generate(model, tokenizer, PROMPTS[:3], max_new_tokens=6)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert generate(wrapped, tokenizer, PROMPTS[:3], max_new_tokens=6) == base  # LoRA B starts at zero


def test_bad_arguments_are_refused(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(InputError):
        generate(model, tokenizer, "a single string")
    with pytest.raises(InputError):
        generate(model, tokenizer, PROMPTS, num_return_sequences=2)
    with pytest.raises(InputError):
        generate(model, tokenizer, PROMPTS, do_sample=True, top_p=0.0)
