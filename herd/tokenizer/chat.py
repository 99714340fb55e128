"""Chat formats: OpenAI-shaped messages → token ids, and a generated reply → a message.

SPEC §2: `<|begin_of_text|>`, then per message `<|start_header_id|>ROLE<|end_header_id|>\\n\\n`
content `<|eot_id|>`; roles system/user/assistant/ipython; `<|python_tag|>` starts a code
interpreter call and `<|eom_id|>` ends a message that waits for a tool result. Llama 4 renames the
tokens (`<|header_start|>`, `<|eot|>`, `<|eom|>`).

- `Llama3ChatFormat` / `Llama4ChatFormat` produce the ids of Meta's reference
  `llama_models.llama3.chat_format.ChatFormat.encode_dialog_prompt` (and llama4's) for the same
  dialog, with its default `ToolPromptFormat.json` for custom tool calls. Where a message has no
  `stop_reason`, an assistant turn that calls tools ends in eom (the model stops to wait for the
  result), any other turn in eot. With `tools=`, the system prompt announcing them is the one
  Meta's prompt templates build (Llama 3.1: "Environment: ipython", "Tools: ...", knowledge/today
  dates, custom tools as a JSON-function user message; Llama 4: the zero-shot python-list prompt).
- `TemplateChatFormat` renders a checkpoint's own jinja chat template the way transformers'
  `apply_chat_template` does, then encodes it with special tokens allowed; control tokens that
  message text spells stay text, as with `apply_chat_template(..., sanitize_control_tokens=True)`.

Messages: {"role": "system"|"user"|"assistant"|"tool"|"ipython", "content": str or a list of
{"type": "text", "text": ...} parts, "tool_calls": [{"type": "function", "function": {"name",
"arguments": dict or JSON string}}] on assistant turns}. "tool" is Llama's "ipython" role.
"""

from __future__ import annotations

import ast
import json
import math
import re
import uuid
from collections.abc import Sequence
from datetime import date, datetime
from functools import cache
from typing import Any

from herd.errors import HerdError
from herd.tokenizer.base import ChatFormat, Message, Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
SEARCH_TOOLS = BUILTIN_TOOLS[:3]  # the builtins called as `name.call(query="...")`
TOOL_PROMPT_FORMATS = ("json", "function_tag", "python_list")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


# ---- message validation ------------------------------------------------------------------------

