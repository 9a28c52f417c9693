#!/usr/bin/env python3
"""Calling the vLLM Inference API with the OpenAI Python SDK: text, streaming, a conversation, JSON
output and images.

    pip install openai
    python client_example.py --base-url http://localhost:8000/v1 --api-key "$API_KEY"
    python client_example.py --only stream
    python client_example.py --only image-file --image-file cat.jpg

Each example below is a short function you can copy into your own code. `make dev` serves a small
real model (SmolLM2-135M-Instruct, text only: the image examples say so and are skipped); a model
that takes images (`MODEL=vision make dev`, or any vision model) answers them too.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import struct
import zlib

from openai import BadRequestError, OpenAI

DEFAULT_IMAGE_URL = "https://upload.wikimedia.org/wikipedia/commons/4/47/PNG_transparency_demonstration_1.png"


def chat(client: OpenAI, model: str) -> None:
    """A plain chat completion."""
    resp = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=64,
    )
    print(resp.choices[0].message.content)
    print(f"[{resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} completion tokens]")


def stream(client: OpenAI, model: str) -> None:
    """Print the answer token by token as it is generated."""
    chunks = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a haiku about the sea."}],
        max_tokens=64,
        stream=True,
    )
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


def conversation(client: OpenAI, model: str) -> None:
    """Several turns: the whole conversation is sent each time, so the model can use earlier turns."""
    messages = [
        {"role": "user", "content": "My name is Zoltan."},
        {"role": "assistant", "content": "Nice to meet you, Zoltan!"},
        {"role": "user", "content": "What is my name?"},
    ]
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=32)
    print(resp.choices[0].message.content)


def json_output(client: OpenAI, model: str) -> None:
    """An answer constrained to a JSON schema (vLLM's structured outputs): it always parses."""
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name the capital of France, in JSON."}],
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    print(json.loads(resp.choices[0].message.content))


def ask_about_image(client: OpenAI, model: str, image_url: str) -> None:
    """Send a question with an image. `image_url` is an http(s) URL or a `data:` URL."""
    resp = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
        max_tokens=64,
    )
    print(resp.choices[0].message.content)


def image_from_url(client: OpenAI, model: str, url: str) -> None:
    """The server downloads the image itself: the URL must be reachable from the server."""
    ask_about_image(client, model, url)


def image_base64(client: OpenAI, model: str, png: bytes) -> None:
    """Image bytes sent inline as a base64 data URL: works without any URL the server can reach."""
    ask_about_image(client, model, "data:image/png;base64," + base64.b64encode(png).decode())


def image_from_file(client: OpenAI, model: str, path: str) -> None:
    """A local image file, read and sent as a data URL with its MIME type."""
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    ask_about_image(client, model, f"data:{mime};base64,{data}")


def red_square_png(size: int = 32) -> bytes:
    """A small solid red PNG, so the base64 example needs no image file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xdc\x28\x28" * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY", "EMPTY"))
    parser.add_argument("--model", help="default: the first model in /v1/models")
    parser.add_argument("--image-url", default=DEFAULT_IMAGE_URL)
    parser.add_argument("--image-file", help="a local image for the image-file example")
    parser.add_argument(
        "--only",
        choices=["text", "stream", "conversation", "json", "image-url", "image-base64", "image-file"],
    )
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    examples = {
        "text": lambda: chat(client, model),
        "stream": lambda: stream(client, model),
        "conversation": lambda: conversation(client, model),
        "json": lambda: json_output(client, model),
        "image-url": lambda: image_from_url(client, model, args.image_url),
        "image-base64": lambda: image_base64(client, model, red_square_png()),
        "image-file": lambda: image_from_file(client, model, args.image_file),
    }
    for name, run in examples.items():
        if args.only and name != args.only:
            continue
        if name == "image-file" and not args.image_file:
            if args.only:
                parser.error("--only image-file needs --image-file PATH")
            print("\n== image-file: skipped (pass --image-file PATH)")
            continue
        print(f"\n== {name} ({model})")
        try:
            run()
        except BadRequestError as exc:
            if "not a multimodal model" in str(exc):  # vLLM's 400 for an image sent to a text-only model
                print(f"skipped: {model} takes text only")
            else:
                print(f"failed: {exc.__class__.__name__}: {exc}")
        except Exception as exc:  # keep going: one failing example does not stop the others
            print(f"failed: {exc.__class__.__name__}: {exc}")


if __name__ == "__main__":
    main()
