"""Chat templates (weights/chat.py): rendered as transformers renders them (the default model's, one
that depends on Jinja's whitespace options, {% generation %} blocks), and found where checkpoints
keep them."""
import json

import pytest

from helpers import smollm_reference_tokenizer, smollm_tokenizer
from weights.chat import find_chat_template, render_chat_template


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "What is 2+2?"}],
])
def test_chat_template_matches_transformers(messages):
    tok, ref = smollm_tokenizer(), smollm_reference_tokenizer()
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False)


def test_generation_blocks_render_their_body():
    """Templates that mark the assistant's turns with {% generation %} (for transformers' training
    masks) failed with "unknown tag"; rendered as transformers renders them."""
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}"
                "{% endgeneration %}{% else %}U: {{ m.content }}{% endif %} {% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render_chat_template(template, messages) == "U: hi A: yo "  # as transformers 5.17 renders it


# Block tags on lines of their own, indented: whitespace that trim_blocks / lstrip_blocks remove
WHITESPACE_TEMPLATE = """{% for m in messages %}
    {% if m.role == 'user' %}
U: {{ m.content }} {{ {'b': 1, 'a': m.content} | tojson }}
    {% else %}
A: {{ m.content }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}"""


def test_a_whitespace_sensitive_template_renders_as_transformers_does():
    """Templates without Jinja's '-' whitespace control depend on trim_blocks and lstrip_blocks, and
    tojson keeps non-ASCII text and key order (transformers' own filter, not Jinja's)."""
    ref = smollm_reference_tokenizer()
    messages = [{"role": "user", "content": "héllo <b>"}, {"role": "assistant", "content": "yo"}]
    for gen in (True, False):
        expected = ref.apply_chat_template(messages, chat_template=WHITESPACE_TEMPLATE, tokenize=False,
                                           add_generation_prompt=gen)
        assert render_chat_template(WHITESPACE_TEMPLATE, messages, add_generation_prompt=gen) == expected
    assert render_chat_template(WHITESPACE_TEMPLATE, messages).endswith("\nA:")  # the default: a prompt


def test_where_a_checkpoint_keeps_its_chat_template(tmp_path):
    """tokenizer_config.json's string, or its "default" among named ones, else chat_template.jinja,
    else chat_template.json (older transformers)."""
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert find_chat_template(tmp_path, {"chat_template": named}) == "D"
    assert find_chat_template(tmp_path, {"chat_template": named[:1]}) == "T"
    assert find_chat_template(tmp_path, {}) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert find_chat_template(tmp_path, {}) == "J"
    (tmp_path / "chat_template.jinja").write_text("K")
    assert find_chat_template(tmp_path, {}) == "K" and find_chat_template(tmp_path, {"chat_template": "S"}) == "S"