def _text_parts(content: Any, where: str) -> list[str]:
    """Content as a list of text pieces (Meta's reference encodes each piece separately)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "text":
                # Not "unsupported content part 'text'": the part's type is fine, its text is not.
                got = type(part["text"]).__name__ if "text" in part else "no 'text'"
                raise HerdError(f"{where}: a text part must be {{'type': 'text', 'text': <string>}}, got {got}")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise HerdError(f"{where}: unsupported content part {kind!r} (only text parts are supported)")
        return parts
    raise HerdError(f"{where}: 'content' must be a string or a list of text parts, got {type(content).__name__}")


def _tool_call(call: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI-shaped tool call."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise HerdError(f"{where}: a tool call must look like {{'type': 'function', 'function': "
                        "{'name': ..., 'arguments': ...}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise HerdError(f"{where}: tool call {fn['name']!r} has arguments that are not valid JSON") from None
    if not isinstance(args, dict):
        raise HerdError(f"{where}: tool call {fn['name']!r} arguments must be a JSON object")
    try:  # a Python caller's dict may hold what no prompt format can write (a set, an object)
        json.dumps(args)
    except (TypeError, ValueError) as e:
        raise HerdError(f"{where}: tool call {fn['name']!r} arguments are not JSON values ({e})") from None
    return fn["name"], args


IMAGE_PART_TYPES = ("image", "image_url")  # herd's {"type": "image", "image": ...}; OpenAI's image_url
IMAGE_DETAILS = ("auto", "low", "high")  # OpenAI's image_url.detail: accepted, no effect on Llama 4's tiling


def _image_part(part: dict, where: str) -> None:
    if part["type"] == "image_url":
        url = part.get("image_url")
        if not isinstance(url, dict) or not isinstance(url.get("url"), str) or set(url) - {"url", "detail"}:
            raise HerdError(f"{where}: an image_url part must be {{'type': 'image_url', 'image_url': "
                            "{'url': 'data:image/...;base64,...'}}")
        if url.get("detail", "auto") not in IMAGE_DETAILS:
            raise HerdError(f"{where}: image_url.detail must be one of {', '.join(IMAGE_DETAILS)}")


def validate_messages(messages: Any, *, images: bool = False) -> list[Message]:
    """Check a dialog's shape; every problem is a one-line `HerdError` naming the message.
    images: also accept image content parts (`{"type": "image", ...}` or OpenAI's
    `{"type": "image_url", "image_url": {"url": ...}}`) in user messages; their data is the
    caller's to read (herd/models/image_processing.py, herd/inference/server.py)."""
    if not isinstance(messages, (list, tuple)):
        raise HerdError(f"a dialog must be a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise HerdError(f"{where}: must be a dict with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise HerdError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        calls = m.get("tool_calls") or []
        if not isinstance(calls, list):
            raise HerdError(f"{where}: 'tool_calls' must be a list")
        if calls and role != "assistant":
            raise HerdError(f"{where}: only assistant messages can have tool_calls")
        for call in calls:
            _tool_call(call, where)
        if m.get("content") is None:
            if not calls:
                raise HerdError(f"{where} ({role}): missing 'content'")
        elif images and isinstance(m["content"], list):
            text = []
            for part in m["content"]:
                if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                    if role != "user":
                        raise HerdError(f"{where} ({role}): images go in user messages")
                    _image_part(part, where)
                else:
                    text.append(part)
            _text_parts(text, where)
        else:
            _text_parts(m["content"], where)
        stop = m.get("stop_reason")
        if stop is not None and stop not in STOP_REASONS:
            raise HerdError(f"{where}: unknown stop_reason {stop!r}; expected one of {', '.join(STOP_REASONS)}")
    return list(messages)


# ---- tools: definitions and calls ---------------------------------------------------------------

def _tool_definitions(tools: Sequence[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Split `tools` into builtin names and custom function definitions {name, description,
    parameters: {name: {type, description, required, default}}}. A tool is a builtin name
    ("brave_search"), or an OpenAI entry {"type": "function", "function": {"name", "description",
    "parameters": JSON schema}} (a function named like a builtin counts as that builtin)."""
    if not isinstance(tools, (list, tuple)):
        raise HerdError(f"tools must be a list, got {type(tools).__name__}")
    builtin, custom = [], []
    for i, tool in enumerate(tools):
        if isinstance(tool, str):
            fn: dict[str, Any] = {"name": tool}
        elif isinstance(tool, dict):
            kind = tool.get("type", "function")
            if kind != "function" and kind not in BUILTIN_TOOLS:  # not read as a function of that name
                raise HerdError(f"tool {i}: unknown tool type {kind!r}; expected 'function' or a builtin tool "
                                f"({', '.join(BUILTIN_TOOLS)})")
            fn = tool.get("function", tool) if kind == "function" else {"name": kind}
        else:
            fn = {}
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise HerdError(f"tool {i}: expected a builtin tool name or {{'type': 'function', 'function': {{'name': ...}}}}")
        if name in BUILTIN_TOOLS:
            builtin.append(name)
            continue
        if isinstance(tool, str):
            raise HerdError(f"tool {i}: {name!r} is not a builtin tool ({', '.join(BUILTIN_TOOLS)}); "
                            "describe custom tools as {'type': 'function', 'function': {...}}")
        params = _tool_parameters(fn.get("parameters"), f"tool {i} ({name})")
        custom.append({"name": name, "description": fn.get("description"), "parameters": params})
    return builtin, custom


def _tool_parameters(schema: Any, where: str) -> dict[str, dict[str, Any]]:
    """A function's JSON-schema `parameters` as {name: {type, description, required, default}};
    a schema of the wrong shape is a HerdError naming the tool, not an AttributeError."""
    if not schema:  # absent, null or empty: no parameters
        return {}
    if not isinstance(schema, dict):
        raise HerdError(f"{where}: 'parameters' must be a JSON schema object, got {type(schema).__name__}")
    props = schema.get("properties") or {}
    if not isinstance(props, dict) or not all(isinstance(spec, dict) for spec in props.values()):
        raise HerdError(f"{where}: 'parameters.properties' must map each parameter name to a JSON schema object")
    required = schema.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise HerdError(f"{where}: 'parameters.required' must be a list of parameter names")
    return {p: {"type": spec.get("type"), "description": spec.get("description"),
                "required": p in required, "default": spec.get("default")} for p, spec in props.items()}


def _jinja_str(value: Any) -> str:
    # Meta's templates interpolate values with jinja's `{{ }}`, which prints None as "None".
    return str(value)


def _python_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return f"[{', '.join(_python_value(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k}={_python_value(v)}' for k, v in value.items())}}}"
    return str(value)


def encode_tool_call(name: str, args: dict[str, Any], fmt: str = "json") -> str:
    """The text of one assistant tool call, as llama-models' `ToolUtils.encode_tool_call` writes it."""
    if name in SEARCH_TOOLS:
        if "query" not in args:
            raise HerdError(f"builtin tool call {name!r} needs a 'query' argument")
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        if "code" not in args:
            raise HerdError("builtin tool call 'code_interpreter' needs a 'code' argument")
        return str(args["code"])
    if fmt == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if fmt == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if fmt == "python_list":
        return f"[{name}({', '.join(f'{k}={_python_value(v)}' for k, v in args.items())})]"
    raise HerdError(f"unknown tool prompt format {fmt!r}; expected one of {', '.join(TOOL_PROMPT_FORMATS)}")


_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^}]+)>(?P<args>{.*?})")


