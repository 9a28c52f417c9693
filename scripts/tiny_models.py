"""Build tiny random-weight models that real vLLM serves on the CPU, with no network.

They are the embedded default of `make dev` and the fixtures of the integration tests:
- ``text``: a Llama causal LM (hidden 128, 2 layers, head_dim 64), about 1.5 MB.
- ``vision``: an Idefics3 image+text model (SigLIP-style vision tower, Llama text), about 0.5 MB.

Both share a byte-level BPE tokenizer trained on a few sentences, with a chat template that takes
plain string content and OpenAI content lists (one ``<image>`` per image part). The weights are
random, so the answers are gibberish; what matters is that every layer of the stack is real.

Usage: ``python scripts/tiny_models.py OUT_DIR [--only text|vision]``. Building is idempotent: a
model directory that already holds ``config.json`` and the weights is left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] in ('image', 'image_url') %}<image>"
    "{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving large language models with vLLM is fast and memory efficient.",
    "An OpenAI compatible API answers chat completions, completions and embeddings.",
    "Images, videos and audio can be sent next to text in one request.",
    "Hello world! How are you today? I am fine, thank you. 0123456789",
    "def main():\n    print('hello')\n",
]

SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>"]
IMAGE_SPECIAL = ["<fake_token_around_image>", "<image>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_tokenizer(out: Path, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL + IMAGE_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<end_of_utterance>"] + IMAGE_SPECIAL,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


VERSION = "5"  # bump when a builder changes, so cached models are rebuilt
_STAMP = ".tiny-models-version"


def _done(out: Path) -> bool:
    stamp = out / _STAMP
    return stamp.is_file() and stamp.read_text() == VERSION and any(out.glob("*.safetensors"))


def _stamp(out: Path) -> Path:
    (out / _STAMP).write_text(VERSION)
    return out


def build_text(out: Path) -> Path:
    """A 2-layer Llama with head_dim 64 (CPU attention needs head_dim >= 32)."""
    if _done(out):
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out)
    _write_generation_config(out, tok)
    return _stamp(out)


def build_vision(out: Path) -> Path:
    """An Idefics3 model: one image becomes one token (image_seq_len=1, image 28 px, patch 14)."""
    if _done(out):
        return out
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(0)
    config = Idefics3Config(
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        scale_factor=2,
        tie_word_embeddings=False,
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=28,
            patch_size=14,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        torch_dtype="float32",
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(out)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": 28},
        max_image_size={"longest_edge": 28},
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=1, chat_template=CHAT_TEMPLATE
    )
    processor.save_pretrained(out)
    _write_generation_config(out, tok)
    return _stamp(out)


def _write_generation_config(out: Path, tok) -> None:
    """Greedy by default (`top_k: 1`, which vLLM takes as its default sampling), with a repetition
    penalty: random weights then answer the same varied gibberish every time, so tests do not flake
    on an early end-of-sequence. (Untied embeddings: tied ones make a 1-layer model repeat its last
    prompt token forever.)"""
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
                "top_k": 1,
                "repetition_penalty": 1.5,
            }
        )
    )


BUILDERS = {"text": build_text, "vision": build_vision}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    args = parser.parse_args(argv)
    for name in args.only or sorted(BUILDERS):
        path = BUILDERS[name](args.out_dir / f"tiny-{name}")
        print(f"{name}: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
