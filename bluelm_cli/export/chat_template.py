"""BlueLM's chat format (bluelm_cli/prompt.py) as Jinja chat templates, for the engines that render prompts.

`<s>{system}[|Human|]:{user 1}[|AI|]:{answer 1}</s>[|Human|]:{user 2}[|AI|]:` — a system message is
plain text before the next `[|Human|]:`. Message content may be a string or OpenAI-style text parts.
"""

from __future__ import annotations

from bluelm_cli.core.prompt import AI_TAG, HUMAN_TAG

__all__ = ["HF_CHAT_TEMPLATE", "GGUF_CHAT_TEMPLATE"]

_CONTENT = (
    "{%- set content = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) -%}"
)

# For tokenizer_config.json: transformers and the servers built on it tokenize the rendered text with
# add_special_tokens=False, so the template writes the BOS itself (like Llama 2's).
HF_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    + _CONTENT
    + "{%- if message['role'] == 'system' -%}{{- content -}}"
    f"{{%- elif message['role'] == 'user' -%}}{{{{- '{HUMAN_TAG}' + content -}}}}"
    f"{{%- elif message['role'] == 'assistant' -%}}{{{{- '{AI_TAG}' + content + eos_token -}}}}"
    "{%- else -%}{{- raise_exception('BlueLM has no ' + message['role'] + ' role') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{AI_TAG}' -}}}}{{%- endif -%}}"
)

# For the GGUF: llama.cpp's SentencePiece tokenizer puts the dummy prefix after every special or
# user-defined token, where SentencePiece puts it once per span between </s> tokens. The GGUF therefore
# turns the automatic prefix off (tokenizer.ggml.add_space_prefix = false) and this template writes it: a
# space at the start of each span, which llama.cpp escapes to "▁". It starts with the BOS text because
# llama-cpp-python's chat handler adds no BOS of its own to a template's prompt, while llama.cpp's server
# strips a leading BOS text and adds the BOS token: both then send exactly one.
GGUF_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(span_open=false) -%}"
    "{%- for message in messages -%}"
    + _CONTENT
    + "{%- if not ns.span_open and message['role'] != 'assistant' -%}{{- ' ' -}}{%- set ns.span_open = true -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- content -}}"
    f"{{%- elif message['role'] == 'user' -%}}{{{{- '{HUMAN_TAG}' + content -}}}}"
    f"{{%- elif message['role'] == 'assistant' -%}}{{{{- '{AI_TAG}' + content + eos_token -}}}}{{%- set ns.span_open = false -%}}"
    "{%- else -%}{{- raise_exception('BlueLM has no ' + message['role'] + ' role') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{- '{AI_TAG}' -}}}}{{%- endif -%}}"
)