def parse_tool_calls(text: str, ipython: bool) -> list[tuple[str, dict[str, Any]]]:
    """Tool calls in a generated reply, tried in llama-models' order: `<function=name>{...}`, a JSON
    `{"name", "parameters"}` object, a python list `[f(a=1), ...]`, a builtin `tool.call(query="...")`;
    after `<|python_tag|>` anything else is code for the interpreter."""
    calls = _custom_tool_calls(text)
    if calls:
        # A search builtin written as a custom call: its one argument is the query, whatever the
        # model named it, as llama-models' decode_assistant_message maps it (else the call could
        # not be sent back in the next request: `encode_tool_call` needs the query).
        return [(n, {"query": a["query"] if "query" in a else next(iter(a.values()))})
                if n in SEARCH_TOOLS and a else (n, a) for n, a in calls]
    m = _BUILTIN_CALL.search(text)
    if m:
        return [(m.group("name"), {"query": m.group("query")})]
    if ipython:
        return [("code_interpreter", {"code": text})]
    return []


def _custom_tool_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    m = _FUNCTION_TAG.search(text)
    if m:
        try:
            args = json.loads(m.group("args").replace("'", '"'))
            return [(m.group("name"), args if isinstance(args, dict) else {})]
        except (json.JSONDecodeError, RecursionError):
            pass
    stripped = text.strip()
    try:
        obj = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"]:
        args = obj.get("parameters", obj.get("arguments", {}))
        return [(obj["name"], args if isinstance(args, dict) else {})]
    return _python_list_calls(stripped)


def _python_list_calls(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`[f(a=1), g(b="x")]`: calls with keyword arguments whose values are JSON values written as
    Python literals. Anything else (a positional or `**` argument, a name, a complex number, a
    dict with non-string keys) is not a call and the text stays the reply's content, rather than
    arguments that no JSON (the OpenAI response, the next request) can carry."""
    if not (text.startswith("[") and text.endswith("]")):
        return []
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL in the text
        return []
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return []
    calls = []
    for node in tree.body.elts:
        if (not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args
                or any(kw.arg is None for kw in node.keywords)):
            return []
        try:
            args = {kw.arg: _json_value(ast.literal_eval(kw.value)) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            # what literal_eval refuses (a name), or builds and then fails on ({[]: 1}: TypeError)
            return []
        calls.append((node.func.id, args))
    return calls


def _json_value(value: Any) -> Any:
    """A Python literal as the JSON value it spells (a tuple as a list); ValueError if none
    (UnicodeDecodeError is one)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):  # a set as the list llama-models' pydantic makes it
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):  # b"x" as "x", as there too
        return value.decode("utf-8")
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v) for k, v in value.items()}
    raise ValueError(f"not a JSON value: {type(value).__name__}")


def _json_list(items: list[str]) -> str:
    return json.dumps(items)  # jinja's `tojson` of a list of plain names gives the same text


def builtin_tools_lines(builtin: list[str], has_custom: bool) -> str:
    """"Environment: ipython" and "Tools: ..." as Meta's `BuiltinToolGenerator` template renders them
    (its trailing newline is kept only when there is no Tools line)."""
    search = [t for t in builtin if t != "code_interpreter"]  # code_interpreter is implied by ipython
    head = "Environment: ipython\n" if (builtin or has_custom) else ""
    if search:
        head += "Tools: " + ", ".join(search)
    return head


def llama31_tools_system_prompt(builtin: list[str], has_custom: bool, today: date, system: str | None) -> str:
    """Llama 3.1's tool system prompt: the tool lines, the knowledge / today dates, then the caller's
    system prompt. Meta's sources differ by a newline here and there (llama-stack's code, the HF
    template, the docs); we follow the prompt_format.md files that llama-models ships
    (llama3_1/prompt_format.md, llama3_2/text_prompt_format.md), which the tests check."""
    text = (builtin_tools_lines(builtin, has_custom)
            + f"\nCutting Knowledge Date: December 2023\nToday Date: {today.strftime('%d %B %Y')}\n")
    if system is not None:
        text += "\n" + system + "\n"
    return text


