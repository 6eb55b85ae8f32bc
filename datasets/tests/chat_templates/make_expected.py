"""Writes expected.json: what transformers' apply_chat_template renders for each template in
datasets/templates and each conversation below (tokenize=False). Run with transformers 4.57.6:
    python make_expected.py ../../templates ../../../../shared/data/tokenizers/llama2_32k/tokenizer.json
"""
import json
import pathlib
import sys

import transformers
from transformers import PreTrainedTokenizerFast

templates, tokenizer_json = pathlib.Path(sys.argv[1]), sys.argv[2]
tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
conversations = {
    "one_turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    "system_two_turns": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  Hi there!  "},
        {"role": "assistant", "content": "Hello! How can I help?\n"},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "7"},
    ],
    "open_user_turn": [
        {"role": "user", "content": "Write a haiku about rust."},
    ],
    "chinese": [
        {"role": "user", "content": "红楼梦的作者是谁？"},
        {"role": "assistant", "content": "曹雪芹。"},
    ],
    "roles_do_not_alternate": [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
    ],
}
out = {"transformers": transformers.__version__, "cases": []}
for path in sorted(templates.glob("*.jinja")):
    template = path.read_text()
    for name, messages in conversations.items():
        for gen in (False, True):
            try:
                text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=gen)
                error = None
            except Exception as e:  # the template raised
                text, error = None, str(e)
            out["cases"].append({"template": path.name, "conversation": name, "messages": messages,
                                 "add_generation_prompt": gen, "expected": text, "error": error})
json.dump(out, open("expected.json", "w"), ensure_ascii=False, indent=1)
print(len(out["cases"]), "cases")
