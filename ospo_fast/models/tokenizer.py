"""A byte-level BPE tokenizer built locally (no hub), carrying Janus's special tokens, and the Janus chat
template. Used by the offline model factory; real checkpoints bring their own tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
PAD = "<|pad|>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, BOI, EOI, USER, ASSISTANT]

# Janus's conversation format (system text, "<|User|>: ...\n\n<|Assistant|>:"), written as our own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for c in message['content'] -%}{{ c['text'] if c is mapping else c }}{%- endfor -%}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '<|User|>: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}<image_placeholder>{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- else -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|Assistant|>: ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}{{ c['text'] }}{%- endfor -%}{%- endif -%}"
    "<|end_of_sentence|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|Assistant|>:{%- endif -%}"
)

_WORDS = (
    "a an the and with of on in to is are there this that it its one two three four five six seven eight "
    "red green blue yellow purple cyan orange pink black white brown gray silver golden wooden metal glass "
    "plastic leather fluffy rough smooth shiny round square triangular circle square triangle cube sphere "
    "cylinder cone star heart left right above below near behind front top bottom next beside under over "
    "between inside outside on of dog cat bird horse car bus bench apple banana cup chair table book "
    "lamp tree flower house boat train clock vase bowl bottle phone shoe hat ball kite plate harp soup "
    "person man woman child riding holding eating playing sitting standing running jumping open closed "
    "broken wet dry big small tall short long large tiny bright dark image picture photo scene background "
    "Prompt Concepts relations Relation Questions Is Are Please answer yes no Yes No without explanation "
    "You helpful language vision assistant able understand visual content user provides assist variety tasks "
    "natural Write short compositional prompt about describe detailed long version keep same objects "
    "replace swap drop object attribute position list bindings transformation contrastive think step by"
)


def _corpus() -> list[str]:
    words = _WORDS.split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += [f"a {a} {b}" for a in words[10:40] for b in words[60:90]]
    lines += [f"Is there a {w}? Please answer 'yes' or 'no' without explanation." for w in words[60:100]]
    return lines * 3


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` entries (specials included) on a built-in English corpus."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = core.token_to_id(BOS)
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
        chat_template=CHAT_TEMPLATE,
    )