def llama31_custom_tools_prompt(custom: list[dict[str, Any]]) -> str:
    """The user message that lists custom tools in Llama 3.1's JSON format (Meta's
    `JsonCustomToolGenerator`; "Zero shot tool calling / JSON based tool calling" in prompt_format.md)."""
    out = ["Answer the user's question by making use of the following functions if needed.\n"
           "If none of the function can be used, please say so.\n"
           "Here is a list of functions in JSON format:\n"]
    for t in custom:
        params = t["parameters"]
        required = [p for p, spec in params.items() if spec["required"]]
        props = ",".join(
            f'\n                {{\n                    "{p}": {{\n                        "type": "object",\n'
            f'                        "description": "{_jinja_str(spec["description"])}"\n'
            f"                    }}\n                }}"
            for p, spec in params.items())
        out.append(
            f'{{\n    "type": "function",\n    "function": {{\n        "name": "{t["name"]}",\n'
            f'        "description": "{_jinja_str(t["description"])}",\n        "parameters": {{\n'
            f'            "type": "object",\n            "properties": [{props}\n            ],\n'
            f'            "required": {_json_list(required)}\n        }}\n    }}\n}}\n')
    out.append("\nReturn function calls in JSON format.")
    return "".join(out)


LLAMA4_TOOLS_PREAMBLE = """\
You are a helpful assistant and an expert in function composition. You can answer general questions \
using your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or \
"I don't have access to [Unavailable service] information"
- If a function is not in the list, respond ONLY with internal knowledge or \
"I don't have access to [Unavailable service] information"
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: \
output ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]
Examples:
CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] \
<- Only if get_weather and calculate_route are in function list
INCORRECT: get_weather(location="New York")
INCORRECT: Let me check the weather: [get_weather(location="New York")]
INCORRECT: [get_events(location="Singapore")] <- If function not in list

2. RESPONSE RULES:
- For pure function requests matching a listed function: ONLY output the function call(s)
- For knowledge questions: ONLY output text
- For missing parameters: ONLY request the specific missing parameters
- For unavailable services (not in function list): output ONLY with internal knowledge or \
"I don't have access to [Unavailable service] information". Do NOT execute a function call.
- If the query asks for information beyond what a listed function provides: output ONLY with \
internal knowledge about your limitations
- NEVER combine text and function calls in the same response
- NEVER suggest alternative functions when the requested service is unavailable
- NEVER create or invent new functions not listed below

3. STRICT BOUNDARIES:
- ONLY use functions from the list below - no exceptions
- NEVER use a function as an alternative to unavailable information
- NEVER call functions not present in the function list
- NEVER add explanatory text to function calls
- NEVER respond with empty brackets
- Use proper Python/JSON syntax for function calls
- Check the function list carefully before responding

4. TOOL RESPONSE HANDLING:
- When receiving tool responses: provide concise, natural language responses
- Don't repeat tool response verbatim
- Don't add supplementary information


"""


def llama4_custom_tools_prompt(custom: list[dict[str, Any]]) -> str:
    """Llama 4's zero-shot function-calling system prompt (llama-stack's Llama 4
    `PythonListCustomToolGenerator`; "Zero shot function calling - system message" in Llama 4's
    prompt_format.md)."""
    blocks = []
    for t in custom:
        params = t["parameters"]
        required = [p for p, spec in params.items() if spec["required"]]
        props = ",".join(
            f'\n                "{p}": {{\n                    "type": "{_jinja_str(spec["type"])}",\n'
            f'                    "description": "{_jinja_str(spec["description"])}"'
            + (f',\n                    "default": "{_jinja_str(spec["default"])}"' if spec["default"] else "")
            + "\n                }"
            for p, spec in params.items())
        blocks.append(
            f'{{\n        "name": "{t["name"]}",\n        "description": "{_jinja_str(t["description"])}",\n'
            f'        "parameters": {{\n            "type": "dict",\n            "required": {_json_list(required)},\n'
            f'            "properties": {{{props}\n            }}\n        }}\n    }}')
    listing = "[\n    " + ",\n    ".join(blocks) + "\n]"
    return (LLAMA4_TOOLS_PREAMBLE + "Here is a list of functions in JSON format that you can invoke.\n\n" + listing
            + "\n\nYou can answer general questions or invoke tools when necessary.\n"
              "In addition to tool calls, you should also augment your responses by using the tool outputs.")


def _system_text(message: Message) -> str:
    return "\n".join(_text_parts(message["content"], "system message"))


# ---- Meta's formats -----------------------------------------------------------------------------

