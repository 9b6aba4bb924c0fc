"""The chat templates of InternVL's original checkpoints, as its `conversation.py` renders them.

An original-layout config.json names its template (`template: internlm2-chat`); InternVL's own `chat()` renders
the prompt with that template, not with the tokenizer's jinja one, so vlstack does the same: each template here
becomes a jinja template of the same output. All four use the MPT separator style: the system prompt (the
template's default system message unless the conversation has its own) and the separator, then each turn as its
role followed by its message and the separator; the generation prompt is the assistant role alone. The stop token
is the separator stripped.
"""

from __future__ import annotations

from dataclasses import dataclass

INTERNVL = (  # the default system message of Hermes-2, internlm2-chat and phi3-chat
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
INTERNVL_2_5 = (  # internvl2_5's
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)


@dataclass(frozen=True)
class Conversation:
    system: str  # the system prompt, {} standing for the system message
    message: str  # the default system message
    user: str
    assistant: str
    sep: str

    @property
    def stop(self) -> str:
        return self.sep.strip()

    def jinja(self) -> str:
        """The template as jinja (one line: the environment trims blocks)."""
        before, after = (repr(part) for part in self.system.split("{}"))
        sep, user, assistant = repr(self.sep), repr(self.user), repr(self.assistant)
        return (
            f"{{% set system = {self.message!r} %}}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% endif %}"
            f"{{{{ {before} + system + {after} + {sep} }}}}"
            "{% for m in messages %}"
            f"{{% if m['role'] == 'user' %}}{{{{ {user} + m['content'] + {sep} }}}}"
            f"{{% elif m['role'] == 'assistant' %}}{{{{ {assistant} + m['content'] + {sep} }}}}{{% endif %}}"
            "{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {assistant} }}}}{{% endif %}}"
        )


CHATML = dict(system="<|im_start|>system\n{}", user="<|im_start|>user\n", assistant="<|im_start|>assistant\n")
TEMPLATES = {
    "Hermes-2": Conversation(message=INTERNVL, sep="<|im_end|>", **CHATML),
    "internlm2-chat": Conversation(message=INTERNVL, sep="<|im_end|>", **CHATML),
    "internvl2_5": Conversation(message=INTERNVL_2_5, sep="<|im_end|>\n", **CHATML),
    "phi3-chat": Conversation(
        system="<|system|>\n{}", message=INTERNVL, user="<|user|>\n", assistant="<|assistant|>\n", sep="<|end|>"
    ),
}
