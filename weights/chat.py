"""Chat templates: render a list of {"role", "content"} messages into the prompt text a model was
fine-tuned on. Models ship the template as a Jinja string (GGUF `tokenizer.chat_template`, HF
`tokenizer_config.json` / `chat_template.jinja`); we render it the way transformers does so the
prompt is byte-identical to what the model saw in training.
"""

import json
from datetime import datetime
from pathlib import Path

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Meta-Llama-3-Instruct's template, for checkpoints that come as a bare `tokenizer.model` (Meta's
# original format) with no tokenizer_config.json to carry one. Note that it writes bos_token itself.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# Special tokens that end a turn in common chat formats: generation stops on any of them (ChatML,
# Llama-3, Phi-3, Gemma, Llama-2), on top of the model's declared eos.
END_OF_TURN_TOKENS = ["<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>",
                      "<end_of_turn>", "</s>"]


def find_chat_template(d: Path, tokenizer_config: dict) -> str | None:
    """The template of an HF checkpoint dir: in tokenizer_config.json (a string, or a list of named
    templates), or, as transformers >= 4.43 saves it, in chat_template.jinja / chat_template.json."""
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):
        named = {x["name"]: x["template"] for x in t}
        t = named.get("default") or next(iter(named.values()), None)
    if not t and (d / "chat_template.jinja").is_file():
        t = (d / "chat_template.jinja").read_text(encoding="utf-8")
    if not t and (d / "chat_template.json").is_file():
        t = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return t or None


def _raise_exception(message):
    # Templates call this to reject conversations they can't format (e.g. "roles must alternate").
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's builtin tojson HTML-escapes '<' etc., which would corrupt tool schemas in prompts;
    # transformers overrides it with plain json.dumps, so we do too.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with it
    (for training masks); rendered, it is its body as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render `template` like transformers' apply_chat_template(..., tokenize=False).

    The environment options matter: trim_blocks/lstrip_blocks change whitespace in the output, and
    templates in the wild rely on loopcontrols ({% break %}), raise_exception and strftime_now.
    A fresh environment per call keeps this free of shared state; compiling a template is ~1 ms.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as e:
        raise ValueError(f"chat template error: {e}") from e