class _MetaChatFormat(ChatFormat):
    """What Llama 3 and Llama 4 share; subclasses name the tokens and the eom rule."""

    header_start: str
    header_end: str
    eot: str
    eom: str
    python_start: str
    python_end: str | None = None

    def __init__(self, tokenizer: Tokenizer, *, tool_prompt_format: str = "json", today: date | None = None):
        if tool_prompt_format not in TOOL_PROMPT_FORMATS:
            raise HerdError(f"unknown tool prompt format {tool_prompt_format!r}; expected one of "
                            f"{', '.join(TOOL_PROMPT_FORMATS)}")
        self.tokenizer = tokenizer
        self.tool_prompt_format = tool_prompt_format
        self.today = today  # the "Today Date" of the Llama 3.1 tool prompt; None means today
        ids = {}
        for name in (self.header_start, self.header_end, self.eot, self.eom, self.python_start):
            i = tokenizer.token_to_id(name)
            if i is None or name not in tokenizer.special_tokens:
                raise HerdError(f"{type(self).__name__} needs the special token {name} that this tokenizer lacks")
            ids[name] = i
        self._ids = ids
        self.bos_id = tokenizer.bos_id
        self._headers: dict[str, list[int]] = {}

    def header(self, role: str) -> list[int]:
        """`<|start_header_id|>role<|end_header_id|>\\n\\n`; role text and "\\n\\n" encoded apart, as
        the reference does."""
        role = "ipython" if role == "tool" else role
        if role not in self._headers:
            self._headers[role] = ([self._ids[self.header_start]] + self.tokenizer.encode(role)
                                   + [self._ids[self.header_end]] + self.tokenizer.encode("\n\n"))
        return self._headers[role]

    def _ends_with_eom(self, message: Message, has_calls: bool) -> bool:
        raise NotImplementedError

    def _python_tag_first(self, calls: list[tuple[str, dict]]) -> bool:
        return False

    def encode_message(self, message: Message) -> list[int]:
        role = message["role"]
        ids = list(self.header(role))
        calls = [_tool_call(c, "tool call") for c in message.get("tool_calls") or []] if role == "assistant" else []
        if calls and self._python_tag_first(calls):
            ids.append(self._ids[self.python_start])
        if message.get("content") is not None:
            for part in _text_parts(message["content"], f"{role} message"):
                ids.extend(self.tokenizer.encode(part))
        for name, args in calls:
            ids.extend(self.tokenizer.encode(encode_tool_call(name, args, self.tool_prompt_format)))
        ids.append(self._ids[self.eom if self._ends_with_eom(message, bool(calls)) else self.eot])
        return ids

    def _with_tool_prompts(self, messages: list[Message], tools: Sequence[Any]) -> list[Message]:
        raise NotImplementedError

    def encode_dialog(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                      tools: Sequence[Any] | None = None) -> list[int]:
        messages = validate_messages(messages)
        for i, m in enumerate(messages):  # a builtin call without its query / code: name the message
            for call in (m.get("tool_calls") or []) if m["role"] == "assistant" else []:
                try:
                    encode_tool_call(*_tool_call(call, f"message {i}"), self.tool_prompt_format)
                except HerdError as e:
                    raise HerdError(f"message {i}: {e}") from None
        if tools:
            messages = self._with_tool_prompts(messages, tools)
        ids = [] if self.bos_id is None else [self.bos_id]
        for m in messages:
            ids.extend(self.encode_message(m))
        if add_generation_prompt:
            ids.extend(self.header("assistant"))
        return ids

    def decode_assistant(self, ids: Sequence[int]) -> Message:
        ids = list(ids)
        stop_reason = "out_of_tokens"
        # <|end_of_text|> (a base model's stop) also ends the turn; the reference would leave its
        # text in the content.
        if ids and ids[-1] in (self._ids[self.eot], self.tokenizer.eos_id):
            stop_reason, ids = "end_of_turn", ids[:-1]
        elif ids and ids[-1] == self._ids[self.eom]:
            stop_reason, ids = "end_of_message", ids[:-1]
        text = self.tokenizer.decode(ids)
        # The reference strips spaces off the decoded reply while its stop token is still on it:
        # leading spaces go, trailing ones only where no stop token ended the reply.
        text = text.strip(" ") if stop_reason == "out_of_tokens" else text.lstrip(" ")
        header = self.tokenizer.decode(self.header("assistant"))
        if text.startswith(header):
            text = text[len(header):]
        ipython = text.startswith(self.python_start)
        if ipython:
            text = text[len(self.python_start):]
            if self.python_end:  # Llama 4 closes a tool call it opened; elsewhere the token stays
                text = text.replace(self.python_end, "")
        message: Message = {"role": "assistant", "content": text, "stop_reason": stop_reason}
        calls = parse_tool_calls(text, ipython)
        if calls:
            message["content"] = ""
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                      "function": {"name": n, "arguments": a}} for n, a in calls]
        return message


