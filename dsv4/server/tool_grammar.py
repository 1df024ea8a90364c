"""The grammar of a DSML tool-call block, for ``tool_choice`` ``required`` and named.

Those choices open the block in the prompt (``serving_chat.forced_prefix``); this grammar holds
what the model writes next to well-formed calls of the offered functions, in the layout
``chat._tool_calls_dsml`` encodes and ``chat.parse_completion`` reads back: each parameter one
of the function's properties, ``string="true"`` with free text (or one of its ``enum``) for
string properties, ``string="false"`` with JSON fitting the property's schema for the rest.
Properties come in the schema's order, each at most once (the parser refuses duplicates) and
the ``required`` ones always. The DSML markers are special tokens,
written ``<[id]>`` in llguidance's Lark.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from dsv4.chat import DSML, INVOKE_END, PARAMETER_END, TOOL_CALLS_END, TOOL_CALLS_START

logger = logging.getLogger(__name__)


STRING_OPEN, JSON_OPEN = ' string="true">', ' string="false">'
# JSON values as `chat._json` writes them (json.dumps' separators, no other whitespace): a
# free run of blanks lets a model loop on them
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def tool_call_grammar(tools: list[dict[str, Any]], token_id, named: str | None = None,
                      single: bool = False, auto: bool = False) -> str | None:
    """Lark for the rest of a tool-call block after its forced opening: any number of calls
    (one if `single`), or with `named`, the rest of that function's call; with `auto` (strict
    function tools under `tool_choice` auto), a whole answer: free text, then optionally the
    block, opened as the encoder opens it. `tools`: OpenAI function tools; `token_id(text)`:
    the id of a special token (None: the tokenizer lacks the DSML markers: no grammar)."""
    markers = (DSML, INVOKE_END, PARAMETER_END, TOOL_CALLS_END, TOOL_CALLS_START)
    ids = {m: token_id(m) for m in markers}
    if any(v is None for v in ids.values()):
        return None
    dsml, invoke_end, param_end, calls_end, calls_start = (f"<[{ids[m]}]>" for m in markers)
    rules, invokes = [], []
    for k, tool in enumerate(tools):
        fn = tool["function"]
        params = []
        decl = fn.get("parameters") or {}
        required = set(decl.get("required") or [])
        # a property's "$ref"s point into the parameters' definitions: carry them along
        defs = {k: decl[k] for k in ("$defs", "definitions") if isinstance(decl.get(k), dict)}
        for pname, schema in (decl.get("properties") or {}).items():
            schema = {**schema, **defs} if isinstance(schema, dict) else {}
            head = '"<" ' + dsml + " " + _lit("parameter name=" + json.dumps(pname,
                                                                            ensure_ascii=False))
            if schema.get("type") == "string":
                enum = [v for v in schema.get("enum") or [] if isinstance(v, str)]
                value = " | ".join(_lit(v) for v in enum) if enum else "STRING"
                param = f"{head} {_lit(STRING_OPEN)} ({value}) {param_end}"
            else:
                layout = {**schema, "x-guidance": JSON_LAYOUT}  # as the encoder writes JSON
                param = (f"{head} {_lit(JSON_OPEN)} %json "
                         f"{json.dumps(layout, ensure_ascii=False)} {param_end}")
            # in the schema's order, each once, the required ones always
            params.append(f'{param} "\\n"' if pname in required else f'({param} "\\n")?')
        rules.append(f"body_{k}: {' '.join(params + [invoke_end])}")
        opening = _lit(f'invoke name="{fn["name"]}">\n')
        rules.append(f'invoke_{k}: "<" {dsml} {opening} body_{k}')
        invokes.append((fn["name"], k))
    if named is not None:
        k = next((k for name, k in invokes if name == named), None)
        if k is None:
            return None
        start = f'start: body_{k} "\\n" {calls_end}'
    else:
        rules.append("invoke: " + " | ".join(f"invoke_{k}" for _, k in invokes))
        block = ('invoke "\\n" ' if single else 'invoke ("\\n" invoke)* "\\n" ') + calls_end
        # (the text before the block is one lexeme ending in its blank line: a literal "\n\n"
        # after a free-text lexeme would never be reached, the free text taking it too)
        start = (f'start: STRING | CONTENT {calls_start} "\\n" {block}' if auto
                 else f"start: {block}")
    grammar = "\n".join([start, *rules, "STRING: /(?s:.*)/", r"CONTENT: /(?s:.*)\n\n/"])
    from llguidance import LLMatcher
    error = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar))
    if error:  # a schema llguidance cannot compile: the prompt's opening alone holds the call
        logger.warning("tool calls left unconstrained: %s", error.strip().splitlines()[0])
        return None
    return grammar