class Llama3ChatFormat(_MetaChatFormat):
    """Llama 3.x dialogs (llama_models.llama3.chat_format.ChatFormat, text only)."""

    header_start, header_end = "<|start_header_id|>", "<|end_header_id|>"
    eot, eom, python_start = "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"

    def _python_tag_first(self, calls):
        # The reference emits <|python_tag|> only when the first call is the code interpreter.
        return calls[0][0] == "code_interpreter"

    def _ends_with_eom(self, message, has_calls):
        if message["role"] != "assistant":
            return False
        stop = message.get("stop_reason")
        return stop == "end_of_message" or (stop is None and has_calls)

    def _with_tool_prompts(self, messages, tools):
        # As llama-stack's `augment_messages_for_tools_llama_3_1`: one system message (tool lines,
        # dates, the caller's system prompt); custom tools in a user message right after it.
        builtin, custom = _tool_definitions(tools)
        rest = list(messages)
        system = _system_text(rest.pop(0)) if rest and rest[0]["role"] == "system" else None
        text = llama31_tools_system_prompt(builtin, bool(custom), self.today or datetime.now().date(), system)
        out: list[Message] = [{"role": "system", "content": text}]
        if custom:
            out.append({"role": "user", "content": llama31_custom_tools_prompt(custom)})
        return out + rest


class Llama4ChatFormat(_MetaChatFormat):
    """Llama 4 dialogs (llama_models.llama4.chat_format.ChatFormat, text only)."""

    header_start, header_end = "<|header_start|>", "<|header_end|>"
    eot, eom, python_start, python_end = "<|eot|>", "<|eom|>", "<|python_start|>", "<|python_end|>"

    def _ends_with_eom(self, message, has_calls):
        # The reference: assistant turns with tool calls or stop_reason eom, and every tool result.
        if message["role"] in ("tool", "ipython"):
            return True
        if message["role"] != "assistant":
            return False
        return has_calls or message.get("stop_reason") == "end_of_message"

    def _with_tool_prompts(self, messages, tools):
        # llama-stack's `augment_messages_for_tools_llama` for Llama 4: builtin tool lines, then the
        # python-list function prompt, then the caller's system prompt, in one system message.
        builtin, custom = _tool_definitions(tools)
        rest = list(messages)
        system = _system_text(rest.pop(0)) if rest and rest[0]["role"] == "system" else None
        text = ""
        if builtin:
            text += builtin_tools_lines(builtin, False) + "\n"
        if custom:
            text += llama4_custom_tools_prompt(custom) + "\n"
        if system is not None:
            text += system
        return [{"role": "system", "content": text.strip("\n")}] + rest


# ---- checkpoint templates -----------------------------------------------------------------------

class TemplateChatFormat(ChatFormat):
    """A checkpoint's jinja chat template (GGUF `tokenizer.chat_template`, HF `chat_template`),
    rendered as transformers' `apply_chat_template` renders it and encoded with special tokens
    allowed and no BOS added (the template writes its own).

    Text in the dialog never forges a control token (DESIGN principle 5, as in Llama3ChatFormat):
    where a message (or a tool definition) spells one ("<|im_end|>" in a reply), the ids are those of
    transformers' `apply_chat_template(..., sanitize_control_tokens=True)` — the spelled token is
    encoded as plain text and only the template's own control tokens are tokens. Otherwise they are
    exactly `apply_chat_template(...)`'s."""

    def __init__(self, tokenizer: Tokenizer, template: str):
        self.tokenizer = tokenizer
        self.template_source = template
        self.template = _compile_template(template)
        names = {i: n for n, i in tokenizer.special_tokens.items()}
        self._token_vars = {}
        for var, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                       ("pad_token", tokenizer.pad_id), ("unk_token", getattr(tokenizer, "unk_id", None))):
            if i is not None:
                name = names.get(i)
                if name is None and hasattr(tokenizer, "id_to_name"):
                    name = tokenizer.id_to_name(i)
                if name is not None:
                    self._token_vars[var] = name
        # transformers' `_get_control_tokens`: every special token, and the other added tokens the
        # template itself writes (in its text or string literals), whitespace tokens excepted.
        added = _added_token_names(tokenizer)
        literal = _template_literal_text(template)
        control = {n for n in tokenizer.special_tokens if n}
        control |= {n for n in added if n in literal and not n.isspace()}
        self._control_re = _alternation(control)
        self._markers_re = re.compile(f"{_MARK_START}({_alternation(control | added).pattern}){_MARK_END}"
                                      f"|[{_MARK_START}{_MARK_END}]")

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               tools: Sequence[Any] | None = None) -> str:
        messages = [self._for_template(m, i) for i, m in enumerate(validate_messages(messages))]
        from jinja2.exceptions import TemplateError

        try:
            # tools as given: transformers passes an empty list on, and `tools is not none` tells.
            return self.template.render(messages=messages, tools=None if tools is None else list(tools),
                                        documents=None, add_generation_prompt=add_generation_prompt,
                                        **self._token_vars)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # A template that cannot handle this dialog (its raise_exception, or e.g. list content
            # where it concatenates strings) is a problem with the input, not a herd bug.
            raise HerdError(f"chat template cannot render this dialog: {type(e).__name__}: {e}") from None

    def _for_template(self, m: Message, i: int) -> Message:
        """What OpenAI clients send, in the shape most templates render: a list of text parts as
        one string (joined as Llama3ChatFormat encodes them, piece after piece); keys whose value is
        None dropped, as transformers drops them (an assistant turn of tool calls alone has no
        content). A template that knows nothing of tool calls would drop them without a word:
        refused. Tool calls as vLLM hands them to the template (chat_utils' `_postprocess_messages`):
        a JSON-string `arguments` parsed into the object it spells, as chat templates expect them
        (`arguments | tojson`, `arguments['query']`), and an empty `tool_calls` list dropped."""
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, str) or p.get("type") == "text" for p in content):
            m = {**m, "content": "".join(_text_parts(content, f"message {i}"))}
        if m.get("tool_calls") and "tool_calls" not in self.template_source:
            raise HerdError(f"message {i}: this model's chat template has no tool calls")
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_with_parsed_arguments(c, f"message {i}") for c in m["tool_calls"]]}
        elif m.get("tool_calls") == []:
            m = {k: v for k, v in m.items() if k != "tool_calls"}
        return {k: v for k, v in m.items() if v is not None}

    def encode_dialog(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                      tools: Sequence[Any] | None = None) -> list[int]:
        # Arguments parsed (`_for_template`) before any control token in them is marked, as vLLM
        # parses them before transformers marks the values.
        messages = [self._for_template(m, i) for i, m in enumerate(validate_messages(messages))]
        if not self._spells_control_token([messages, tools]):
            text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            return self.tokenizer.encode(text, allow_special=True)  # as transformers encodes it
        # transformers' `mark_control_tokens` + `encode_marked_chat`: wrap each spelled control token
        # in private-use markers, render, then encode the marked tokens as plain text and the text
        # between them (the template's own control tokens included) as usual.
        marked = _mark_control_tokens(list(messages), self._control_re)
        marked_tools = _mark_control_tokens(tools, self._control_re)
        text = self.render(marked, add_generation_prompt=add_generation_prompt, tools=marked_tools)
        pieces = self._markers_re.split(text)  # [text, token or None, text, token or None, ..., text]
        newline = self.tokenizer.encode("\n", allow_special=True)
        ids = self.tokenizer.encode(pieces[0], allow_special=True)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:  # an empty text, or a lone marker (the template split a marked token)
                continue
            as_text = i % 2 == 1
            # Encoded after a newline and the newline's ids taken off again, as transformers'
            # `_encode_chat_piece` does (a trick for SentencePiece; byte-level BPE can differ by it).
            piece_ids = self.tokenizer.encode("\n" + piece, allow_special=not as_text)
            if piece_ids[:len(newline)] == newline:
                piece_ids = piece_ids[len(newline):]
            else:
                piece_ids = self.tokenizer.encode(piece, allow_special=not as_text)
            if as_text and self.tokenizer.token_to_id(piece) in piece_ids:
                raise HerdError(f"cannot keep {piece!r} in a message as text: this tokenizer makes it from plain text")
            ids += piece_ids
        return ids

    def _spells_control_token(self, obj: Any) -> bool:
        if isinstance(obj, str):
            return self._control_re.search(obj) is not None
        if isinstance(obj, dict):
            return any(self._spells_control_token(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return any(self._spells_control_token(v) for v in obj)
        return False

    def decode_assistant(self, ids: Sequence[int]) -> Message:
        ids = list(ids)
        stop_reason = "out_of_tokens"
        if ids and ids[-1] in self.tokenizer.stop_ids:
            stop_reason, ids = "end_of_turn", ids[:-1]
        text = self.tokenizer.decode(ids)
        message: Message = {"role": "assistant", "content": text, "stop_reason": stop_reason}
        # Hermes/ChatML style: a reply of one or more <tool_call>{...}</tool_call> blocks (vLLM's
        # hermes parser reads each block as a call); otherwise a bare JSON object or python list.
        pieces = re.split(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
        calls: list[tuple[str, dict[str, Any]]] = []
        if len(pieces) > 1 and not "".join(pieces[::2]).strip():
            for body in pieces[1::2]:
                found = parse_tool_calls(body.strip(), False)
                if not found:  # a block that is not a call: the reply is text
                    calls = []
                    break
                calls += found
        elif text.lstrip().startswith(("{", "[")):
            calls = parse_tool_calls(text.strip(), False)
        if calls:
            message["content"] = ""
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                      "function": {"name": n, "arguments": a}} for n, a in calls]
        return message


def _with_parsed_arguments(call: dict, where: str) -> dict:
    """A validated tool call with its `arguments` as a dict (a JSON string parsed)."""
    args = _tool_call(call, where)[1]
    if "function" in call:
        return {**call, "function": {**call["function"], "arguments": args}}
    return {**call, "arguments": args}


# transformers' private-use markers around control tokens spelled by the user
# (transformers.utils.chat_template_utils._CONTROL_TOKEN_START / _END).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def _alternation(tokens: set[str]) -> re.Pattern:
    # Longest first, so a token wins over the tokens it contains; "(?!)" never matches.
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")


def _mark_control_tokens(obj: Any, control_re: re.Pattern) -> Any:
    """transformers' `mark_control_tokens`: every string value (not dict keys) with markers it already
    held removed and each control token wrapped in markers."""
    if isinstance(obj, str):
        obj = obj.replace(_MARK_START, "").replace(_MARK_END, "")
        return control_re.sub(f"{_MARK_START}\\g<0>{_MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark_control_tokens(v, control_re) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark_control_tokens(v, control_re) for v in obj]
    return obj


def _added_token_names(tokenizer: Tokenizer) -> set[str]:
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return set(tokenizer.special_tokens)
    return {t.content for t in backend.get_added_tokens_decoder().values()}


@cache
def _template_literal_text(source: str) -> str:
    """transformers' `_get_template_literal_text`: the template's text and string constants, joined
    with NULs so no token is found across two of them."""
    from jinja2 import nodes

    ast = _compile_template(source).environment.parse(source)
    literals = {n.data for n in ast.find_all(nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)}
    return "\0".join(literals)


def _content_texts(message: Message) -> list[str]:
    """The text a message carries: its string content, or the text of its content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


@cache
def _compile_template(source: str):
    # Mirrors transformers' `_compile_jinja_template`: sandboxed, trim_blocks + lstrip_blocks, loop
    # controls, `raise_exception`, a `tojson` that keeps non-ASCII and key order, `strftime_now`.
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise HerdError(f"chat template does not compile: {e}") from None


# A jinja rendering of Llama3ChatFormat / Llama4ChatFormat (without the `tools=` system prompts),
# written into exported HF / GGUF files so other runtimes format dialogs the same way. Two limits of
# a template, which renders one string that is then encoded whole: list content parts are joined
# before encoding (the reference encodes each part alone, which can split a BPE merge at the seam),
# and builtin tool calls need their arguments as a dict (jinja cannot parse a JSON string).
_META_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] %}
{%- set calls = message['tool_calls'] if role == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] else [] %}
{{- '@HS@' + role + '@HE@\\n\\n' }}
{%- if @PYTAG@ and calls and calls[0]['function']['name'] == 'code_interpreter' %}{{- '@PY@' }}{%- endif %}
{%- if message['content'] is string %}{{- message['content'] }}
{%- elif message['content'] %}{%- for part in message['content'] %}{{- part if part is string else part['text'] }}{%- endfor %}
{%- endif %}
{%- for call in calls %}
{%- set f = call['function'] %}
{%- if f['name'] in ['brave_search', 'wolfram_alpha', 'photogen'] %}{{- f['name'] + '.call(query="' + f['arguments']['query'] + '")' }}
{%- elif f['name'] == 'code_interpreter' %}{{- f['arguments']['code'] }}
{%- else %}{{- '{"type": "function", "name": ' + (f['name'] | tojson) + ', "parameters": ' + (f['arguments'] if f['arguments'] is string else f['arguments'] | tojson) + '}' }}
{%- endif %}
{%- endfor %}
{%- set stop = message['stop_reason'] if message['stop_reason'] is defined else none %}
{%- if @EOM_RULE@ %}{{- '@EOM@' }}{%- else %}{{- '@EOT@' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '@HS@assistant@HE@\\n\\n' }}{%- endif %}
"""

_EOM_RULES = {
    "llama3": "role == 'assistant' and (stop == 'end_of_message' or (stop is none and calls))",
    "llama4": "role == 'ipython' or (role == 'assistant' and (calls or stop == 'end_of_message'))",
}


def meta_chat_template(flavor: str) -> str:
    """The jinja chat template equivalent to `Llama3ChatFormat` / `Llama4ChatFormat` for dialogs
    (tool calls included; the `tools=` system prompts are not part of it)."""
    fmt = {"llama3": Llama3ChatFormat, "llama4": Llama4ChatFormat}[flavor]
    subs = {"@HS@": fmt.header_start, "@HE@": fmt.header_end, "@EOT@": fmt.eot, "@EOM@": fmt.eom,
            "@PY@": fmt.python_start, "@PYTAG@": "true" if flavor == "llama3" else "false",
            "@EOM_RULE@": _EOM_RULES[flavor]}
    out = _META_TEMPLATE
    for k, v in subs.items():
        out = out.replace(k, v)
    return out
